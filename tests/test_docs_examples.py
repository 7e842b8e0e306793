"""Every Python and shell example in README.md and docs/ runs, offline, as written.

Each runnable fenced block (see ``docs_support`` for the languages and the
``<!-- example: ... -->`` markers) runs in a fresh temporary directory holding the
workspace files the examples name (``big.txt``, ``tasks.jsonl``...: stand-ins for the
reader's own files), with ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` (and each other
provider's endpoint and key variables: ``ANTHROPIC_*``, ``AZURE_OPENAI_*``, ``GEMINI_*``)
pointing at one fake server (``python -m rlm.testing``, whose scripted root answers any
RLM run) and ``HOME`` inside the directory, so nothing is written elsewhere. The ports the examples
name (8000, 8100, 8765) are swapped for free ones, so parallel runs do not collide.
Units run in a few threads at once (each in its own process); a failure names the
Markdown file and line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from docs_runner import GROUPS_FILE
from docs_support import (
    RUN_LANGUAGES,
    SHOWN_LANGUAGES,
    Block,
    MarkerError,
    Unit,
    console_commands,
    markdown_files,
    parse_blocks,
    units_of,
)
from rlm_support import wait_until

from rlm.testing import spawn_fake_server

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "docs_runner.py"
# Blocks marked skip across README.md and docs/, each needing what a test cannot have:
# an install from the package index (3), a running Ray cluster, the MCP Inspector from
# the npm registry, a 160-cell benchmark run, two posts to Langfuse Cloud, a Phoenix
# server to send spans to. Raise it only with a reason in the marker; lower it when a
# block learns to run.
MAX_SKIPPED = 9
PORTS = (8000, 8100, 8765)
_PORT_TEXT = re.compile(r"(?<=[:\s])(" + "|".join(map(str, PORTS)) + r")\b")
WORKERS = 3


def _all_blocks() -> list[Block]:
    blocks: list[Block] = []
    for path in markdown_files(ROOT):
        blocks += parse_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return blocks


BLOCKS = _all_blocks()
UNITS = {unit.id: unit for unit in units_of(BLOCKS)}


# -- the workspace: stand-ins for the reader's files ---------------------------------


def _log_lines(n: int) -> list[str]:
    services = ["auth", "billing", "search", "mailer", "export"]
    lines = []
    for i in range(n):
        customer = f"C-{(i * 37) % 400:04d}"
        level = "ERROR" if i % 53 == 0 else "INFO"
        lines.append(f"2025-03-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00 {level} "
                     f"{services[i % 5]} complaint={i % 7 == 0} customer={customer} "
                     f"request {i} took {(i * 13) % 900} ms.")
    lines.insert(n // 2, "2025-03-14T09:26:53 INFO auth The secret passphrase is "
                         "'amber falcon'. Keep it safe.")
    return lines


def write_workspace(root: Path) -> None:
    """The files the examples name, small enough to run fast."""
    log = "\n".join(_log_lines(3000)) + "\n"
    for name in ("big.txt", "server.log", "logs.txt"):
        (root / name).write_text(log, encoding="utf-8")
    sections = [f"## Section {n}\n\n" + " ".join(
        f"Paragraph {n}.{k} covers topic {n * k} in some detail." for k in range(1, 4 + n % 5))
        for n in range(1, 13)]
    (root / "doc.txt").write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    orders = [f"order O-{1000 + i} supplier={['Acme', 'Globex', 'Initech'][i % 3]} "
              f"due=2025-04-{1 + i % 28:02d} delivered={'late' if i % 9 == 0 else 'on time'}"
              for i in range(600)]
    (root / "orders.txt").write_text("\n".join(orders) + "\n", encoding="utf-8")
    with (root / "records.jsonl").open("w", encoding="utf-8") as f:
        for i in range(300):
            f.write(json.dumps({"id": i, "customer": f"C-{i % 40:04d}",
                                "text": f"complaint {i} about invoice {i * 7}"}) + "\n")
    contracts = root / "contracts"
    contracts.mkdir()
    for n in (17, 18, 19):
        (contracts / f"{n}.txt").write_text(
            f"Contract {n}. This agreement is signed by Dana Reyes for Acme and by "
            f"Lee Park for Globex on 2025-02-{n}.\n" * 20, encoding="utf-8")
    with (root / "tasks.jsonl").open("w", encoding="utf-8") as f:
        for n in (17, 18, 19):
            f.write(json.dumps({"id": f"c-{n}", "query": "Who signed?",
                                "context_path": f"contracts/{n}.txt"}) + "\n")
    (root / "tasks.csv").write_text(
        "id,context_path\n" + "".join(f"c-{n},contracts/{n}.txt\n" for n in (17, 18, 19)),
        encoding="utf-8")
    (root / "prices.json").write_text(json.dumps({"qwen2.5-72b": [0.35, 0.40]}) + "\n",
                                      encoding="utf-8")
    shutil.copy(ROOT / "README.md", root / "README.md")
    (root / "report.schema.json").write_text(json.dumps({
        "type": "object",
        "properties": {"late_suppliers": {"type": "array", "items": {"type": "string"}},
                       "total_late_orders": {"type": "integer"}},
        "required": ["late_suppliers", "total_late_orders"],
    }) + "\n", encoding="utf-8")


# -- running units ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spec(unit: Unit) -> list[dict[str, object]]:
    ports = {str(p): str(_free_port()) for p in PORTS}
    spec = []
    for block in unit.blocks:
        text = console_commands(block.text) if block.kind == "console" else block.text
        text = _PORT_TEXT.sub(lambda m: ports[m.group(1)], text)
        spec.append({"path": block.path, "line": block.line, "text": text,
                     "kind": "shell" if block.kind == "console" else block.kind,
                     "background": block.background, "repl": block.repl})
    return spec


def _end_groups(groups: Path) -> None:
    """Kill every process group a runner recorded (servers and shell blocks it started)."""
    if not groups.exists():
        return
    for line in groups.read_text(encoding="utf-8").split():
        try:
            os.killpg(int(line), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _environment(base_url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "RLM_", "ANTHROPIC_", "AZURE_", "GEMINI_"))}
    root = base_url.removesuffix("/v1")
    env.update({
        "OPENAI_BASE_URL": base_url,
        "OPENAI_API_KEY": "sk-docs-example",
        # Every provider's model strings (anthropic/..., azure/..., gemini/...) reach the
        # same fake server, which speaks their wire formats too.
        "ANTHROPIC_BASE_URL": root,
        "ANTHROPIC_API_KEY": "sk-ant-docs-example",
        "AZURE_OPENAI_ENDPOINT": root,
        "AZURE_OPENAI_API_KEY": "azure-docs-example",
        "GEMINI_BASE_URL": root + "/v1beta/openai",
        "GEMINI_API_KEY": "gemini-docs-example",
        "RLM_SERVE_AUTH_KEY": "docs-example-key",
        "HOME": str(home),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "RAY_TMPDIR": str(home / "ray"),
        "PYTHONUNBUFFERED": "1",
        "NO_COLOR": "1",
    })
    env.pop("XDG_CACHE_HOME", None)
    return env


def run_unit(unit: Unit, base_url: str, workspace: Path) -> tuple[int, str]:
    """Run one unit in a fresh copy of the workspace; its exit code and output."""
    with tempfile.TemporaryDirectory(prefix="rlm-doc-") as tmp:
        work = Path(tmp) / "w"
        shutil.copytree(workspace, work)
        home = Path(tmp) / "h"
        (home / "ray").mkdir(parents=True)
        # ~/docs: the reader's folder of documents, as the server examples name it.
        (home / "docs").mkdir()
        shutil.copy(work / "server.log", home / "docs" / "server.log")
        spec = Path(tmp) / "unit.json"
        spec.write_text(json.dumps(_spec(unit)), encoding="utf-8")
        groups = Path(tmp) / "groups"
        env = {**_environment(base_url, home), GROUPS_FILE: str(groups)}
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen([sys.executable, str(RUNNER), str(spec)], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=unit.timeout)
            except subprocess.TimeoutExpired:
                code = -1
            finally:
                # The unit's process group ends with it, servers and stray children too.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                _end_groups(groups)
            out.seek(0)
            text = out.read().decode(errors="replace")
        if code == -1:
            text += f"\nEXAMPLE FAILED {unit.id}: did not finish in {unit.timeout:.0f} s"
        return code, text


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    with spawn_fake_server() as url:
        yield url


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs-workspace")
    write_workspace(root)
    return root


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, fake_url: str,
             workspace: Path) -> dict[str, tuple[int, str]]:
    # Only the units this session selected, all at once in a few threads.
    wanted = [item.callspec.params["unit_id"] for item in request.session.items
              if getattr(item, "callspec", None) and "unit_id" in item.callspec.params]
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {uid: pool.submit(run_unit, UNITS[uid], fake_url, workspace)
                   for uid in dict.fromkeys(wanted)}
        return {uid: future.result() for uid, future in futures.items()}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("unit_id", list(UNITS))
def test_example_runs(unit_id: str, outcomes: dict[str, tuple[int, str]]) -> None:
    code, output = outcomes[unit_id]
    assert code == 0, f"{unit_id} failed:\n{output[-6000:]}"


# -- the collection itself ------------------------------------------------------------


def test_examples_are_found_in_readme_and_docs() -> None:
    paths = {block.path for block in BLOCKS if block.kind}
    assert "README.md" in paths
    assert any(p.startswith("docs/") for p in paths)


def test_few_examples_are_marked_skip() -> None:
    skipped = [f"{b.where} ({b.skip})" for b in BLOCKS if b.skip is not None]
    assert len(skipped) <= MAX_SKIPPED, "\n".join(skipped)


def test_a_comment_right_before_a_block_is_an_example_marker() -> None:
    # Any other comment there ("<!-- not run: ... -->") reads as a marker but is ignored,
    # so its block runs after all.
    stray = []
    for path in markdown_files(ROOT):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not re.match(r"\s*(`{3,}|~{3,})\S", line):
                continue
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            if k >= 0 and lines[k].lstrip().startswith("<!--") and "example:" not in lines[k]:
                stray.append(f"{path.relative_to(ROOT)}:{k + 1}: {lines[k].strip()}")
    assert stray == []


def test_every_fenced_block_names_a_known_language() -> None:
    # A command in an unlabelled block would never run; label it, or ```text for output.
    unknown = [f"{b.where} ({b.language or 'no language'})" for b in BLOCKS
               if b.language not in RUN_LANGUAGES and b.language not in SHOWN_LANGUAGES]
    assert unknown == []


def test_a_skip_marker_must_give_its_reason() -> None:
    with pytest.raises(MarkerError):
        parse_blocks("<!-- example: skip -->\n```bash\nfalse\n```\n", "x.md")


def test_blocks_of_one_session_run_as_one_unit_in_order() -> None:
    text = ("<!-- example: session a -->\n```python\nx = 1\n```\n\n```bash\ntrue\n```\n\n"
            "<!-- example: session a -->\n```python\nprint(x)\n```\n")
    units = units_of(parse_blocks(text, "x.md"))
    assert [[b.line for b in u.blocks] for u in units] == [[3, 12], [7]]


def test_a_console_block_runs_its_prompted_lines_only() -> None:
    text = "$ rlm --version\nrlm 0.1.0\n$ rlm cache info \\\n    --json\n{...}\n"
    assert console_commands(text) == "rlm --version\nrlm cache info \\\n    --json\n"


def test_sessions_of_the_same_name_on_two_pages_stay_apart() -> None:
    text = "<!-- example: session a -->\n```python\nx = 1\n```\n"
    blocks = parse_blocks(text, "one.md") + parse_blocks(text, "two.md")
    assert [[b.path for b in u.blocks] for u in units_of(blocks)] == [["one.md"], ["two.md"]]


def run_page(text: str, path: str, base_url: str, workspace: Path) -> tuple[int, str]:
    """Run a Markdown page that holds one unit of examples, as the docs' own run."""
    (unit,) = units_of(parse_blocks(text, path))
    return run_unit(unit, base_url, workspace)


