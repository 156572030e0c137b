"""The retry policy (README, "Retries, dead letters and ordering") as plain functions, and
its configuration; no servers needed.

`decide` gets the jitter from a random.Random: seeded ones show the spread, and `Extreme`
(which always answers a bound of the range asked for) shows the shortest and longest wait.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import asyncpg
import pydantic
import pytest

from tests.support.cli import (
    UNREACHABLE_DATABASE,
    UNREACHABLE_REDIS,
    Postback,
    clean_env,
    refusal,
)
from worker import database
from worker.config import Settings
from worker.exchange import ErrorClass, Outcome
from worker.retry import (
    DEFAULT_SCHEDULE,
    JITTER,
    RETRY_AFTER_CAP,
    Verdict,
    classify,
    decide,
    parse_schedule,
    retry_after,
)

NOW = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
SCHEDULE = (60.0, 300.0, 1800.0)  # "1m,5m,30m"
SEEDS = range(50)


class Extreme(random.Random):
    """Jitter at one end of its range: `uniform` returns the lower or the upper bound."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high
        self.asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.asked.append((a, b))
        return b if self.high else a


LOWEST, HIGHEST = Extreme(high=False), Extreme(high=True)


def status(code: int, retry_after: str | None = None) -> Outcome:
    headers = () if retry_after is None else (("Retry-After", retry_after),)
    return Outcome(code, 12.5, excerpt="body", headers=headers)


def error(error_class: ErrorClass, message: str = "it broke") -> Outcome:
    return Outcome(None, 12.5, error_class, message)


def wait(outcome: Outcome, attempts: int, schedule: tuple[float, ...], rng: random.Random) -> float:
    """The delay of a verdict that must be a retry."""
    verdict = decide(outcome, attempts, schedule, NOW, rng)
    assert verdict.state == "retrying", verdict
    assert verdict.delay is not None
    return verdict.delay


def http_date(moment: datetime) -> str:
    """`moment` as an IMF-fixdate, the form RFC 9110 asks senders to use."""
    return format_datetime(moment.astimezone(UTC), usegmt=True)


# --- parse_schedule --------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", (0.25,)),
        ("30s", (30.0,)),
        ("1m", (60.0,)),
        ("2h", (7200.0,)),
        ("1d", (86400.0,)),
        ("1.5m", (90.0,)),
        ("0.5s", (0.5,)),
        ("1.25h", (4500.0,)),
        ("10ms,20ms", (0.01, 0.02)),
        (" 1m , 5m ,30m ", (60.0, 300.0, 1800.0)),
        ("\t2h,\n1d", (7200.0, 86400.0)),
        (DEFAULT_SCHEDULE, (60.0, 300.0, 1800.0, 7200.0, 21600.0, 43200.0, 86400.0)),
    ],
)
def test_parse_schedule_reads_every_unit(text: str, seconds: tuple[float, ...]) -> None:
    assert parse_schedule(text) == pytest.approx(seconds)


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", " ", "\t\n"])
def test_an_empty_schedule_means_no_retries(text: str) -> None:
    assert parse_schedule(text) == ()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "bad"),
    [
        pytest.param("5x", "5x", id="unknown-unit"),
        pytest.param("1M", "1M", id="units-are-lowercase"),
        pytest.param("1", "1", id="no-unit"),
        pytest.param("m", "m", id="no-number"),
        pytest.param("1 m", "1 m", id="space-inside"),
        pytest.param("-1s", "-1s", id="negative"),
        pytest.param("+1s", "+1s", id="signed"),
        pytest.param("1.m", "1.m", id="bare-point"),
        pytest.param(".5s", ".5s", id="no-integer-part"),
        pytest.param("1e3s", "1e3s", id="exponent"),
        pytest.param("1m5s", "1m5s", id="compound"),
        pytest.param("ten s", "ten s", id="words"),
        pytest.param("1m,5x,2h", "5x", id="one-bad-among-good"),
        pytest.param("1m 5m", "1m 5m", id="no-comma"),
        pytest.param("1m;5m", "1m;5m", id="wrong-separator"),
        pytest.param("1m,,5m", "", id="empty-item"),
        pytest.param("1m,", "", id="trailing-comma"),
        pytest.param(",1m", "", id="leading-comma"),
    ],
)
def test_parse_schedule_refuses_bad_input_naming_the_item(text: str, bad: str) -> None:
    with pytest.raises(ValueError, match="is not a duration") as raised:
        parse_schedule(text)

    assert repr(bad) in str(raised.value)


