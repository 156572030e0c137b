"""The tests' own support: waiting for a condition, and `pytest -m unit`, which runs the
tests that need no server where there is none."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import clean_env
from tests.support.servers import needs_servers
from tests.support.wait import until

ROOT = Path(__file__).resolve().parent.parent
NO_POSTGRES = "postgresql://postgres@127.0.0.1:1/postgres"
NO_REDIS = "redis://127.0.0.1:1"
UNIT_TESTS_AT_LEAST = 200
"""Fewer would mean tests lost their mark, or the run stopped short."""


@pytest.mark.unit
async def test_until_returns_as_soon_as_the_condition_holds() -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) == 3

    async def at_once() -> bool:
        return True

    began = time.monotonic()
    held = await until(third_time, within=5)
    assert len(calls) == 3
    assert began < held <= time.monotonic()
    assert await until(at_once, within=5) <= time.monotonic()


@pytest.mark.unit
async def test_until_fails_the_test_saying_what_never_happened() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"^not within 0\.05 s: the receiver's 200$"):
        await until(lambda: False, within=0.05, what="the receiver's 200")


@pytest.mark.unit
def test_a_test_needs_servers_when_its_fixtures_lead_to_postgres_or_redis() -> None:
    assert needs_servers(["db", "database_url", "admin_url", "tmp_path"])
    assert needs_servers(["producer", "settings", "redis_url", "redis_base_url"])
    assert not needs_servers(["tmp_path", "monkeypatch", "receiver"])


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    """pytest in a process of its own, where no server answers at the URLs it is given
    (and no POSTBACK_ variable of this run's shell is set)."""
    env = clean_env() | {
        "POSTBACK_TEST_ADMIN_URL": NO_POSTGRES,
        "POSTBACK_TEST_REDIS_URL": NO_REDIS,
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_unit_tests_run_where_no_server_answers() -> None:
    ran = _pytest("-m", "unit")

    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "test servers: none (no test here needs one)" in ran.stdout.splitlines()
    summary = re.search(r"(\d+) passed, (\d+) deselected", ran.stdout)
    assert summary is not None, ran.stdout[-3000:]
    passed, deselected = int(summary[1]), int(summary[2])
    assert passed > UNIT_TESTS_AT_LEAST
    assert passed > deselected  # most tests, as the README says
    assert deselected > 0  # the rest were left out, not run


def test_a_unit_test_that_asks_for_a_server_fails_before_reaching_it(tmp_path: Path) -> None:
    (tmp_path / "test_mismarked.py").write_text(
        "import pytest\n\n\n"
        "@pytest.mark.unit\n"
        "def test_reads_the_ledger(database_url: str) -> None:\n"
        "    pass\n"
    )

    # The repository's conftest, loaded as a plugin for a test file outside it.
    ran = _pytest("-c", str(ROOT / "pyproject.toml"), "-p", "tests.conftest", str(tmp_path), "-q")

    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert (
        "test_reads_the_ledger is marked unit but uses a server (through admin_url): "
        "unmark it, or leave the server out"
    ) in ran.stdout
    assert "1 error" in ran.stdout
    # Stopped before the fixture: no attempt to reach the unreachable server.
    assert "Connect" not in ran.stdout, ran.stdout
