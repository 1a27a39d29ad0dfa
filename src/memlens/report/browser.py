"""Render a report in headless Chromium and read back what the browser laid out.

    dom = render_dom(Path("memlens-report/index.html"))   # the DOM after load, as HTML text
    screenshot(Path("memlens-report/index.html"), Path("report.png"))
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from memlens.errors import MemlensError

_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000",
]


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on this machine, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    binary = find_chromium()
    if binary is None:
        raise MemlensError("no Chromium found: install Debian's `chromium` package")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, *_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)


def render_dom(page: Path, *, timeout: float = 60) -> str:
    """The page's DOM after the browser loaded it and ran its scripts."""
    result = _run(["--dump-dom", Path(page).resolve().as_uri()], timeout)
    if result.returncode != 0 or not result.stdout:
        raise MemlensError(f"Chromium could not render {page}: {result.stderr.strip()[-300:]}")
    return result.stdout


def screenshot(page: Path, png: Path, *, width: int = 1200, height: int = 1600,
               timeout: float = 60) -> Path:
    """Save a PNG screenshot of ``page`` as the browser renders it."""
    result = _run([f"--screenshot={Path(png).resolve()}", f"--window-size={width},{height}",
                   Path(page).resolve().as_uri()], timeout)
    if not Path(png).exists():
        raise MemlensError(f"Chromium made no screenshot of {page}: {result.stderr.strip()[-300:]}")
    return png