@pytest.mark.unit
def test_parse_schedule_names_only_the_bad_item() -> None:
    with pytest.raises(ValueError, match="is not a duration") as raised:
        parse_schedule("1m,5x,2h")

    assert str(raised.value).startswith("'5x' ")
    assert "'1m'" not in str(raised.value)
    assert "'2h'" not in str(raised.value)


# --- retry_after -----------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("1", 1.0), ("120", 120.0), (" 120 ", 120.0), ("86400", 86400.0)],
)
def test_retry_after_in_delta_seconds(value: str, seconds: float) -> None:
    assert retry_after(value, NOW) == seconds


@pytest.mark.unit
@pytest.mark.parametrize("ahead", [1, 90, 3600, 2 * 86400])
def test_retry_after_as_an_http_date_is_seconds_from_now(ahead: int) -> None:
    value = http_date(NOW + timedelta(seconds=ahead))

    assert retry_after(value, NOW) == ahead


@pytest.mark.unit
def test_retry_after_reads_a_literal_imf_fixdate() -> None:
    assert retry_after("Sat, 21 Nov 2026 10:01:30 GMT", NOW) == 90.0


@pytest.mark.unit
def test_retry_after_counts_from_the_given_now() -> None:
    value = http_date(NOW + timedelta(seconds=300))

    assert retry_after(value, NOW + timedelta(seconds=100)) == 200.0


@pytest.mark.unit
@pytest.mark.parametrize("behind", [1, 3600, 10 * 365 * 86400])
def test_retry_after_in_the_past_is_zero(behind: int) -> None:
    assert retry_after(http_date(NOW - timedelta(seconds=behind)), NOW) == 0.0


@pytest.mark.unit
def test_retry_after_at_exactly_now_is_zero() -> None:
    assert retry_after(http_date(NOW), NOW) == 0.0


@pytest.mark.unit
@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "soon",
        "1.5",
        "-5",
        "+5",
        "12 apples",
        "0x10",
        "Sat, 31 Feb 2026 10:00:00 GMT",  # no such day
        "Sat, 21 Nov 2026 25:00:00 GMT",  # no such hour
        "tomorrow at noon",
    ],
)
def test_unreadable_retry_after_is_ignored(value: str) -> None:
    assert retry_after(value, NOW) is None


@pytest.mark.unit
def test_no_retry_after_is_none() -> None:
    assert retry_after(None, NOW) is None


@pytest.mark.unit
@pytest.mark.parametrize("value", ["²", "1²", "³"])
def test_a_retry_after_of_unicode_digits_is_ignored(value: str) -> None:
    # str.isdigit() accepts them; float() does not, and a receiver can send them.
    assert retry_after(value, NOW) is None
    assert decide(status(503, retry_after=value), 1, SCHEDULE, NOW, LOWEST).delay == 48.0


# --- classify --------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("code", [200, 201, 202, 204, 226, 299])
def test_2xx_is_success(code: int) -> None:
    assert status(code).ok
    assert classify(status(code)) == "success"


@pytest.mark.unit
@pytest.mark.parametrize("code", [408, 425, 429, 500, 501, 502, 503, 504, 599])
def test_transient_statuses(code: int) -> None:
    assert classify(status(code)) == "transient"


@pytest.mark.unit
@pytest.mark.parametrize(
    "code",
    [
        *(400, 401, 403, 404, 405, 406, 409, 410, 411, 413, 415, 422, 451, 499),
        *(300, 301, 302, 303, 304, 307, 308),  # redirects aiohttp did not follow
        *(100, 101, 103),
    ],
)
def test_permanent_statuses(code: int) -> None:
    assert classify(status(code)) == "permanent"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("error_class", "kind"),
    [
        ("connect_error", "transient"),
        ("timeout", "transient"),
        ("http_error", "transient"),
        ("too_many_redirects", "permanent"),
    ],
)
def test_errors_before_an_answer(error_class: ErrorClass, kind: str) -> None:
    assert not error(error_class).ok
    assert classify(error(error_class)) == kind


