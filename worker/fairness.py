"""Fairness between destinations: one slow or broken receiver must not take a worker's
capacity from every other affiliate.

A destination is a callback URL's origin (scheme, host, port). Per worker process:

- **Cap.** At most `max_in_flight` requests to one destination at once. A delivery over
  the cap is deferred (its job runs again shortly) rather than waiting inside a job slot,
  so a receiver that holds its requests for the whole timeout holds that many slots, not
  all of them. Each time the same delivery is put off there again, straight after the
  last time, its wait doubles, up to about a minute; what else its job waited for (its
  retry schedule, an earlier delivery, a database outage) does not count. At a destination
  that frees its slots quickly, no wait is longer than the deliveries already put off
  there take to go at its pace, so a backlog goes as fast as the receiver takes it. When
  none of its requests has started for a while (a slow destination), the deliveries put
  off for it are instead spread over a longer wait, in proportion to how many are
  waiting, rather than all coming back for the one slot that may free.
- **Circuit breaker.** The circuit opens for `open_seconds` when, of the destination's
  last `RECENT_PER_FAILURE` x `failures` requests that ended in the last `RECENT_SECONDS`,
  at least `failures` got no answer (could not connect, timed out, cut off) and they are
  at least half of them: a destination that is down, not one that mostly answers. Its
  deliveries are then deferred without spending an attempt. When the time is up one
  delivery goes through as a probe: an answer closes the circuit (and the count starts
  afresh), no answer opens it again for twice as long, up to `max_open_seconds`. An
  answer, even a 5xx, is a receiver that is up and quick to say no: its deliveries keep
  their own retry schedules, and other affiliates on the same host (a shared tracking
  platform) are not held back for one endpoint's errors.

Plain bookkeeping with the time passed in; the job does the deferring, logging and counting.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from worker.exchange import NO_ANSWER, Outcome

MAX_OPEN_SECONDS = 600.0
"""The longest a circuit stays open between probes, however many have failed."""

RECENT_SECONDS = 60.0
"""Only requests that ended this recently count toward opening a circuit: a few failures
spread over minutes are a receiver's bad moments, not an outage."""

RECENT_PER_FAILURE = 4
"""Of those, only the last this many times `failures` count: enough answers that a handful
of requests failing together (five that hung, timing out in the same instant) is not read
as an outage, few enough that a destination that goes down is noticed within seconds."""

PUT_OFF_LIMIT_SECONDS = 60.0
"""The longest a delivery is put off at a destination's cap or behind its probe, spread
included: about a minute, so a delivery is never parked long behind a backlog that has
since cleared."""

SPREAD = 1.5
"""Each put-off wait is stretched by a random factor from 1 to this, so the deliveries put
off together do not all come back in the same instant."""

AT_CAP_SECONDS = 2.0
"""About how long a delivery over the cap first waits before trying for a slot again..."""

AT_CAP_DOUBLINGS = 5
"""...doubled each time the same delivery was put off at that destination just before, up
to this many times (and to `MAX_AT_CAP_SECONDS`): a backlog of thousands for one slow
destination must not keep every worker busy putting the same deliveries off every two
seconds. Only its put-offs there in a row count (`LATE_SECONDS`): the runs its job spent
on a database outage, its retry schedule or an earlier delivery of its order were not
spent waiting for this destination."""

MAX_AT_CAP_SECONDS = PUT_OFF_LIMIT_SECONDS / SPREAD
"""The longest a delivery is put off at the cap before the spread (40 s: 40 to 60 s with
it), so the longest waits stay spread out rather than all being the limit."""

LATE_SECONDS = AT_CAP_SECONDS
"""A put-off delivery that comes back more than this after it was due was held by something
else meanwhile (a database outage, its retry schedule, an earlier delivery of its order):
its next put-off is not one more in a row, and the backlog it waited behind has moved on. A
worker runs a due job well within this unless it is overloaded, and then its lateness
spaces the put-offs out anyway."""

HOLD_SMOOTHING = 0.2
"""How far each request moves a destination's estimate of how long its requests take: a
few slow ones do not swing it."""

SLOW_SECONDS = AT_CAP_SECONDS
"""A destination at its cap where no request has started for this long frees its slots
slowly: whoever comes back for one will most likely be put off again."""

FORGET_SECONDS = 60.0
"""How often destinations with nothing in flight, waiting or failing are forgotten, with
the put-off deliveries that stayed away too long to count."""

