"""What the test run needs besides the Python packages, checked by `make test` before pytest
(`python -m tests.prerequisites`): a Chromium for the ops page tests (tests/test_page.py)
and docker-compose for tests/test_deploy.py.

Each is used where present, else obtained where it can be: as root where apt-get is
(Debian), `apt-get install`; for the browser, then Playwright's own installer, whose
download may be unreachable. What cannot be had stops the run with one line saying how to
get it: no test is skipped for want of it.

The browser, in order: $POSTBACK_TEST_CHROMIUM when set (and nothing else then), Debian's
/usr/bin/chromium, Playwright's own once installed (`playwright install chromium`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SYSTEM_CHROMIUM = Path("/usr/bin/chromium")
GET_CHROMIUM = (
    "`apt-get install chromium` (as root), or `.venv/bin/playwright install chromium` where "
    "its download is reachable, or set POSTBACK_TEST_CHROMIUM to a Chromium"
)
NO_CHROMIUM = f"no Chromium for the ops page tests: {GET_CHROMIUM}"
NO_DRIVER = (
    "Playwright's driver, which drives the browser, does not start (its node needs "
    "libatomic1): `apt-get install libatomic1` (as root)"
)
NO_COMPOSE = (
    "no docker-compose, which tests/test_deploy.py validates docker-compose.yml with: "
    "`apt-get install docker-compose` (as root), or install Docker's compose plugin"
)


def chromium(playwright_own: str | None) -> Path | None:
    """The browser the tests launch, given where Playwright's own one is (or would be), if
    that is known."""
    if configured := os.environ.get("POSTBACK_TEST_CHROMIUM"):
        return Path(configured)
    candidates = [SYSTEM_CHROMIUM] + ([] if playwright_own is None else [Path(playwright_own)])
    return next((candidate for candidate in candidates if candidate.exists()), None)


def _playwright_own() -> str | None:
    """Where Playwright's own Chromium is or would be; None when Playwright's driver does not
    start at all (a minimal system lacks a library its bundled node needs, libatomic1)."""
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as playwright:
            return playwright.chromium.executable_path
    except Exception:
        return None


def _runs(executable: Path) -> bool:
    """Starts at all: a browser downloaded without its system libraries does not."""
    try:
        result = subprocess.run(
            [str(executable), "--version"], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _quiet(command: list[str]) -> bool:
    """Whether `command` succeeded; its output is kept out of the way."""
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        result = subprocess.run(command, capture_output=True, env=env, check=False)
    except OSError:
        return False
    return result.returncode == 0


def _apt_install(package: str, updated: list[bool]) -> bool:
    """`apt-get install package`, when this runs as root where apt-get is."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    if not updated:
        updated.append(_quiet(["apt-get", "update", "-qq"]))
    return _quiet(["apt-get", "install", "-y", "-qq", package])


def _compose() -> bool:
    if shutil.which("docker-compose"):
        return True
    return bool(shutil.which("docker")) and _quiet(["docker", "compose", "version"])


def _get_chromium(updated: list[bool]) -> str | None:
    """Where the browser is, obtained if need be; else None, having said why.

    Playwright's driver is started only when neither a configured nor Debian's Chromium can
    be had: on a minimal system it may not start at all.
    """
    own = None
    found = chromium(own)
    if found is None and _apt_install("chromium", updated):
        found = chromium(own)
    if found is None:
        own = _playwright_own()
        found = chromium(own)
        installing = [sys.executable, "-m", "playwright", "install", "chromium"]
        if found is None and own is not None and _quiet(installing):
            found = chromium(own)
    if found is None:
        _say(NO_CHROMIUM)
        return None
    if not found.exists():
        _say(f"POSTBACK_TEST_CHROMIUM={found} does not exist; unset it, or point it at a Chromium")
        return None
    if not _runs(found):
        if own is not None and found == Path(own):  # downloaded without its system libraries
            libraries = "`.venv/bin/playwright install-deps chromium` (as root) adds them"
            fix = f"{libraries}; or {GET_CHROMIUM}"
        else:
            fix = "fix it or set POSTBACK_TEST_CHROMIUM to another"
        _say(f"{found} does not start (`{found} --version` fails): {fix}")
        return None
    return str(found)


def _driver(updated: list[bool]) -> bool:
    """Whether Playwright's driver starts, obtaining what it lacks if need be: the tests drive
    any browser through it, and a minimal Debian lacks the library its node needs."""
    if _playwright_own() is not None:
        return True
    if _apt_install("libatomic1", updated) and _playwright_own() is not None:
        return True
    _say(NO_DRIVER)
    return False


def main() -> int:
    updated: list[bool] = []  # apt-get update runs at most once
    browser = _get_chromium(updated)
    if browser is not None and not _driver(updated):
        browser = None
    compose = _compose() or (_apt_install("docker-compose", updated) and _compose())
    if not compose:
        _say(NO_COMPOSE)
    if browser is None or not compose:
        return 1
    _say(f"ops page tests in {browser}")
    return 0


def _say(line: str) -> None:
    print(f"make test: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
