"""A pytest plugin that fails the run when a registered secret turns up in captured output.

The relay must never write a token or a signing secret to its logs. Checking that in each
test would need every test to know every secret; instead the whole run's captured output
(log records at every level, stdout and stderr, per test phase) is kept and searched for
every secret registered with `register`, whenever during the run it was registered.

Output a test captures itself (capsys, capfd, a subprocess's pipes) never reaches the
report sections: a test may well hold a secret it captured on purpose, such as a secret
the CLI prints once. A test that captures a relay process's log stream (its stderr) hands
it over with `logged`, so it is searched as well.

State lives in an object registered per pytest run, so an inner run (pytester) does not
mix its findings with the outer run's; only the registry of secrets is process-wide, and
an extra secret can only make the search stricter.

PYTEST_DONT_REWRITE: tests/conftest.py imports this module before pytest processes its
`pytest_plugins`, too late to rewrite it, and pytest would warn (an error here) about that;
there are no asserts in it to rewrite anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

MIN_LENGTH = 8
"""Shorter values could match random text (or each other) and fail the run for nothing."""

VACUOUS_AFTER = 50
"""A run of more tests than this that searched nothing, or for nothing, is a broken check
rather than a clean one; a run of one test file may well have no secret in it."""

_secrets: list[str] = []
"""Append-only, so each captured text remembers how far down the list it has been searched."""


def register(*values: str) -> None:
    """Values too short to be told apart from ordinary text are ignored (see MIN_LENGTH)."""
    for value in values:
        if len(value) >= MIN_LENGTH and value not in _secrets:
            _secrets.append(value)


_logged: list[tuple[str, str]] = []
"""(test id, text) of log streams tests captured themselves."""


def logged(text: str) -> None:
    """Search `text`, a relay process's log output that the current test captured."""
    nodeid = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    _logged.append((nodeid, text))


def mask(secret: str) -> str:
    """Enough to tell which secret it was, too little to use it."""
    return secret[:4] + "…"


def _masked(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, mask(secret))
    return text


@dataclass
class _Captured:
    nodeid: str
    title: str
    text: str
    searched: int = 0
    """How many of `_secrets` have been looked for in `text` so far."""


@dataclass(frozen=True)
class Leak:
    nodeid: str
    title: str
    secret: str
    """Already masked: a leak report must not become a leak itself."""
    line: str
    """The first line holding the secret, every registered secret in it masked."""


class LeakCheck:
    """The searches of one pytest run."""

    def __init__(self) -> None:
        self.captured: list[_Captured] = []
        self.seen: set[tuple[str, str, str]] = set()
        self.leaks: list[Leak] = []
        self.size = 0
        self.phases = 0
        self.tests: set[str] = set()
        self.vacuous = ""

    def _search(self, captured: _Captured) -> None:
        for secret in _secrets[captured.searched :]:
            if secret in captured.text:
                line = next(line for line in captured.text.splitlines() if secret in line)
                self.leaks.append(
                    Leak(captured.nodeid, captured.title, mask(secret), _masked(line)[:300])
                )
        captured.searched = len(_secrets)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.tests.add(report.nodeid)
        if report.sections:
            self.phases += 1
        # A phase's report repeats the sections of the phases before it: search each once.
        for title, text in report.sections:
            key = (report.nodeid, title, text)
            if key in self.seen:
                continue
            self.seen.add(key)
            captured = _Captured(report.nodeid, title, text)
            self.captured.append(captured)
            self.size += len(text.encode())
            self._search(captured)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # Secrets registered at a test's teardown (the `db` fixture reads the ones stored)
        # come after that test's setup and call were reported: search those again for them.
        for nodeid, text in _logged:
            self.captured.append(_Captured(nodeid, "log output the test captured", text))
            self.size += len(text.encode())
        for captured in self.captured:
            self._search(captured)
        if len(self.tests) > VACUOUS_AFTER:
            if not _secrets:
                self.vacuous = "no secret was registered"
            elif not self.size:
                self.vacuous = "no captured output was searched"
        if (self.leaks or self.vacuous) and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        write = terminalreporter.write_line
        if self.leaks:
            terminalreporter.write_sep("=", "leak check: secrets in captured output", red=True)
            for leak in self.leaks:
                write(f"{leak.nodeid}: {leak.secret} in {leak.title!r}: {leak.line}", red=True)
        elif self.vacuous:
            write(f"leak check: {self.vacuous} in a run of {len(self.tests)} tests", red=True)
        else:
            write(
                f"leak check: searched {self.size / 1024:.0f} KiB of captured log output "
                f"from {self.phases} test phases for {len(_secrets)} secrets: none found"
            )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(LeakCheck(), "leakcheck-run")
