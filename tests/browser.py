"""A headless Chromium for the report test: find (or install) it, load a page offline.

    python -m tests.browser REPORT.html OUT.png    # screenshot (e.g. docs/report.png)

Every browser is started in its own process group and that group is ended
by its id when the call returns or times out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALLER = os.path.join(REPO, "scripts", "install_chromium.sh")
NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome", "chrome")
OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    # No network at all: every host resolves to nothing, and any proxy use fails.
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
)


def find_browser(install: bool = True) -> Optional[str]:
    """$CHROMIUM, a Chromium/Chrome on PATH, or (install=True) scripts/install_chromium.sh's."""
    env = os.environ.get("CHROMIUM")
    if env and os.access(env, os.X_OK):
        return env
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    if install and os.path.exists(INSTALLER):
        proc = subprocess.run(["bash", INSTALLER], capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().splitlines()[-1]
    return None


def run_browser(browser: str, url: str, *extra: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Runs one headless Chromium command on `url` with a fresh profile; stops its process group."""
    profile = tempfile.mkdtemp(prefix="report-chromium-")
    args = [browser, *OFFLINE_FLAGS, f"--user-data-dir={profile}", *extra, url]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc.pid)
        out, err = proc.communicate()
        raise
    finally:
        _stop_group(proc.pid)  # helpers (zygote, renderer) share the group
        shutil.rmtree(profile, ignore_errors=True)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _stop_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def dump_dom(browser: str, html_path: str) -> subprocess.CompletedProcess:
    """The DOM after load (scripts run; virtual time lets the load event fire)."""
    return run_browser(browser, f"file://{os.path.abspath(html_path)}", "--virtual-time-budget=10000",
                       "--enable-logging=stderr", "--v=0", "--dump-dom")


def screenshot(browser: str, html_path: str, png_path: str, width: int = 1200, height: int = 1500) -> None:
    """A PNG of the top of the page, saved small (palette colours)."""
    from PIL import Image

    raw = png_path + ".raw.png"
    run_browser(browser, f"file://{os.path.abspath(html_path)}", "--hide-scrollbars", "--virtual-time-budget=5000",
                f"--window-size={width},{height}", f"--screenshot={os.path.abspath(raw)}")
    image = Image.open(raw).convert("RGB")
    image = image.resize((width * 3 // 4, height * 3 // 4), Image.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(png_path, optimize=True)
    os.remove(raw)


if __name__ == "__main__":
    found = find_browser()
    if not found:
        sys.exit("no Chromium found; run scripts/install_chromium.sh")
    screenshot(found, sys.argv[1], sys.argv[2])
    print(sys.argv[2], os.path.getsize(sys.argv[2]), "bytes")
