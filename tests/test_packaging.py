"""Packaging and start-up: what a fresh install gives, and what importing costs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def write_log(path: Path) -> None:
    events = [
        {"type": "run_start", "t": 0, "run_id": "r", "depth": 0, "query": "q", "model": "m"},
        {"type": "run_end", "t": 1, "run_id": "r", "depth": 0, "answer": "a", "stopped_reason": "final"},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def test_import_rlm_does_not_import_openai() -> None:
    proc = python("import sys, rlm; print('openai' in sys.modules, rlm.__version__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "False"


def test_from_rlm_import_names_still_works() -> None:
    proc = python("from rlm import RLM, REPLEnv, AsyncOpenAIClient, Usage, ConfigError; print(RLM.__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "RLM"


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["--version"], ["view", "LOG"]])
def test_the_cli_help_and_viewer_do_not_import_openai(argv: list[str], tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    write_log(log)
    argv = [str(log) if a == "LOG" else a for a in argv]
    code = (
        "import sys\n"
        "from rlm.cli import main\n"
        "try:\n"
        "    code = main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('OPENAI_LOADED' if 'openai' in sys.modules else 'OPENAI_ABSENT', code)\n"
    )
    proc = python(code, *argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "OPENAI_ABSENT 0"


def test_the_package_ships_its_license_and_typing_marker() -> None:
    import rlm

    assert (Path(rlm.__file__).parent / "py.typed").exists()
    assert "MIT License" in (REPO / "LICENSE").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'name = "rlm-sandbox"' in pyproject
    assert 'rlm = ["py.typed"]' in pyproject


@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None,
                    reason="needs make and git")
def test_make_demo_on_a_fresh_clone_installs_the_runtime_only(tmp_path: Path) -> None:
    """HEAVY (30 s to minutes: a venv and a pip install): `make demo` in a clone of the
    committed tree, with a smaller haystack (DEMO_ARGS) to keep the run itself short.

    It installs the runtime dependencies only: no pytest in that venv, and the last line
    is a command that works as printed. The pip cache is shared, so the packages come
    from disk, as they would on a second try.
    """
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True,
                   timeout=120)
    # Not MAKEFLAGS/MAKELEVEL either: under `make test` the inner make would think it is a
    # sub-make and print "Entering/Leaving directory" lines around the demo's output.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "RLM_", "VIRTUAL_ENV", "MAKE", "MFLAGS"))}
    env["PYTHON"] = sys.executable
    env["COLUMNS"] = "80"
    started = time.monotonic()
    proc = subprocess.run(["make", "demo", "DEMO_ARGS=--lines 100000 --latency 0.1"], cwd=clone, capture_output=True, text=True, timeout=600, env=env)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "correct" in proc.stdout
    venv_python = clone / ".venv" / "bin" / "python"
    has_pytest = subprocess.run([str(venv_python), "-c", "import pytest"], capture_output=True)
    assert has_pytest.returncode != 0, "make demo installed pytest"
    last = proc.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith("view it with: .venv/bin/rlm view "), last
    view = subprocess.run(last.removeprefix("view it with: "), shell=True, cwd=clone, capture_output=True,
                          text=True, timeout=120)
    assert view.returncode == 0, view.stderr
    print(f"make demo on a fresh clone: {elapsed:.1f} s")


def test_every_public_constructor_parameter_is_documented() -> None:
    import inspect

    from rlm import RLM, AsyncOpenAIClient, REPLEnv

    for cls in (RLM, REPLEnv, AsyncOpenAIClient):
        doc = cls.__doc__ or ""
        params = inspect.signature(cls.__init__).parameters.values()
        missing = [p.name for p in params
                   if p.name != "self" and p.kind is not p.VAR_KEYWORD and f"``{p.name}``" not in doc]
        assert missing == [], f"{cls.__name__}: {missing}"