# --- decide: success and permanent failures --------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("code", [200, 201, 204, 299])
@pytest.mark.parametrize("attempts", [1, 2, len(SCHEDULE) + 1])
def test_2xx_is_delivered(code: int, attempts: int) -> None:
    assert decide(status(code), attempts, SCHEDULE, NOW) == Verdict("delivered", "success")


@pytest.mark.unit
def test_404_is_dead_at_once() -> None:
    verdict = decide(status(404), 1, SCHEDULE, NOW, random.Random(1))

    assert verdict == Verdict("dead", "permanent", reason="HTTP 404")
    assert not verdict.disable_callback


@pytest.mark.unit
@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (status(400), "HTTP 400"),
        (status(401), "HTTP 401"),
        (status(403), "HTTP 403"),
        (status(405), "HTTP 405"),
        (status(409), "HTTP 409"),
        (status(422), "HTTP 422"),
        (status(301), "HTTP 301"),
        (status(101), "HTTP 101"),
        (status(422, retry_after="60"), "HTTP 422"),  # Retry-After cannot revive it
        (
            error("too_many_redirects", "more than 3 redirects"),
            "too_many_redirects: more than 3 redirects",
        ),
    ],
)
def test_other_permanent_failures_are_dead_at_once(outcome: Outcome, reason: str) -> None:
    verdict = decide(outcome, 1, SCHEDULE, NOW, random.Random(1))

    assert verdict == Verdict("dead", "permanent", reason=reason)


@pytest.mark.unit
def test_410_is_dead_and_disables_the_callback() -> None:
    verdict = decide(status(410), 1, SCHEDULE, NOW, random.Random(1))

    assert verdict.state == "dead"
    assert verdict.kind == "permanent"
    assert verdict.disable_callback is True
    assert verdict.delay is None
    assert verdict.reason is not None
    assert verdict.reason.startswith("HTTP 410")
    assert "disabled" in verdict.reason


# --- decide: retries -------------------------------------------------------------------

