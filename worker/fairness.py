"""Fairness between destinations: one slow or broken receiver must not take a worker's
capacity from every other affiliate.

A destination is a callback URL's origin (scheme, host, port). Per worker process:

- **Cap.** At most `max_in_flight` requests to one destination at once. A delivery over
  the cap is deferred (its job runs again shortly) rather than waiting inside a job slot,
  so a receiver that holds its requests for the whole timeout holds that many slots, not
  all of them. When none of its requests has started for a while (a slow destination),
  the deliveries put off for it are spread over a longer wait, in proportion to how many
  are waiting, rather than all coming back for the one slot that may free.
- **Circuit breaker.** After `failures` requests in a row that got no answer (could not
  connect, timed out, cut off), the destination's circuit opens for `open_seconds`: its
  deliveries are deferred until then without spending an attempt. Then one delivery goes
  through as a probe: an answer closes the circuit, no answer opens it again for twice as
  long, up to `max_open_seconds`. An answer, even a 5xx, is a receiver that is up and
  quick to say no: its deliveries keep their own retry schedules, and other affiliates on
  the same host (a shared tracking platform) are not held back for one endpoint's errors.

Plain bookkeeping with the time passed in; the job does the deferring, logging and counting.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from worker.deliver import Outcome

MAX_OPEN_SECONDS = 600.0
"""The longest a circuit stays open between probes, however many have failed."""

AT_CAP_SECONDS = 2.0
"""About how long a delivery over the cap first waits before trying for a slot again..."""

AT_CAP_DOUBLINGS = 5
"""...doubled each time its job has run before, up to this many times (about a minute):
a backlog of thousands for one slow destination must not keep every worker busy putting
the same deliveries off every two seconds."""

MAX_AT_CAP_SECONDS = AT_CAP_SECONDS * 2**AT_CAP_DOUBLINGS
"""The longest a delivery is put off at the cap (before jitter)."""

SLOW_SECONDS = AT_CAP_SECONDS
"""A destination at its cap where no request has started for this long frees its slots
slowly: whoever comes back for one will most likely be put off again."""

FORGET_SECONDS = 60.0
"""How often destinations with nothing in flight, waiting or failing are forgotten."""

Change = Literal["opened", "closed"]

NO_ANSWER = frozenset({"connect_error", "timeout", "http_error"})
"""Failures that say the destination is down or stuck, as opposed to answering."""


def destination(url: str) -> str:
    """What deliveries are capped and circuits broken by: the URL's scheme, host and port
    (`https://t.example:443`). A template's host is literal, so its source gives the same
    answer as every URL rendered from it."""
    split = urlsplit(url)
    scheme = split.scheme.lower()
    host = split.hostname or ""
    try:
        port = split.port or (443 if scheme == "https" else 80)
    except ValueError:
        # A stored URL edited by hand; never its user info, which is logged with it.
        return f"{scheme}://{split.netloc.rpartition('@')[2].lower()}"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


@dataclass
class _Destination:
    in_flight: int = 0
    failures: int = 0
    """Transient failures in a row."""
    opened_for: float = 0.0
    """How long the circuit was last opened for; 0 while it is closed."""
    open_until: float = 0.0
    probing: bool = False
    last_start: float = 0.0
    """When a request to it last started."""
    put_off: list[float] = field(default_factory=list)
    """When the deliveries put off at its cap come back (a heap)."""

    def expire(self, now: float) -> None:
        """Drop the put-off deliveries whose wait is over."""
        while self.put_off and self.put_off[0] <= now:
            heapq.heappop(self.put_off)

    def idle(self, now: float) -> bool:
        self.expire(now)
        return not (self.in_flight or self.failures or self.opened_for or self.put_off)


@dataclass
class Slot:
    """Leave to send one request to `origin`; given back with `Destinations.release`."""

    origin: str
    probe: bool
    released: bool = False


@dataclass(frozen=True, slots=True)
class Defer:
    """Not now: try again in `seconds`, and why."""

    seconds: float
    reason: Literal["at_cap", "circuit_open"]


@dataclass
class Destinations:
    max_in_flight: int
    failures: int
    open_seconds: float
    max_open_seconds: float
    rng: random.Random = field(default_factory=random.Random)
    _states: dict[str, _Destination] = field(default_factory=dict, init=False, repr=False)
    _forgot_at: float = field(default=0.0, init=False, repr=False)

    def admit(self, origin: str, now: float, runs: int = 0) -> Slot | Defer:
        """`runs`: how many times the delivery's job ran before, which stretches its wait
        when it has to wait again."""
        if now - self._forgot_at >= FORGET_SECONDS:
            self._forgot_at = now
            for gone in [o for o, s in self._states.items() if s.idle(now)]:
                del self._states[gone]
        state = self._states.setdefault(origin, _Destination())
        state.expire(now)
        backoff = AT_CAP_SECONDS * 2 ** min(runs, AT_CAP_DOUBLINGS)
        if state.opened_for:
            if now < state.open_until:
                return self._defer(state.open_until - now, "circuit_open")
            if state.probing:
                return self._defer(backoff, "circuit_open")
            state.probing = True
            state.in_flight += 1
            state.last_start = now
            return Slot(origin, probe=True)
        if state.in_flight >= self.max_in_flight:
            if now - state.last_start >= SLOW_SECONDS:
                waiting = len(state.put_off) / self.max_in_flight
                backoff = min(MAX_AT_CAP_SECONDS, backoff * max(1.0, waiting))
            held = self._defer(backoff, "at_cap")
            heapq.heappush(state.put_off, now + held.seconds)
            return held
        state.in_flight += 1
        state.last_start = now
        return Slot(origin, probe=False)

    def release(self, slot: Slot, outcome: Outcome | None, now: float) -> Change | None:
        """Give the slot back with what its request got (None: it was never sent, or was
        cancelled); says when that opened or closed the circuit. Only the first call counts."""
        if slot.released:
            return None
        slot.released = True
        state = self._states[slot.origin]
        state.in_flight -= 1
        if slot.probe:
            state.probing = False
        change: Change | None = None
        if outcome is None or (outcome.status is None and outcome.error_class not in NO_ANSWER):
            # Never sent, or stopped before the wire (refused address, unusable URL): says
            # nothing of the destination either way.
            pass
        elif outcome.status is None:
            state.failures += 1
            if slot.probe or (not state.opened_for and state.failures >= self.failures):
                state.opened_for = min(
                    self.max_open_seconds,
                    state.opened_for * 2 if state.opened_for else self.open_seconds,
                )
                state.open_until = now + state.opened_for
                change = "opened"
        else:
            if state.opened_for and slot.probe:
                change = "closed"
            if slot.probe or not state.opened_for:
                state.failures = 0
                state.opened_for = state.open_until = 0.0
        if state.idle(now):
            del self._states[slot.origin]  # forget destinations that are idle and well
        return change

    def is_open(self, origin: str) -> bool:
        state = self._states.get(origin)
        return state is not None and state.opened_for > 0

    def _defer(self, seconds: float, reason: Literal["at_cap", "circuit_open"]) -> Defer:
        # Spread out, so deferred deliveries do not all come back in the same instant.
        return Defer(seconds * self.rng.uniform(1.0, 1.5), reason)