REPORT_AGAIN_SECONDS = 3600.0
"""A circuit that stays open is reported again (`Destinations.long_open`) this long after it
last was: the hour in which ops hear of one cause once."""

Change = Literal["opened", "closed"]


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
class _PutOff:
    """A delivery put off at a destination: how many times in a row, and when it is due
    back from the last one."""

    times: int
    back: float

    def broken(self, now: float) -> bool:
        """Whether the delivery stayed away too long for its next put-off here to be one
        more in a row (`LATE_SECONDS`)."""
        return now - self.back > LATE_SECONDS


@dataclass
class _Destination:
    recent: deque[tuple[float, bool]]
    """When its last requests ended and whether each got an answer (only the last
    `RECENT_PER_FAILURE` x `failures`); emptied when its circuit opens."""
    in_flight: int = 0
    opened_for: float = 0.0
    """How long the circuit was last opened for; 0 while it is closed."""
    open_until: float = 0.0
    open_since: float = 0.0
    """When the circuit opened after it was last closed: failed probes that open it again
    leave it open all along."""
    reported_at: float | None = None
    """When it was last reported open too long (`Destinations.long_open`), this time open."""
    probing: bool = False
    last_start: float = 0.0
    """When a request to it last started."""
    hold: float = 0.0
    """About how long its requests take, from slot to answer; 0 until one has."""
    put_off: list[float] = field(default_factory=list)
    """When the deliveries put off at its cap come back (a heap)."""
    put_offs: dict[Hashable, _PutOff] = field(default_factory=dict)
    """The deliveries put off here, by the key they were admitted with, until they get a
    slot or stay away too long (`_PutOff.broken`)."""

    def expire(self, now: float) -> None:
        """Drop the put-off deliveries whose wait is over."""
        while self.put_off and self.put_off[0] <= now:
            heapq.heappop(self.put_off)

    def answers(self, now: float) -> list[bool]:
        """Whether each of its last requests that ended within `RECENT_SECONDS` got an
        answer."""
        return [answered for ended, answered in self.recent if now - ended < RECENT_SECONDS]

    def idle(self, now: float) -> bool:
        self.expire(now)
        recent = bool(self.recent) and now - self.recent[-1][0] < RECENT_SECONDS
        busy = self.in_flight or self.opened_for or self.put_off or self.put_offs or recent
        return not busy