TRANSIENT = [
    pytest.param(status(503), "HTTP 503", id="503"),
    pytest.param(status(500), "HTTP 500", id="500"),
    pytest.param(status(408), "HTTP 408", id="408"),
    pytest.param(status(425), "HTTP 425", id="425"),
    pytest.param(status(429), "HTTP 429", id="429"),
    pytest.param(error("connect_error", "refused"), "connect_error: refused", id="connect"),
    pytest.param(error("timeout", "too slow"), "timeout: too slow", id="timeout"),
    pytest.param(error("http_error", "reset"), "http_error: reset", id="http-error"),
]
# Neither slowed down by the first step's floor nor asking for a wait of their own.
PLAIN_TRANSIENT = [
    pytest.param(status(503), id="503"),
    pytest.param(status(408), id="408"),
    pytest.param(error("connect_error"), id="connect"),
    pytest.param(error("http_error"), id="http-error"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("outcome", "reason"), TRANSIENT)
@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_transient_failure_within_the_schedule_retries_after_its_step(
    outcome: Outcome, reason: str, attempts: int
) -> None:
    step = SCHEDULE[attempts - 1]
    for seed in SEEDS:
        verdict = decide(outcome, attempts, SCHEDULE, NOW, random.Random(seed))

        assert verdict.state == "retrying"
        assert verdict.kind == "transient"
        assert verdict.reason == reason
        assert not verdict.disable_callback
        assert verdict.delay is not None
        assert step * (1 - JITTER) <= verdict.delay <= step * (1 + JITTER), seed


@pytest.mark.unit
def test_jitter_is_about_twenty_percent() -> None:
    assert JITTER == 0.2  # README: stretched or shrunk by up to 20 %


@pytest.mark.unit
@pytest.mark.parametrize("outcome", PLAIN_TRANSIENT)
def test_jitter_spreads_the_waits_and_a_seed_repeats_them(outcome: Outcome) -> None:
    delays = [wait(outcome, 2, SCHEDULE, random.Random(seed)) for seed in SEEDS]
    again = [wait(outcome, 2, SCHEDULE, random.Random(seed)) for seed in SEEDS]

    assert delays == again
    assert len(set(delays)) == len(delays)  # deliveries failing together come back apart
    assert min(delays) < 300.0 < max(delays)


@pytest.mark.unit
@pytest.mark.parametrize("outcome", PLAIN_TRANSIENT)
@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_jitter_extremes_are_the_step_plus_or_minus_twenty_percent(
    outcome: Outcome, attempts: int
) -> None:
    step = SCHEDULE[attempts - 1]
    lowest, highest = Extreme(high=False), Extreme(high=True)

    low = decide(outcome, attempts, SCHEDULE, NOW, lowest)
    high = decide(outcome, attempts, SCHEDULE, NOW, highest)

    assert low.delay == pytest.approx(step * 0.8)
    assert high.delay == pytest.approx(step * 1.2)
    assert lowest.asked == highest.asked == [(1 - JITTER, 1 + JITTER)]


@pytest.mark.unit
def test_the_default_schedule_is_followed_step_by_step() -> None:
    schedule = parse_schedule(DEFAULT_SCHEDULE)
    for attempts, step in enumerate(schedule, start=1):
        low = decide(status(503), attempts, schedule, NOW, LOWEST)
        high = decide(status(503), attempts, schedule, NOW, HIGHEST)
        assert (low.state, high.state) == ("retrying", "retrying")
        assert low.delay == pytest.approx(step * 0.8)
        assert high.delay == pytest.approx(step * 1.2)

    last = decide(status(503), len(schedule) + 1, schedule, NOW, LOWEST)
    assert last.state == "dead"


@pytest.mark.unit
@pytest.mark.parametrize(("outcome", "failure"), TRANSIENT)
def test_after_the_schedule_the_delivery_is_dead(outcome: Outcome, failure: str) -> None:
    verdict = decide(outcome, len(SCHEDULE) + 1, SCHEDULE, NOW, random.Random(1))

    assert verdict == Verdict(
        "dead", "transient", reason=f"gave up after 4 attempts, last: {failure}"
    )
    assert not verdict.disable_callback


@pytest.mark.unit
def test_a_retry_after_does_not_extend_the_schedule() -> None:
    verdict = decide(status(503, retry_after="10"), len(SCHEDULE) + 1, SCHEDULE, NOW, LOWEST)

    assert verdict.state == "dead"
    assert verdict.delay is None


@pytest.mark.unit
@pytest.mark.parametrize(("outcome", "failure"), TRANSIENT)
def test_an_empty_schedule_dead_letters_the_first_transient_failure(
    outcome: Outcome, failure: str
) -> None:
    verdict = decide(outcome, 1, (), NOW, random.Random(1))

    assert verdict == Verdict(
        "dead", "transient", reason=f"gave up after 1 attempt, last: {failure}"
    )


@pytest.mark.unit
def test_a_one_step_schedule_gives_two_attempts() -> None:
    assert decide(status(503), 1, (5.0,), NOW, LOWEST).state == "retrying"
    assert decide(status(503), 2, (5.0,), NOW, LOWEST) == Verdict(
        "dead", "transient", reason="gave up after 2 attempts, last: HTTP 503"
    )


@pytest.mark.unit
def test_after_a_replay_the_reason_counts_the_attempts_since_and_in_all() -> None:
    """Beside a list that shows 6 tries, "gave up after 3 attempts" alone would mislead."""
    schedule = (5.0, 5.0)
    after_replay = decide(status(500), 3, schedule, NOW, LOWEST, before=3)
    assert after_replay == Verdict(
        "dead",
        "transient",
        reason="gave up after 3 attempts since the replay (6 in all), last: HTTP 500",
    )
    # The schedule still counts from the replay: the first retry after it waits its step.
    assert decide(status(500), 1, schedule, NOW, LOWEST, before=3).delay == pytest.approx(4.0)
    assert decide(status(500), 1, (), NOW, LOWEST, before=1).reason == (
        "gave up after 1 attempt since the replay (2 in all), last: HTTP 500"
    )


# --- decide: slow receivers and Retry-After --------------------------------------------

SLOW = [
    pytest.param(error("timeout", "too slow"), id="timeout"),
    pytest.param(status(429), id="429"),
]


@pytest.mark.unit
@pytest.mark.parametrize("outcome", SLOW)
def test_timeouts_and_429_wait_at_least_the_first_step(outcome: Outcome) -> None:
    verdict = decide(outcome, 1, SCHEDULE, NOW, LOWEST)

    assert verdict.state == "retrying"
    assert verdict.delay == SCHEDULE[0]  # not 0.8 of it
    # Other transient failures do get the shorter wait.
    assert decide(status(503), 1, SCHEDULE, NOW, LOWEST).delay == pytest.approx(48.0)


@pytest.mark.unit
@pytest.mark.parametrize("outcome", SLOW)
def test_the_first_step_floor_holds_for_later_shorter_steps(outcome: Outcome) -> None:
    schedule = (60.0, 10.0, 1.0)
    for attempts in (2, 3):
        for rng in (LOWEST, HIGHEST, *(random.Random(seed) for seed in SEEDS)):
            verdict = decide(outcome, attempts, schedule, NOW, rng)
            assert verdict.delay == 60.0
    assert decide(status(503), 3, schedule, NOW, LOWEST).delay == pytest.approx(0.8)


@pytest.mark.unit
@pytest.mark.parametrize("outcome", SLOW)
@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_timeouts_and_429_never_wait_less_than_the_first_step(
    outcome: Outcome, attempts: int
) -> None:
    for seed in SEEDS:
        verdict = decide(outcome, attempts, SCHEDULE, NOW, random.Random(seed))
        assert verdict.delay is not None
        assert verdict.delay >= SCHEDULE[0]
        assert verdict.delay <= SCHEDULE[attempts - 1] * 1.2


@pytest.mark.unit
@pytest.mark.parametrize("code", [503, 429])
@pytest.mark.parametrize(
    "value", ["200", http_date(NOW + timedelta(seconds=200))], ids=["seconds", "http-date"]
)
def test_retry_after_raises_the_delay_to_what_it_asks(code: int, value: str) -> None:
    for rng in (LOWEST, HIGHEST, *(random.Random(seed) for seed in SEEDS)):
        verdict = decide(status(code, retry_after=value), 1, SCHEDULE, NOW, rng)

        assert verdict.state == "retrying"
        assert verdict.delay == 200.0  # above even the longest jittered first step (72 s)


@pytest.mark.unit
def test_retry_after_longer_than_the_jittered_step_wins_only_when_longer() -> None:
    # Step 2 is 240..360 s: asking 330 s raises the short waits and leaves the long ones.
    low = decide(status(503, retry_after="330"), 2, SCHEDULE, NOW, LOWEST)
    high = decide(status(503, retry_after="330"), 2, SCHEDULE, NOW, HIGHEST)

    assert low.delay == 330.0
    assert high.delay == pytest.approx(360.0)


@pytest.mark.unit
def test_the_retry_after_cap_is_a_day() -> None:
    assert RETRY_AFTER_CAP == 86400.0


@pytest.mark.unit
@pytest.mark.parametrize(
    "value",
    [
        "86401",
        "999999",
        http_date(NOW + timedelta(days=30)),
        http_date(NOW + timedelta(days=1, seconds=1)),
        str(10**30),
    ],
    ids=["just-above", "seconds", "http-date", "http-date-just-above", "huge"],
)
@pytest.mark.parametrize("outcome", [status(503), status(429)], ids=["503", "429"])
def test_retry_after_is_capped(outcome: Outcome, value: str) -> None:
    asking = dataclasses.replace(outcome, headers=(("retry-after", value),))
    for rng in (LOWEST, HIGHEST, random.Random(7)):
        assert wait(asking, 1, SCHEDULE, rng) == RETRY_AFTER_CAP


@pytest.mark.unit
@pytest.mark.parametrize(
    "value", ["86400", http_date(NOW + timedelta(days=1))], ids=["seconds", "http-date"]
)
def test_retry_after_at_the_cap_is_honoured(value: str) -> None:
    assert wait(status(503, retry_after=value), 1, SCHEDULE, LOWEST) == RETRY_AFTER_CAP


@pytest.mark.unit
@pytest.mark.parametrize(
    ("schedule", "value"),
    [
        (SCHEDULE, "7200"),  # beyond the schedule's longest step (30 m): still honoured
        (SCHEDULE, "43200"),
        ((0.01, 0.02), "3600"),  # even when the schedule itself is quick
    ],
)
def test_retry_after_below_the_cap_is_honoured_whatever_the_schedule(
    schedule: tuple[float, ...], value: str
) -> None:
    assert wait(status(503, retry_after=value), 1, schedule, LOWEST) == float(value)


@pytest.mark.unit
def test_the_cap_never_shortens_the_schedule_own_wait() -> None:
    # A 2-day step, jittered up to 1.2 x 172800 s, is longer than the cap; a long
    # Retry-After leaves it so.
    schedule = (60.0, 172800.0)
    asking = status(503, retry_after="999999")

    assert wait(asking, 2, schedule, HIGHEST) == pytest.approx(207360.0)
    assert wait(asking, 2, schedule, LOWEST) == pytest.approx(138240.0)


@pytest.mark.unit
@pytest.mark.parametrize(
    "value",
    ["10", "0", http_date(NOW + timedelta(seconds=10)), http_date(NOW - timedelta(hours=1))],
    ids=["seconds", "zero", "http-date", "past-date"],
)
@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_a_shorter_retry_after_does_not_shorten_the_wait(value: str, attempts: int) -> None:
    for rng in (LOWEST, HIGHEST):
        plain = decide(status(503), attempts, SCHEDULE, NOW, rng)
        asked = decide(status(503, retry_after=value), attempts, SCHEDULE, NOW, rng)
        assert asked.delay == plain.delay


@pytest.mark.unit
def test_a_shorter_retry_after_does_not_lift_the_floor_of_a_429() -> None:
    verdict = decide(status(429, retry_after="5"), 1, SCHEDULE, NOW, LOWEST)

    assert verdict.delay == SCHEDULE[0]


@pytest.mark.unit
@pytest.mark.parametrize("value", ["soon", "1.5", "-30", ""])
def test_an_unreadable_retry_after_leaves_the_schedule(value: str) -> None:
    verdict = decide(status(503, retry_after=value), 2, SCHEDULE, NOW, LOWEST)

    assert verdict.delay == pytest.approx(240.0)


# --- Settings --------------------------------------------------------------------------


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment without any POSTBACK_* setting of the shell running the tests."""
    for name in list(os.environ):
        if name.startswith("POSTBACK_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10s, 1.5m,2h", (10.0, 90.0, 7200.0)),
        ("250ms", (0.25,)),
        ("1d,1d", (86400.0, 86400.0)),
        ("", ()),
    ],
)
def test_the_retry_schedule_comes_from_the_environment(
    environ: pytest.MonkeyPatch, value: str, seconds: tuple[float, ...]
) -> None:
    environ.setenv("POSTBACK_RETRY_SCHEDULE", value)

    settings = Settings()

    assert settings.retry_schedule == value
    assert settings.schedule == pytest.approx(seconds)


@pytest.mark.unit
def test_the_default_retry_schedule(environ: pytest.MonkeyPatch) -> None:
    assert Settings().schedule == (60.0, 300.0, 1800.0, 7200.0, 21600.0, 43200.0, 86400.0)


@pytest.mark.unit
@pytest.mark.parametrize(("value", "bad"), [("5x", "5x"), ("1m,5x,2h", "5x"), ("1m,,5m", "")])
def test_a_bad_retry_schedule_is_refused_naming_the_item(
    environ: pytest.MonkeyPatch, value: str, bad: str
) -> None:
    environ.setenv("POSTBACK_RETRY_SCHEDULE", value)

    with pytest.raises(pydantic.ValidationError) as raised:
        Settings()

    errors = raised.value.errors(include_url=False)
    assert [error["loc"] for error in errors] == [("retry_schedule",)]
    assert repr(bad) in errors[0]["msg"]
    assert "is not a duration" in errors[0]["msg"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("connect", "request_", "job", "least"),
    [
        (None, None, "15.5", "15.5"),  # the defaults: 5 + 0.5 + 10
        (None, None, "15", "15.5"),
        ("1", "3", "4.5", "4.5"),
        ("1", "3", "2", "4.5"),
        ("2.5", "7", "10", "10"),
    ],
)
def test_a_job_timeout_not_above_its_request_is_refused(
    environ: pytest.MonkeyPatch, connect: str | None, request_: str | None, job: str, least: str
) -> None:
    if connect is not None:
        environ.setenv("POSTBACK_CONNECT_TIMEOUT", connect)
    if request_ is not None:
        environ.setenv("POSTBACK_REQUEST_TIMEOUT", request_)
    environ.setenv("POSTBACK_JOB_TIMEOUT", job)

    with pytest.raises(pydantic.ValidationError, match="POSTBACK_JOB_TIMEOUT") as raised:
        Settings()

    assert f"more than {least} s" in str(raised.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("connect", "request_", "job"),
    [(None, None, "15.6"), (None, None, "60"), ("1", "3", "4.51"), ("1", "3", "5")],
)
def test_a_job_timeout_above_its_request_is_accepted(
    environ: pytest.MonkeyPatch, connect: str | None, request_: str | None, job: str
) -> None:
    if connect is not None:
        environ.setenv("POSTBACK_CONNECT_TIMEOUT", connect)
    if request_ is not None:
        environ.setenv("POSTBACK_REQUEST_TIMEOUT", request_)
    environ.setenv("POSTBACK_JOB_TIMEOUT", job)

    assert Settings().job_timeout == float(job)


# --- the CLI ---------------------------------------------------------------------------


@pytest.fixture
def offline_postback(tmp_path: Path) -> Postback:
    """`postback` with servers nobody listens on: a command that got past its settings
    would fail to connect rather than start embedded servers."""
    env = clean_env()
    env["POSTBACK_DATABASE_URL"] = UNREACHABLE_DATABASE
    env["POSTBACK_REDIS_URL"] = UNREACHABLE_REDIS
    env["POSTBACK_DATA_DIR"] = str(tmp_path / "data")
    return Postback(env, tmp_path)


@pytest.mark.parametrize("args", [["worker"], ["worker", "--burst"]], ids=" ".join)
def test_worker_with_a_bad_retry_schedule_is_refused_in_one_line(
    offline_postback: Postback, args: list[str]
) -> None:
    result = offline_postback(*args, env_overrides={"POSTBACK_RETRY_SCHEDULE": "5x"})

    line = refusal(result)
    assert "bad configuration" in line
    assert "POSTBACK_RETRY_SCHEDULE" in line
    assert "'5x'" in line


def test_worker_with_too_short_a_job_timeout_is_refused_in_one_line(
    offline_postback: Postback,
) -> None:
    result = offline_postback("worker", env_overrides={"POSTBACK_JOB_TIMEOUT": "15"})

    line = refusal(result)
    assert "bad configuration" in line
    assert "POSTBACK_JOB_TIMEOUT" in line


# --- which database failures are waited out --------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError("connection refused"), True),
        (TimeoutError(), True),
        (asyncpg.ConnectionDoesNotExistError("gone"), True),
        (asyncpg.InternalClientError("cannot switch to state 15"), True),
        (asyncpg.AdminShutdownError("terminating connection"), True),
        (asyncpg.DeadlockDetectedError("deadlock"), True),
        (asyncpg.SerializationError("could not serialize"), True),
        (asyncpg.LockNotAvailableError("lock"), True),
        (asyncpg.ObjectNotInPrerequisiteStateError("not accepting connections"), True),
        (asyncpg.CheckViolationError("violates check constraint"), False),
        (asyncpg.UndefinedColumnError("column does not exist"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_passing_database_failures_are_waited_out(exc: Exception, transient: bool) -> None:
    assert database.transient(exc) is transient


@pytest.mark.unit
def test_a_postgres_error_is_described_without_the_row_it_quotes() -> None:
    exc = asyncpg.CheckViolationError("violates check constraint")
    exc.detail = "Failing row contains (https://t.example/pb?token=SeCrEt123)."
    assert "SeCrEt123" in str(exc)
    assert database.describe(exc) == "CheckViolationError (SQLSTATE 23514)"


def test_the_pure_rules_load_without_the_http_client() -> None:
    """The retry policy, the per-destination fairness and the ledger decide and record from
    plain values (worker.exchange): loading them loads neither aiohttp nor the module that
    sends requests."""
    code = "import sys, worker.retry, worker.fairness, worker.ledger; print(*sorted(sys.modules))"
    ran = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = ran.stdout.split()
    assert "worker.exchange" in loaded  # the values they decide from did load
    http = [name for name in loaded if name.partition(".")[0] == "aiohttp"]
    assert (http, "worker.deliver" in loaded) == ([], False)
