"""The documentation site builds strictly, and its generated parts say what the code does.

``mkdocs build --strict`` runs once into a temporary directory: a broken link, a missing
page, an unresolved API reference or a docstring mkdocstrings cannot render fails it. The
command-line reference is generated from ``rlm.cli.build_parser()`` by a build hook
(``docs/hooks/cli_reference.py``); the tests check that every command and every flag the
parser knows is on the built page. Needs the ``[docs]`` extra (part of ``[dev]``).
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from rlm.cli import build_parser

pytest.importorskip("mkdocs", reason="the [docs] extra is not installed (pip install -e '.[docs]')")

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "docs" / "hooks"


def _hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", HOOKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_reference = _hook("cli_reference")
optional_pages = _hook("optional_pages")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f",
         str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def _page_text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8")))


def test_the_site_builds_strictly_with_every_page(site: Path) -> None:
    for page in ("index.html", "getting-started/index.html", "guides/long-documents/index.html",
                 "reference/rlm/index.html", "reference/cli/index.html", "changelog/index.html",
                 "contributing/index.html", "security/index.html"):
        assert (site / page).is_file(), page


def test_the_api_reference_documents_the_public_names(site: Path) -> None:
    text = " ".join(_page_text(p) for p in (site / "reference").rglob("index.html"))
    for name in ("RLM", "RLMResult", "RLMSession", "AsyncOpenAIClient", "Usage", "REPLEnv",
                 "ExecResult", "FakeLLMServer", "ConfigError", "BudgetExhaustedError",
                 "JobSummary", "SQLiteCache", "completion_batch", "acompletion_batch"):
        assert re.search(rf"\b{name}\b", text), name


def test_the_built_cli_page_names_every_command_and_flag(site: Path) -> None:
    text = _page_text(site / "reference" / "cli" / "index.html")
    parser = build_parser()
    for title, sub in [("rlm", parser), *cli_reference.walk(parser)]:
        assert title in text, title
        for action in cli_reference.arguments(sub):
            for name in action.option_strings or [action.metavar or action.dest]:
                assert name in text, f"{title} {name}"


def test_the_cli_reference_covers_every_subcommand_and_flag() -> None:
    markdown = cli_reference.cli_markdown()
    parser = build_parser()
    commands = [title for title, _ in cli_reference.walk(parser)]
    for command in ("run", "batch", "view", "repl", "demo", "serve", "mcp", "cache", "bench"):
        assert f"rlm {command}" in commands
    for title, sub in [("rlm", parser), *cli_reference.walk(parser)]:
        section = markdown.split(f"`{title}`", 1)[1]
        for action in cli_reference.arguments(sub):
            for name in action.option_strings:
                assert f"`{name}`" in section, f"{title} {name}"


def test_hidden_flags_stay_out_of_the_cli_reference() -> None:
    # --format is the old spelling of --context-format, kept working but not shown.
    assert "`--format`" not in cli_reference.cli_markdown()


def test_an_optional_page_is_in_the_nav_only_once_it_exists(tmp_path: Path) -> None:
    nav = [{"Home": "index.md"},
           {"Guides": [{"Cache": "guides/cache.md"}, {"Tracing": "guides/tracing.md"}]}]
    (tmp_path / "guides").mkdir()
    assert optional_pages.present_nav(nav, tmp_path) == [
        {"Home": "index.md"}, {"Guides": [{"Cache": "guides/cache.md"}]}]
    (tmp_path / "guides" / "tracing.md").write_text("# Tracing\n")
    assert optional_pages.present_nav(nav, tmp_path) == nav


def test_the_module_map_names_every_module_of_the_package() -> None:
    # CONTRIBUTING.md's map is the layout a reader sees first: a new module must be on it.
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`(rlm/[\w/]+\.py)`", text))
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rlm").rglob("*.py")}
    assert sorted(modules - listed) == [], "modules missing from CONTRIBUTING.md's module map"
    assert sorted(listed - modules) == [], "CONTRIBUTING.md's module map names modules that do not exist"
