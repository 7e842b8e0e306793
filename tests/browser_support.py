"""Opening an HTML page the way a person would: headless Chromium, for tests of HTML output.

``dump_dom(path)`` returns the DOM after Chromium has loaded and run the page, and
``screenshot(path, png)`` renders it to a PNG. Both run a real ``chromium`` process
with its own throw-away profile and a timeout, and fail the test with "install
chromium (apt-get install chromium)" when the browser is not on the machine.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
TIMEOUT_S = 90.0


def chromium() -> str:
    """The path of the Chromium executable; fails the test when there is none."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("install chromium (apt-get install chromium)")


def _run(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="rlm-chromium-") as profile:
        cmd = [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", *extra, path.resolve().as_uri(),
        ]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"chromium did not finish within {TIMEOUT_S:g} s: {exc}")


def dump_dom(path: str | Path) -> str:
    """The DOM of the HTML file at ``path`` as Chromium serialises it after loading."""
    proc = _run(Path(path), "--dump-dom")
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-500:]}"
    return proc.stdout


def screenshot(path: str | Path, png: str | Path, width: int = 1400, height: int = 1000) -> Path:
    """Render the HTML file at ``path`` to the PNG file ``png`` and return its path."""
    out = Path(png)
    proc = _run(Path(path), f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
                "--hide-scrollbars")
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-500:]}"
    assert out.is_file() and out.stat().st_size > 0, "chromium wrote no screenshot"
    return out
