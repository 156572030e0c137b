"""The retry policy: which failures are worth another try, and when.

Plain functions of an attempt's outcome, the attempts made so far and the schedule; the job
does the waiting. Kept free of I/O so every branch is tested without a server.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

from worker import duration
from worker.exchange import NO_ANSWER, Outcome

DEFAULT_SCHEDULE = "1m,5m,30m,2h,6h,12h,24h"
"""Waits before the 2nd, 3rd, ... attempt (docs/design.md, "Retries"): about two days of
trying in all."""

JITTER = 0.2
"""Each wait is stretched or shrunk by up to this share, so deliveries that failed together
(an affiliate's outage) do not all come back in the same second."""

RETRY_AFTER_CAP = 86_400.0
"""Longest wait a receiver's Retry-After can impose: it cannot park a delivery for weeks."""

# Status codes that say "not now" rather than "never" (docs/design.md, "Retries").
_TRANSIENT_STATUS = frozenset({408, 425, 429})
# "Too many requests": like a timeout, its wait has a floor that jitter cannot lower.
_TOO_MANY = 429


@functools.lru_cache(maxsize=16)
def parse_schedule(text: str) -> tuple[float, ...]:
    """`"1m,5m,30m"` as seconds. Units: ms, s, m, h, d. An empty schedule means no retries.

    Kept per text: every attempt's verdict reads the worker's schedule (`Settings.schedule`),
    which is the same text each time."""
    if not text.strip():
        return ()
    steps: list[float] = []
    for raw in text.split(","):
        try:
            steps.append(duration.parse(raw))
        except ValueError:
            raise ValueError(
                f"{raw.strip()!r} is not a duration; write steps like 30s, 1m, 2h or 250ms, "
                "separated by commas"
            ) from None
    return tuple(steps)


def retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a `Retry-After` header asks for, in either form RFC 9110 allows.

    Unreadable values are ignored rather than trusted: the schedule still applies.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²", which isdigit() also accepts
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT even when it forgets to say so
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


Kind = Literal["success", "transient", "permanent"]


def classify(outcome: Outcome) -> Kind:
    if outcome.ok:
        return "success"
    if outcome.status is None:
        return "transient" if outcome.error_class in NO_ANSWER else "permanent"
    if outcome.status in _TRANSIENT_STATUS or 500 <= outcome.status < 600:
        return "transient"
    # Other 4xx, and answers no client can act on (a 3xx without a usable Location, 1xx).
    return "permanent"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What follows an attempt: the delivery's next state and, for a retry, the wait."""

    state: Literal["delivered", "retrying", "dead"]
    kind: Kind
    delay: float | None = None
    reason: str | None = None
    disable_callback: bool = False


def decide(
    outcome: Outcome,
    number: int,
    schedule: tuple[float, ...],
    now: datetime,
    rng: random.Random | None = None,
    before: int = 0,
) -> Verdict:
    """The verdict on attempt `number` (1 for the first) since the last replay, if any;
    `before` attempts were made before that replay."""
    kind = classify(outcome)
    if kind == "success":
        return Verdict("delivered", kind)
    failure = describe(outcome)
    if kind == "permanent":
        if outcome.status == 410:
            return Verdict(
                "dead", kind, reason=f"{failure}: callback disabled", disable_callback=True
            )
        return Verdict("dead", kind, reason=failure)
    if number > len(schedule):
        return Verdict(
            "dead", kind, reason=f"gave up after {_gave_up(number, before)}, last: {failure}"
        )
    step = schedule[number - 1]
    delay = step * (rng or random).uniform(1 - JITTER, 1 + JITTER)
    if outcome.error_class == "timeout" or outcome.status == _TOO_MANY:
        # A receiver that is too slow or says "too many" gets at least the schedule's first
        # wait (a minute by default): coming back sooner only adds to its load.
        delay = max(delay, schedule[0])
    asked = retry_after(outcome.retry_after, now)
    if asked is not None:
        delay = max(delay, min(asked, RETRY_AFTER_CAP))
    return Verdict("retrying", kind, delay=delay, reason=failure)


def _gave_up(number: int, before: int) -> str:
    """How many attempts a dead letter had: the schedule's, and after a replay, all of
    them too, so the reason agrees with the attempts listed beside it."""
    tries = "1 attempt" if number == 1 else f"{number} attempts"
    if before:
        tries += f" since the replay ({number + before} in all)"
    return tries


def describe(outcome: Outcome) -> str:
    """One line for the ledger's reason and the logs."""
    if outcome.status is not None:
        return f"HTTP {outcome.status}"
    return f"{outcome.error_class}: {outcome.error}"
