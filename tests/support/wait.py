"""Waiting until something has happened, where nothing says when it does."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import pytest

POLL_SECONDS = 0.01


async def until(condition: Callable[[], object], within: float = 20, what: str = "") -> float:
    """Poll `condition` (plain or async) until it returns something true; the moment it
    first did, by time.monotonic(). Fails the test after `within` seconds, saying `what`.

    Also the way to show that something did NOT happen: wait for a later thing that comes
    only after it would have (the ledger's verdict, a log line), then assert it is absent.
    """
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return time.monotonic()
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within:g} s: {what or condition}")
        await asyncio.sleep(POLL_SECONDS)
