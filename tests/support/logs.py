"""The relay's own log set-up inside a test, and the test process's set-up back after it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import structlog

from worker import logs


@contextlib.contextmanager
def relay_logs(level: str) -> Iterator[None]:
    """`logs.configure(level)` for the block, as `postback worker` runs it.

    Loggers are not cached meanwhile: a cached one would keep this set-up's processors after
    the block, and a later test's `structlog.testing.capture_logs` would not see its lines.
    """
    root = logging.getLogger()
    relay = logging.getLogger(logs.LOGGER)
    before = (root.handlers[:], root.level, relay.level)
    try:
        logs.configure(level)
        structlog.configure(cache_logger_on_first_use=False)
        yield
    finally:
        root.handlers = before[0]
        root.setLevel(before[1])
        relay.setLevel(before[2])
        structlog.reset_defaults()
