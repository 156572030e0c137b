"""`postback demo` left running, as a newcomer leaves it: in a terminal, or with `--stay`.

The demo runs as a subprocess, its output read as it comes until it says where its page is
and that Ctrl-C stops it; then the test uses the page, and sends SIGINT, as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ops.cli.demo import STAYS
from tests import leakcheck
from tests.support.cli import POSTBACK

START_SECONDS = 120.0
STOP_SECONDS = 30.0


@dataclass
class Staying:
    """The running demo: its page's URL and ops token as printed, and its output so far."""

    process: subprocess.Popen[bytes]
    reading: int
    url: str = ""
    token: str = ""
    output: str = ""
    stderr: str = field(default="")

    def interrupt(self) -> str:
        """Ctrl-C: SIGINT, then the demo's whole output once it has ended. Fails if it
        does not end in time."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=STOP_SECONDS)
        self.output += read_until(self.reading, None, time.monotonic() + STOP_SECONDS)
        return self.output


@contextlib.contextmanager
def staying_demo(env: Mapping[str, str], *args: str, terminal: bool = False) -> Iterator[Staying]:
    """`postback demo ARGS`, its standard streams a terminal (a pty) when `terminal`, else
    pipes; yields it once it stays. Stopped on the way out, if the test did not stop it."""
    with tempfile.TemporaryFile() as errors:
        if terminal:
            reading, writing = os.openpty()
            stdin, stderr = writing, writing
        else:
            reading, writing = os.pipe()
            stdin, stderr = subprocess.DEVNULL, errors.fileno()
        process = subprocess.Popen(
            [*POSTBACK, "demo", *args], env=dict(env), stdin=stdin, stdout=writing, stderr=stderr
        )
        os.close(writing)
        staying = Staying(process, reading)
        try:
            staying.output = read_until(reading, STAYS, time.monotonic() + START_SECONDS)
            page = re.search(r"^ops page: (\S+)\r?$", staying.output, re.M)
            token = re.search(r"^ops token: (\S+)\r?$", staying.output, re.M)
            assert page is not None, staying.output
            assert token is not None, staying.output
            staying.url, staying.token = page[1], token[1]
            yield staying
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_SECONDS)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                staying.output += read_until(reading, None, time.monotonic() + STOP_SECONDS)
                os.close(reading)
                errors.seek(0)
                staying.stderr = errors.read().decode(errors="replace")
                leakcheck.logged(staying.stderr)


def read_until(fd: int, marker: str | None, deadline: float) -> str:
    """What `fd` gives until `marker` is in it, or until its end when `marker` is None.
    Fails with what was read when the deadline passes or the output ends first."""
    got = b""
    while marker is None or marker.encode() not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in time; the demo said:\n{got.decode(errors='replace')}"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # a pty whose other end has closed: the end of its output
            chunk = b""
        if not chunk:
            assert marker is None, f"the demo ended early:\n{got.decode(errors='replace')}"
            break
        got += chunk
    return got.decode(errors="replace")
