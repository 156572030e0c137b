"""The leak check itself, in inner pytest runs: it must be able to fail a run, or the line
"none found" at the end of every run would mean nothing.

Inner runs are subprocesses: the registry of secrets is process-wide, and an inner run
inline would add its secrets to this run's.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests import leakcheck

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def secret() -> str:
    """A fresh one per test, so that finding it in the output cannot be a coincidence."""
    return "whsec_" + secrets.token_urlsafe(24)


def run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str
) -> pytest.RunResult:
    """`source` as the inner run's only test module, with nothing but the leak check loaded
    (the installed plugins only slow it down)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_subprocess("-p", "tests.leakcheck")


def test_a_logged_secret_fails_the_run_and_is_shown_masked(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    result = run(
        pytester,
        monkeypatch,
        f"""
        import logging

        from tests.leakcheck import register

        def test_clean():
            logging.getLogger("postback.x").warning("nothing to see")

        def test_leaky():
            register({secret!r})
            logging.getLogger("postback.x").warning("calling %s", {secret!r})
        """,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*leak check: secrets in captured output*",
            f"test_inner.py::test_leaky: {leakcheck.mask(secret)} in 'Captured log call': "
            f"*calling {leakcheck.mask(secret)}",
        ]
    )
    assert "test_clean" not in result.stdout.str()
    assert secret not in result.stdout.str() + result.stderr.str()


def test_a_secret_registered_after_it_was_logged_is_still_found(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    """As the `db` fixture registers the secrets a test stored: at the test's teardown,
    after the log of its call was reported."""
    result = run(
        pytester,
        monkeypatch,
        f"""
        import logging

        import pytest

        from tests.leakcheck import register

        @pytest.fixture
        def stored():
            yield
            register({secret!r})

        def test_leaky(stored):
            logging.getLogger("postback.x").warning("calling %s", {secret!r})

        def test_later():
            pass
        """,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"test_inner.py::test_leaky: {leakcheck.mask(secret)} in *"])
    assert secret not in result.stdout.str() + result.stderr.str()


def test_a_registered_secret_never_logged_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    result = run(
        pytester,
        monkeypatch,
        f"""
        import logging

        from tests.leakcheck import register

        def test_careful():
            register({secret!r}, "short")
            logging.getLogger("postback.x").warning("calling with %s", {secret[:8]!r})
            print("a short registered value is no secret: short")
        """,
    )
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["leak check: searched * KiB of captured log output from * test phases for 1 secrets:*"]
    )


@pytest.mark.parametrize(
    ("register", "log", "why"),
    [
        ("", "logging.getLogger('postback.x').warning('hello')", "no secret was registered"),
        ("register('registered-but-silent')", "pass", "no captured output was searched"),
    ],
)
def test_a_large_run_that_searched_nothing_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, register: str, log: str, why: str
) -> None:
    result = run(
        pytester,
        monkeypatch,
        f"""
        import logging

        import pytest

        from tests.leakcheck import register

        @pytest.mark.parametrize("n", range({leakcheck.VACUOUS_AFTER + 1}))
        def test_many(n):
            {register}
            {log}
        """,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [f"leak check: {why} in a run of {leakcheck.VACUOUS_AFTER + 1} tests"]
    )