@dataclass
class Slot:
    """Leave to send one request to `origin`; given back with `Destinations.release`."""

    origin: str
    probe: bool
    started: float
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

    def admit(self, origin: str, now: float, delivery: Hashable | None = None) -> Slot | Defer:
        """`delivery`: what identifies the delivery asking (its id), so that each time the
        same one is put off here again it waits longer; None for one never seen again."""
        if now - self._forgot_at >= FORGET_SECONDS:
            self._forget(now)
        state = self._states.get(origin)
        if state is None:
            state = self._states[origin] = _Destination(deque(maxlen=self._recent_size))
        state.expire(now)
        if state.opened_for:
            if now < state.open_until:
                return self._defer(state.open_until - now, "circuit_open")
            if state.probing:
                return self._put_off(state, delivery, now, "circuit_open")
            state.probing = True
            return self._start(state, origin, delivery, now, probe=True)
        if state.in_flight >= self.max_in_flight:
            waiting = len(state.put_off)
            slow, longest = 1.0, MAX_AT_CAP_SECONDS
            if now - state.last_start >= SLOW_SECONDS:
                slow = max(1.0, waiting / self.max_in_flight)
            elif state.hold:
                # It frees a slot every hold / max_in_flight seconds: waiting longer than
                # those put off before it take to go would only leave its slots idle.
                pace = waiting * state.hold / self.max_in_flight
                longest = min(longest, max(AT_CAP_SECONDS, pace))
            held = self._put_off(state, delivery, now, "at_cap", slow, longest)
            heapq.heappush(state.put_off, now + held.seconds)
            return held
        return self._start(state, origin, delivery, now, probe=False)

    def release(self, slot: Slot, outcome: Outcome | None, now: float) -> Change | None:
        """Give the slot back with what its request got (None: it was never sent, or was
        cancelled); says when that opened or closed the circuit. Only the first call counts."""
        if slot.released:
            return None
        slot.released = True
        state = self._states[slot.origin]
        state.in_flight -= 1
        if outcome is not None:
            took = now - slot.started
            state.hold = (
                took if not state.hold else state.hold + HOLD_SMOOTHING * (took - state.hold)
            )
        if slot.probe:
            state.probing = False
        change: Change | None = None
        if outcome is None or (outcome.status is None and outcome.error_class not in NO_ANSWER):
            # Never sent, or stopped before the wire (refused address, unusable URL): says
            # nothing of the destination either way.
            pass
        elif slot.probe:
            if outcome.status is None:
                self._open(state, now, state.opened_for * 2)
                change = "opened"
            else:
                # Back: what happened before the outage says nothing of it now.
                state.opened_for = state.open_until = state.open_since = 0.0
                state.reported_at = None
                change = "closed"
        elif not state.opened_for:
            state.recent.append((now, outcome.status is not None))
            if outcome.status is None and self._down(state, now):
                self._open(state, now, self.open_seconds)
                change = "opened"
        # Otherwise a request that was under way when the circuit opened: the probe decides.
        if state.idle(now):
            del self._states[slot.origin]  # forget destinations that are idle and well
        return change

    def long_open(self, origin: str, now: float, after: float) -> float | None:
        """How long the circuit of `origin` has been open when that is at least `after`
        seconds and it was not reported within `REPORT_AGAIN_SECONDS`; else None. Marked
        reported only by `reported`, once the report is written."""
        state = self._states.get(origin)
        if state is None or not state.opened_for or now - state.open_since < after:
            return None
        if state.reported_at is not None and now - state.reported_at < REPORT_AGAIN_SECONDS:
            return None
        return now - state.open_since

    def reported(self, origin: str, now: float) -> None:
        state = self._states.get(origin)
        if state is not None:
            state.reported_at = now

    def is_open(self, origin: str) -> bool:
        state = self._states.get(origin)
        return state is not None and state.opened_for > 0

    @property
    def _recent_size(self) -> int:
        return RECENT_PER_FAILURE * self.failures

    def _down(self, state: _Destination, now: float) -> bool:
        """The rule that opens the circuit: of its last requests that ended lately, at least
        `failures` got no answer, and they are at least half of them."""
        answers = state.answers(now)
        missed = answers.count(False)
        return missed >= self.failures and 2 * missed >= len(answers)

    def _open(self, state: _Destination, now: float, seconds: float) -> None:
        if not state.opened_for:
            state.open_since = now
        state.opened_for = min(self.max_open_seconds, seconds)
        state.open_until = now + state.opened_for
        state.recent.clear()  # until the probe's answer, nothing else counts

    def _start(
        self, state: _Destination, origin: str, delivery: Hashable | None, now: float, probe: bool
    ) -> Slot:
        if delivery is not None:
            state.put_offs.pop(delivery, None)  # it got its turn: the next wait starts short
        state.in_flight += 1
        state.last_start = now
        return Slot(origin, probe, now)

    def _put_off(
        self,
        state: _Destination,
        delivery: Hashable | None,
        now: float,
        reason: Literal["at_cap", "circuit_open"],
        slow: float = 1.0,
        longest: float = MAX_AT_CAP_SECONDS,
    ) -> Defer:
        """Put the delivery off for a wait that doubles with each time in a row it was put
        off here before, stretched by `slow`, up to `longest` (before the spread)."""
        before = None if delivery is None else state.put_offs.get(delivery)
        times = 0 if before is None or before.broken(now) else before.times
        wait = AT_CAP_SECONDS * 2 ** min(times, AT_CAP_DOUBLINGS)
        held = self._defer(min(longest, wait * slow), reason)
        if delivery is not None:
            state.put_offs[delivery] = _PutOff(times + 1, now + held.seconds)
        return held

    def _forget(self, now: float) -> None:
        """Once a minute: forget the put-off deliveries that stayed away too long to count
        (settled elsewhere, waiting for something else, or gone), and the destinations left
        with nothing to remember, so memory stays bounded by what is going on now."""
        self._forgot_at = now
        for origin, state in list(self._states.items()):
            stale = [key for key, put_off in state.put_offs.items() if put_off.broken(now)]
            for key in stale:
                del state.put_offs[key]
            if state.idle(now):
                del self._states[origin]

    def _defer(self, seconds: float, reason: Literal["at_cap", "circuit_open"]) -> Defer:
        # Spread out, so deferred deliveries do not all come back in the same instant.
        return Defer(seconds * self.rng.uniform(1.0, SPREAD), reason)