def test_a_failing_python_block_names_its_file_and_line(fake_url: str, workspace: Path) -> None:
    text = "Intro.\n\n```python\nx = 1\nraise ValueError('broken example')\n```\n"
    code, output = run_page(text, "docs/broken.md", fake_url, workspace)
    assert code == 1
    assert "EXAMPLE FAILED docs/broken.md:4" in output
    assert 'File "docs/broken.md", line 5' in output


def test_a_failing_shell_block_names_its_file_and_line(fake_url: str, workspace: Path) -> None:
    text = "```bash\ntrue\nrlm view no-such-log.jsonl\n```\n"
    code, output = run_page(text, "docs/broken.md", fake_url, workspace)
    assert code == 1
    assert "EXAMPLE FAILED docs/broken.md:2: exited 2" in output
    assert "log file not found" in output


def test_a_session_shares_variables_and_a_top_level_await(fake_url: str,
                                                         workspace: Path) -> None:
    text = ("<!-- example: session s -->\n```python\nimport asyncio\nx = 41\n```\n"
            "<!-- example: session s -->\n```python\nawait asyncio.sleep(0)\n"
            "assert x + 1 == 42\n```\n")
    code, output = run_page(text, "docs/s.md", fake_url, workspace)
    assert code == 0, output


def _running(marker: str) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                return True
        except OSError:
            continue
    return False


def test_a_unit_past_its_timeout_is_reported_and_leaves_no_process(fake_url: str,
                                                                   workspace: Path) -> None:
    text = ("<!-- example: session t, background -->\n```bash\n"
            "python -m rlm.testing --port 8100 --seed 60417\n```\n"
            "<!-- example: session t, timeout 3 -->\n```bash\nsleep 60418 & sleep 60419\n```\n")
    code, output = run_page(text, "docs/slow.md", fake_url, workspace)
    assert code == -1
    assert "EXAMPLE FAILED docs/slow.md:3 [t]: did not finish in 3 s" in output
    assert wait_until(lambda: not any(map(_running, ("--seed 60417", "sleep 60418",
                                                     "sleep 60419"))))
