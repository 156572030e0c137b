"""The `postback` command run as a user runs it: a subprocess with its own environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests import leakcheck
from worker.config import Settings

POSTBACK = (sys.executable, "-m", "ops")
"""`postback` as the tests run it: from this checkout, in this virtual environment."""

UNREACHABLE_DATABASE = "postgresql://postgres@127.0.0.1:1/nope"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


def clean_env() -> dict[str, str]:
    """This process's environment without its POSTBACK_ variables: a subprocess gets only
    the settings its test gives it, whatever the shell running the tests has set."""
    return {name: value for name, value in os.environ.items() if not name.startswith("POSTBACK_")}


def postback_env(settings: Settings) -> dict[str, str]:
    """`clean_env()` plus `settings` as POSTBACK_ variables: what a `postback` subprocess
    configured with `settings` gets."""
    env = clean_env()
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"POSTBACK_{name.upper()}"] = str(value)
    return env


@dataclass(frozen=True)
class Postback:
    """`postback ARGS` in `cwd`, with `env` as its environment."""

    env: Mapping[str, str]
    cwd: Path

    def __call__(
        self,
        *args: str,
        stdin: str | None = None,
        env_overrides: Mapping[str, str | None] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        for name, value in (env_overrides or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        result = subprocess.run(
            [*POSTBACK, *args],
            input=stdin or "",  # never the terminal's stdin
            env=env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        # stderr is the log stream; stdout is the command's answer, which may show a
        # generated secret on purpose.
        leakcheck.logged(result.stderr)
        return result


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have worked."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    return result.stdout


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command printed, after checking it is one line and exit 2."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("postback"), lines[0]
    assert result.stdout == ""
    return lines[0]
