"""Template filters: what each renders, every refusal at save time, a POST body's
`rendered_query`, the README's tables, and properties over random events and chains: a
filtered value stays data and is what an independent reading of its filters gives.

The tests at the end run the real CLI, service and worker; the rest are `unit`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer import Producer
from producer.event import Event, parse_event
from tests.support.cli import Postback, postback_env, refusal, succeeded
from tests.support.events import event_data, save_callback
from tests.support.generated import AMOUNTS, EVENTS, MANY, VALID_TIME
from tests.support.receivers import Receiver
from tests.support.samples import make_event
from tests.support.samples import refusal as refusal_of
from tests.support.service import Api
from tests.support.workers import drain
from worker import deliver, sign
from worker.config import Settings
from worker.filters import (
    KNOWN_FILTERS,
    Cents,
    Date,
    Decimals,
    Default,
    Map,
    Tz,
    Unix,
    Upper,
)
from worker.render import (
    KNOWN_VARIABLES,
    Variable,
    body,
    check_new,
    parse,
    render,
    variables,
)

unit = pytest.mark.unit

README = Path(__file__).resolve().parent.parent / "README.md"
BASE = "https://t.example/?v="
BERLIN = ZoneInfo("Europe/Berlin")
OCCURRED_AT = "2026-11-21T10:00:00+00:00"


def filtered(snippet: str, values: dict[str, str]) -> str:
    """What one variable with its filters, `snippet`, renders for `values`, decoded."""
    url = render(parse(BASE + snippet), values)
    [(name, value)] = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    assert name == "v"
    return value


# --- what each filter renders --------------------------------------------------------------


@unit
@pytest.mark.parametrize(
    ("snippet", "values", "rendered"),
    [
        ("{{ order.amount | cents }}", {"order.amount": "10.50"}, "1050"),
        ("{{ order.commission | decimals: 2 }}", {"order.commission": "1.005"}, "1.01"),
        ("{{ order.currency | lower }}", {"order.currency": "EUR"}, "eur"),
        ("{{ order.status | upper }}", {"order.status": "pending"}, "PENDING"),
        (
            '{{ order.status | map: "approved=1, rejected=2, *=0" }}',
            {"order.status": "approved"},
            "1",
        ),
        (
            '{{ order.status | map: "approved=1, rejected=2, *=0" }}',
            {"order.status": "rejected"},
            "2",
        ),
        (
            '{{ order.status | map: "approved=1, rejected=2, *=0" }}',
            {"order.status": "pending"},
            "0",
        ),
        (
            '{{ order.status | map: "approved=1, rejected=2" }}',
            {"order.status": "pending"},
            "pending",
        ),
        ('{{ order.status | map: "approved=1" }}', {"order.status": "Approved"}, "Approved"),
        ('{{ link.sub_id | default: "none" }}', {"link.sub_id": ""}, "none"),
        ('{{ link.sub_id | default: "none" }}', {}, "none"),
        ('{{ link.sub_id | default: "none" }}', {"link.sub_id": "fb1"}, "fb1"),
        (
            '{{ event.occurred_at | date: "%Y-%m-%d %H:%M:%S" }}',
            {"event.occurred_at": "2024-05-01T12:30:00+02:00"},
            "2024-05-01 10:30:00",
        ),
        (
            '{{ event.occurred_at | tz: "Europe/Berlin" | date: "%Y-%m-%d %H:%M:%S %Z" }}',
            {"event.occurred_at": "2024-05-01T10:30:00+00:00"},
            "2024-05-01 12:30:00 CEST",
        ),
        (
            '{{ event.occurred_at | tz: "Europe/Berlin" | date: "%H:%M %Z %z" }}',
            {"event.occurred_at": "2024-01-15T10:30:00+00:00"},
            "11:30 CET +0100",
        ),
        (
            '{{ event.occurred_at | date: "%a %A %b %B %d %j %I %p %y %f %Z %z %%" }}',
            {"event.occurred_at": "2024-05-01T14:05:09.250000+02:00"},
            "Wed Wednesday May May 01 122 12 PM 24 250000 UTC +0000 %",
        ),
        (
            '{{ event.occurred_at | tz: "America/New_York" }}',
            {"event.occurred_at": "2024-05-01T12:30:00+02:00"},
            "2024-05-01T06:30:00-04:00",
        ),
        (
            "{{ event.occurred_at | unix }}",
            {"event.occurred_at": "2024-05-01T12:30:00+02:00"},
            "1714559400",
        ),
        (
            '{{ event.occurred_at | tz: "Asia/Kolkata" | unix }}',
            {"event.occurred_at": "2024-05-01T12:30:00+02:00"},
            "1714559400",
        ),
        (
            "{{ event.occurred_at | unix }}",
            {"event.occurred_at": "1969-12-31T23:59:59.5+00:00"},
            "-1",
        ),
        ("{{ link.query.ref | upper }}", {"link.query.ref": "ann"}, "ANN"),
    ],
)
def test_each_filter_renders_as_the_issue_says(
    snippet: str, values: dict[str, str], rendered: str
) -> None:
    assert filtered(snippet, values) == rendered


@unit
@pytest.mark.parametrize(
    "snippet",
    [
        "{{order.currency|lower}}",
        "{{ order.currency | lower }}",
        "{{\torder.currency\t|\tlower\t}}",
        "{{order.currency   |lower}}",
        "{{ order.currency | upper | lower }}",
        r"{{ order.currency \| lower }}",
        r"\{{ order.currency \| lower \}}",
        "{{order.currency|map:'EUR=eur'}}",
        '{{ order.currency | map : "EUR = eur" }}',
        '{{ order.currency | map:"  USD=usd ,EUR  =  eur  " }}',
        '{{ order.currency | default:"x" | lower }}',
    ],
)
def test_spaces_quotes_and_escaped_bars_mean_the_same(snippet: str) -> None:
    assert filtered(snippet, {"order.currency": "EUR"}) == "eur"


@unit
@pytest.mark.parametrize(
    ("snippet", "values", "rendered"),
    [
        ("{{ order.amount | decimals: 1 | cents }}", {"order.amount": "10.55"}, "1060"),
        ('{{ order.commission | cents | map: "105=ok" }}', {"order.commission": "1.05"}, "ok"),
        ('{{ order.status | map: "approved=Sale" | lower }}', {"order.status": "approved"}, "sale"),
        ('{{ order.status | lower | map: "approved=1, *=0" }}', {"order.status": "APPROVED"}, "1"),
        (
            '{{ order.status | default: "pending" | map: "approved=sale, *=lead" }}',
            {"order.status": ""},
            "lead",
        ),
        ('{{ order.status | map: "a=b, b=c" }}', {"order.status": "a"}, "b"),
        ('{{ order.status | map: "a=x=y, *=" }}', {"order.status": "a"}, "x=y"),
        ('{{ order.status | map: "a=x=y, *=" }}', {"order.status": "b"}, ""),
        (
            "{{ event.occurred_at | unix | cents }}",
            {"event.occurred_at": "1970-01-01T00:00:01Z"},
            "100",
        ),
        (
            '{{ event.occurred_at | tz: "Asia/Tokyo" | tz: "Europe/Berlin" | date: "%H %Z" }}',
            {"event.occurred_at": "2024-05-01T10:30:00+00:00"},
            "12 CEST",
        ),
    ],
)
def test_filters_chain_left_to_right(snippet: str, values: dict[str, str], rendered: str) -> None:
    assert filtered(snippet, values) == rendered


@unit
@pytest.mark.parametrize(
    "snippet",
    [
        '{{ link.sub_id | map: "*=x" }}',
        '{{ link.sub_id | map: "a=1" }}',
        "{{ link.sub_id | lower }}",
        "{{ link.sub_id | upper }}",
        "{{ event.occurred_at | unix }}",
        '{{ event.occurred_at | date: "%Y" }}',
        '{{ event.occurred_at | tz: "UTC" }}',
        '{{ event.occurred_at | tz: "UTC" | date: "x" }}',
        "{{ order.amount | cents }}",
        "{{ order.amount | decimals: 2 }}",
    ],
)
def test_an_empty_value_stays_empty_under_every_filter_but_default(snippet: str) -> None:
    name = snippet.split()[1]
    assert filtered(snippet, {name: ""}) == ""


@unit
def test_a_value_a_filter_cannot_read_renders_empty_and_nothing_raises() -> None:
    for unreadable in ("ten", "1e5", "1,5", " 1", "\u0661", "NaN", "Infinity", "+1", ".5"):
        assert Cents().apply(unreadable) == ""
        assert Decimals(2).apply(unreadable) == ""
    for unreadable in ("yesterday", "2024-05-01T12:30:00", "2024-05-01", "1714559400"):
        assert Unix().apply(unreadable) == ""
        assert Date("%Y").apply(unreadable) == ""
        assert Tz(BERLIN).apply(unreadable) == ""
    # Moved into a zone, a time past year 1 or 9999 cannot be written: it renders empty.
    assert Date("%Y").apply("0001-01-01T00:00:00+05:00") == ""
    assert Tz(ZoneInfo("Asia/Tokyo")).apply("9999-12-31T23:00:00+00:00") == ""
    assert Unix().apply("0001-01-01T00:00:00+05:00") == "-62135614800"


@unit
@pytest.mark.parametrize(
    ("snippet", "amount", "rendered"),
    [
        ("{{ order.amount | decimals: 2 }}", "1.005", "1.01"),
        ("{{ order.amount | decimals: 2 }}", "-1.005", "-1.01"),
        ("{{ order.amount | decimals: 2 }}", "1.004999999999999999", "1.00"),
        ("{{ order.amount | decimals: 2 }}", "10.5", "10.50"),
        ("{{ order.amount | decimals: 2 }}", "-0.001", "0.00"),
        ("{{ order.amount | decimals: 0 }}", "2.5", "3"),
        ("{{ order.amount | decimals: 0 }}", "-2.5", "-3"),
        ("{{ order.amount | decimals: 0 }}", "-0.4", "0"),
        ("{{ order.amount | decimals: 18 }}", "1", "1.000000000000000000"),
        (
            "{{ order.amount | decimals: 3 }}",
            "99999999999999999999.9995",
            "100000000000000000000.000",
        ),
        ("{{ order.amount | cents }}", "0.005", "1"),
        ("{{ order.amount | cents }}", "-0.004", "0"),
        ("{{ order.amount | cents }}", "-0", "0"),
        ("{{ order.amount | cents }}", "-10.505", "-1051"),
        (
            "{{ order.amount | cents }}",
            "12345678901234567890.123456789012345678",
            "1234567890123456789012",
        ),
        ("{{ order.amount | cents }}", "0.000000000000000001", "0"),
        ("{{ order.amount | cents }}", "1000000", "100000000"),
    ],
)
def test_amounts_round_exactly_half_away_from_zero_never_to_minus_zero(
    snippet: str, amount: str, rendered: str
) -> None:
    assert filtered(snippet, {"order.amount": amount}) == rendered


@unit
def test_a_long_default_number_is_still_exact() -> None:
    number = "9" * 300 + ".995"
    snippet = f'{{{{ order.amount | default: "{number}" | decimals: 2 | cents }}}}'
    assert filtered(snippet, {"order.amount": ""}) == "1" + "0" * 302


@unit
def test_default_keeps_the_kind_when_its_text_is_a_value_of_it() -> None:
    assert filtered('{{ order.amount | default: "0" | cents }}', {"order.amount": ""}) == "0"
    assert filtered('{{ order.amount | default: "0" | cents }}', {"order.amount": "2"}) == "200"
    moment = "2024-05-01T00:00:00+00:00"
    assert filtered(f'{{{{ event.occurred_at | default: "{moment}" | unix }}}}', {}) == "1714521600"
    assert refusal_of(BASE + '{{ order.amount | default: "n/a" | cents }}') == (
        "filter 'cents' at character 57 of the template works on amounts (order.amount,"
        " order.commission), not on the text that 'default' makes; put 'cents' before 'default'"
    )
    # A date without its offset is no time the filters can read.
    assert refusal_of(BASE + '{{ event.occurred_at | default: "2024-05-01" | unix }}') == (
        "filter 'unix' at character 69 of the template works on times (event.occurred_at),"
        " not on the text that 'default' makes; put 'unix' before 'default'"
    )


@unit
def test_filters_are_parsed_into_the_parts_once() -> None:
    template = parse(
        "https://t.example/?a={{ order.amount | decimals: 2 | cents }}"
        '&s={{ order.status | map: "approved = 1, *=0" }}'
        '&t={{ event.occurred_at | tz: "Europe/Berlin" | date: "%H" }}&n={{order.number}}'
    )
    assert template.parts == (
        "https://t.example/?a=",
        Variable("order.amount", (Decimals(2), Cents())),
        "&s=",
        Variable("order.status", (Map((("approved", "1"),), "0"),)),
        "&t=",
        Variable("event.occurred_at", (Tz(BERLIN), Date("%H", BERLIN))),
        "&n=",
        Variable("order.number"),
    )
    assert template.uses_filters
    assert not parse("https://t.example/?n={{ order.number }}").uses_filters
    assert parse("https://t.example/?n={{ order.number }}").parts[1] == Variable("order.number", ())
    assert Date("%H") == Date("%H", UTC)  # no tz before it: UTC
    assert parse(BASE + '{{ link.sub_id | default: "x" }}').parts[1] == (
        Variable("link.sub_id", (Default("x"),))
    )
    assert parse(BASE + "{{ order.status | upper }}").parts[1] == Variable(
        "order.status", (Upper(),)
    )


@unit
def test_a_filters_result_is_percent_encoded_like_any_value() -> None:
    url = render(
        parse(
            'https://t.example/p/{{ link.sub_id | default: "a/b?c#d" }}'
            '?s={{ link.sub_id | default: "a&b=c%d e+ü" }}'
            '&m={{ order.status | map: "pending=x&y=z/#" }}'
        ),
        {"order.status": "pending"},
    )
    assert url == (
        "https://t.example/p/a%2Fb%3Fc%23d?s=a%26b%3Dc%25d%20e%2B%C3%BC&m=x%26y%3Dz%2F%23"
    )


# --- refused when saved ----------------------------------------------------------------------


@unit
@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        (
            "{{ order.amount | cent }}",
            "unknown filter 'cent' at character 40 of the template; did you mean 'cents'?",
        ),
        (
            "{{ order.status | UPPER }}",
            "unknown filter 'UPPER' at character 40 of the template; did you mean 'upper'?",
        ),
        (
            '{{ event.occurred_at | dte: "%Y" }}',
            "unknown filter 'dte' at character 45 of the template; did you mean 'date'?",
        ),
        (
            "{{ order.status | xyzzy }}",
            "unknown filter 'xyzzy' at character 40 of the template; known filters are default,"
            " map, cents, decimals, date, tz, unix, lower, upper",
        ),
        (
            "{{ order.amount | }}",
            "empty filter after '|' at character 38 of the template; write a filter's name"
            " after it (e.g. | lower) or remove the '|'",
        ),
        (
            "{{order.amount || lower}}",
            "empty filter after '|' at character 37 of the template; write a filter's name"
            " after it (e.g. | lower) or remove the '|'",
        ),
        (
            "{{ order.amount | decimals }}",
            "filter 'decimals' needs an argument at character 40 of the template;"
            " write e.g. decimals: 2",
        ),
        (
            "{{ order.amount | decimals: }}",
            "filter 'decimals' needs an argument after ':' at character 50 of the template;"
            " write e.g. decimals: 2",
        ),
        (
            "{{ link.sub_id | default }}",
            "filter 'default' needs an argument at character 39 of the template;"
            ' write e.g. default: "none"',
        ),
        (
            "{{ order.status | map | lower }}",
            "filter 'map' needs an argument at character 40 of the template;"
            ' write e.g. map: "approved=1, rejected=2, *=0"',
        ),
        (
            "{{ order.amount | cents: 2 }}",
            "unexpected ':' after filter 'cents' at character 45 of the template; it takes no"
            " argument: remove ':' and what follows",
        ),
        (
            '{{ order.amount | decimals: "2" }}',
            "argument '\"2\"' of filter 'decimals' at character 50 of the template is not a"
            " number of places; write 0 to 18 without quotes, e.g. decimals: 2",
        ),
        (
            "{{ order.amount | decimals: 19 }}",
            "argument '19' of filter 'decimals' at character 50 of the template is not a"
            " number of places; write 0 to 18 without quotes, e.g. decimals: 2",
        ),
        (
            "{{ order.amount | decimals: -1 }}",
            "argument '-1' of filter 'decimals' at character 50 of the template is not a"
            " number of places; write 0 to 18 without quotes, e.g. decimals: 2",
        ),
        (
            "{{ link.sub_id | default: none }}",
            "unquoted argument 'none' of filter 'default' at character 48 of the template;"
            ' put it in quotes, e.g. default: "none"',
        ),
        (
            '{{ link.sub_id | default "none" }}',
            "missing ':' before the argument of filter 'default' at character 47 of the"
            ' template; write e.g. default: "none"',
        ),
        (
            "{{ order.amount | lower x }}",
            "unexpected 'x' after filter 'lower' at character 46 of the template; separate"
            " filters with '|'",
        ),
        (
            '{{ link.sub_id | default: "a" "b" | lower }}',
            "unexpected '\"b\"' after filter 'default' at character 52 of the template;"
            " separate filters with '|'",
        ),
        (
            '{{ link.sub_id | default: "none }}',
            "unclosed quote '\"' in the argument of filter 'default' at character 48 of the"
            " template; close it with \" (an argument cannot contain '}}' or its own quote"
            " character)",
        ),
        (
            '{{ link.sub_id | default: "a}}b" }}',
            "unclosed quote '\"' in the argument of filter 'default' at character 48 of the"
            " template; close it with \" (an argument cannot contain '}}' or its own quote"
            " character)",
        ),
        (
            "{{ link.sub_id | cents }}",
            "filter 'cents' at character 39 of the template works on amounts (order.amount,"
            " order.commission), not on link.sub_id",
        ),
        (
            '{{ order.amount | date: "%Y" }}',
            "filter 'date' at character 40 of the template works on times (event.occurred_at),"
            " not on order.amount",
        ),
        (
            "{{ order.status | unix }}",
            "filter 'unix' at character 40 of the template works on times (event.occurred_at),"
            " not on order.status",
        ),
        (
            '{{ order.amount | map: "1=2" | cents }}',
            "filter 'cents' at character 53 of the template works on amounts (order.amount,"
            " order.commission), not on the text that 'map' makes; put 'cents' before 'map'",
        ),
        (
            '{{ order.status | map: "a=1" | cents }}',
            "filter 'cents' at character 53 of the template works on amounts (order.amount,"
            " order.commission), not on the text that 'map' makes",
        ),
        (
            "{{ event.occurred_at | unix | unix }}",
            "filter 'unix' at character 52 of the template works on times (event.occurred_at),"
            " not on the number that 'unix' makes",
        ),
        (
            '{{ order.amount | cents | tz: "UTC" }}',
            "filter 'tz' at character 48 of the template works on times (event.occurred_at),"
            " not on the number that 'cents' makes",
        ),
        (
            '{{ event.occurred_at | tz: "UTC" | cents }}',
            "filter 'cents' at character 57 of the template works on amounts (order.amount,"
            " order.commission), not on the time that 'tz' makes",
        ),
        (
            '{{ event.occurred_at | tz: "Europe/Berln" }}',
            "unknown time zone 'Europe/Berln' in filter 'tz' at character 50 of the template;"
            " did you mean 'Europe/Berlin'?",
        ),
        (
            '{{ event.occurred_at | tz: "europe/berlin" }}',
            "unknown time zone 'europe/berlin' in filter 'tz' at character 50 of the template;"
            " did you mean 'Europe/Berlin'?",
        ),
        (
            '{{ event.occurred_at | tz: "Mars/Olympus" }}',
            "unknown time zone 'Mars/Olympus' in filter 'tz' at character 50 of the template;"
            " use an IANA time zone name such as 'Europe/Berlin' or 'UTC'",
        ),
        (
            '{{ event.occurred_at | tz: "../etc/passwd" }}',
            "unknown time zone '../etc/passwd' in filter 'tz' at character 50 of the template;"
            " use an IANA time zone name such as 'Europe/Berlin' or 'UTC'",
        ),
        (
            '{{ event.occurred_at | date: "%Y-%m-%d %s" }}',
            "unknown directive '%s' in filter 'date' at character 61 of the template; use %a %A"
            " %b %B %d %H %I %j %m %M %p %S %f %y %Y %z %Z %% (%% for a percent sign)",
        ),
        (
            '{{ event.occurred_at | date: "%-d" }}',
            "unknown directive '%-' in filter 'date' at character 52 of the template; use %a %A"
            " %b %B %d %H %I %j %m %M %p %S %f %y %Y %z %Z %% (%% for a percent sign)",
        ),
        (
            '{{ event.occurred_at | date: "100%" }}',
            "lone '%' at the end of the format of filter 'date' at character 55 of the"
            " template; write %% for a percent sign",
        ),
        (
            '{{ event.occurred_at | date: "" }}',
            "empty format in filter 'date' at character 52 of the template;"
            ' write e.g. date: "%Y-%m-%d %H:%M:%S"',
        ),
        (
            '{{ order.status | map: " " }}',
            "no pairs in filter 'map' at character 46 of the template; write key=value pairs"
            ' separated by commas, e.g. map: "approved=1, *=0"',
        ),
        (
            '{{ order.status | map: "a=1, b" }}',
            "pair 'b' without '=' in filter 'map' at character 51 of the template; write"
            " key=value, and separate pairs with commas",
        ),
        (
            '{{ order.status | map: "a=1, =2" }}',
            "pair '=2' without a key in filter 'map' at character 51 of the template; write"
            " key=value, or *=value for every other value",
        ),
        (
            '{{ order.status | map: "a=1, a =2" }}',
            "key 'a' given twice in filter 'map' at character 51 of the template; keep one of them",
        ),
        (
            '{{ order.status | map: "*=1,*=2" }}',
            "key '*' given twice in filter 'map' at character 50 of the template; keep one of them",
        ),
        (
            '{{ order.status | map: "a=1," }}',
            "empty pair in filter 'map' at character 50 of the template; remove the extra comma",
        ),
        (
            '{{ link.sub_id | default: "a\tb" }}',
            "control character U+0009 in the argument of filter 'default' at character 50 of"
            " the template; remove it",
        ),
        (
            r"{{ link.sub\_id \| cent }}",
            "unknown filter 'cent' at character 41 of the template; did you mean 'cents'?",
        ),
        (
            "{{ | lower }}",
            "empty variable '{{}}' at character 22 of the template; put a name inside,"
            " e.g. {{order.number}}",
        ),
        (
            "{{ order.numbr | lower }}",
            "unknown variable 'order.numbr' in template; did you mean 'order.number'?",
        ),
    ],
)
def test_bad_filters_are_refused_when_saved_naming_the_filter_and_where(
    snippet: str, message: str
) -> None:
    assert refusal_of(BASE + snippet) == message


@unit
def test_an_argument_may_hold_the_other_quote_and_a_bar() -> None:
    assert filtered("""{{ link.sub_id | default: "it's | ok" }}""", {}) == "it's | ok"
    assert filtered("""{{ link.sub_id | default: 'say "hi"' }}""", {}) == 'say "hi"'


# --- the POST body ---------------------------------------------------------------------------


@unit
def test_a_post_with_filters_carries_its_rendered_query_decoded() -> None:
    event = make_event()
    template = parse(
        "https://t.example/pb/{{ order.number | lower }}"
        '?s={{ order.status | map: "pending=0" }}&c={{ order.amount | cents }}'
        "&c={{ order.commission | cents }}&k=a+b%2B&v&={{ order.number }}&o={{ order.number }}"
    )
    request = deliver.build_request("POST", template, event, "d-1")
    assert request.url == (
        "https://t.example/pb/%231001?s=0&c=1050&c=105&k=a+b%2B&v&=%231001&o=%231001"
    )
    assert request.body is not None
    sent = json.loads(request.body)
    # Decoded as `link.query` is: the first of a repeated name, none for a nameless one.
    assert sent.pop("rendered_query") == {"s": "0", "c": "1050", "k": "a b+", "v": "", "o": "#1001"}
    assert sent == body(variables(event))


TODAYS_BODY = (
    b'{"link":{"query":{"ref":"ann","campaign":"summer","sub_id":"fb1"},"url":"https://shop.'
    b'example/summer?ref=ann&campaign=summer&sub_id=fb1#promo","path":"/summer","hash":"promo",'
    b'"sub_id":"fb1"},"event":{"id":"evt_01HX","type":"order.created","occurred_at":"2024-05-'
    b'01T12:30:00+02:00"},"affiliate":{"id":"aff-42"},"order":{"number":"#1001","amount":'
    b'"10.50","commission":"1.05","currency":"EUR","status":"pending"}}'
)
"""The body a POST had before filters, for `make_event()`: byte for byte."""


@unit
def test_a_post_without_filters_has_the_body_it_always_had() -> None:
    event = make_event()
    template = parse("https://t.example/pb?o={{ order.number }}&s={{link.sub_id}}")
    request = deliver.build_request("POST", template, event, "d-1")
    assert request.body == TODAYS_BODY
    assert deliver.post_body(event) == TODAYS_BODY


@unit
@pytest.mark.parametrize(
    "source",
    [
        'https://t.example/pb?s={{ order.status | map: "pending=lead" }}&n={{order.number}}',
        "https://t.example/pb?n={{order.number}}",
    ],
    ids=["filters", "no-filters"],
)
def test_a_resend_sends_the_body_the_request_first_had_signed_afresh(source: str) -> None:
    event, secret = make_event(), sign.generate()
    first = deliver.build_request("POST", parse(source), event, "d-1", secret, timestamp=1)
    # As the ledger gives it back: JSON, its keys in an order of the database's own.
    stored = json.loads(json.dumps(first.as_json(), sort_keys=True))

    again = deliver.resend_request(stored, event, secret, timestamp=2)

    assert (again.method, again.url, again.body) == (first.method, first.url, first.body)
    assert again.body is not None
    assert ("rendered_query" in json.loads(again.body)) == ("|" in source)
    signed = sign.Signer(secret).headers("d-1", 2, again.body)
    assert again.headers["webhook-signature"] == signed["webhook-signature"]
    assert again.headers["webhook-signature"] != first.headers["webhook-signature"]


# --- properties ------------------------------------------------------------------------------

KINDS = {"order.amount": "decimal", "order.commission": "decimal", "event.occurred_at": "time"}
"""The kind of each variable the filters read as other than text (README, "Filters")."""
VARIABLES = (*KNOWN_VARIABLES, "link.query.ref", "link.query.sub_id", "link.query.absent")
ANY_KIND = ("default", "map", "lower", "upper")
TAKES = {
    "text": ANY_KIND,
    "decimal": (*ANY_KIND, "cents", "decimals"),
    "time": (*ANY_KIND, "date", "tz", "unix"),
}
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe")
DIRECTIVES = tuple("%" + c for c in "aAbBdHIjmMpSfyYzZ%")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Argument text: URL structure characters and non-ASCII, but no quote, backslash (a markdown
# escape inside the braces), brace (`}}` ends the variable) or control character.
_ARGUMENT_CHARS = st.characters(
    codec="utf-8", exclude_characters="\"'\\{}\x7f" + "".join(map(chr, range(32)))
)
_ARGUMENT_PIECES = ("/", "?", "#", "&", "=", "%", "%2F", "+", " ", ":", "|", ",", "*", "ü", "😀")
ARGUMENT = st.lists(
    st.sampled_from(_ARGUMENT_PIECES) | st.text(_ARGUMENT_CHARS, max_size=3), max_size=5
).map("".join)
MAP_KEY = ARGUMENT.map(lambda text: re.sub("[,=]", "", text).strip()).filter(
    lambda key: key not in ("", "*")
)
MAP_VALUE = ARGUMENT.map(lambda text: text.replace(",", "").strip())
DEFAULTS = {
    "text": ARGUMENT,
    "decimal": AMOUNTS.map(lambda amount: format(amount, "f")) | ARGUMENT,
    "time": VALID_TIME.map(datetime.isoformat) | ARGUMENT,
}
SPACE = st.sampled_from(["", " ", "  ", "\t"])
SPACE_IN_ARGUMENT = st.sampled_from(["", " ", "  "])
FORMAT_PIECES = (
    st.sampled_from(DIRECTIVES)
    | st.sampled_from(DIRECTIVES)
    | ARGUMENT.map(lambda text: text.replace("%", "%%"))
)


def _half_up(exact: Fraction, places: int) -> str:
    """`exact` rounded to `places` with a half away from zero, written as a receiver reads
    it: an independent reading of `decimals` (and of `cents`, at 0 places of 100 times)."""
    units = int(abs(exact) * 10**places + Fraction(1, 2))  # floor, since it is positive
    digits = str(units).rjust(places + 1, "0")
    text = digits[: len(digits) - places] + ("." + digits[-places:] if places else "")
    return "-" + text if exact < 0 and units else text


def _is_plain_number(text: str) -> bool:
    return re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text) is not None


def _is_time(text: str) -> bool:
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


def _in_zone(moment: datetime, zone: tzinfo, format_: str | None) -> str:
    try:
        moved = moment.astimezone(zone)
    except (OverflowError, ValueError):
        return ""
    try:
        return moved.isoformat() if format_ is None else moved.strftime(format_)
    except (OverflowError, ValueError):
        return ""


def _can_be_a_key(value: str) -> bool:
    """Whether a map can be given `value` as a key, so that the value hits it."""
    return (
        value == value.strip()
        and value not in ("", "*")
        and not re.search(r"[,=\"'\\{}\x00-\x1f\x7f]", value)
    )


@dataclass
class Chain:
    """A variable with random filters, as typed, and the value they should make of it."""

    typed: str
    expected: str


@st.composite
def chains(draw: st.DrawFn, values: dict[str, str], variable: str | None = None) -> Chain:
    """`variable`, else any, and random filters that fit its kind."""
    if variable is None:
        variable = draw(st.sampled_from(VARIABLES))
    value = values.get(variable, "")
    kind = KINDS.get(variable, "text")
    zone: tzinfo = UTC
    typed = [variable]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(TAKES[kind]))
        quote = draw(st.sampled_from(['"', "'"]))
        colon = draw(SPACE) + ":" + draw(SPACE)
        if name == "default":
            argument = draw(DEFAULTS[kind])
            typed.append(f"default{colon}{quote}{argument}{quote}")
            value = value or argument
            if (kind == "decimal" and not _is_plain_number(argument)) or (
                kind == "time" and not _is_time(argument)
            ):
                kind = "text"
            continue
        if name == "map":
            keys = draw(st.lists(MAP_KEY, unique=True, max_size=3))
            if draw(st.booleans()) and _can_be_a_key(value):
                keys = [value, *(key for key in keys if key != value)]  # a hit
            pairs = {key: draw(MAP_VALUE) for key in keys}
            fallback = draw(st.none() | MAP_VALUE) if pairs else draw(MAP_VALUE)
            space = SPACE_IN_ARGUMENT
            written = [f"{draw(space)}{k}{draw(space)}={draw(space)}{v}" for k, v in pairs.items()]
            if fallback is not None:
                written.append(f"*={fallback}{draw(space)}")
            typed.append(f"map{colon}{quote}{','.join(draw(st.permutations(written)))}{quote}")
            if value:
                value = pairs.get(value, value if fallback is None else fallback)
            kind = "text"
            continue
        if name in ("lower", "upper"):
            typed.append(name)
            value = value.lower() if name == "lower" else value.upper()
            kind = "text"
        elif name == "cents":
            typed.append(name)
            value = value and _half_up(Fraction(value) * 100, 0)
        elif name == "decimals":
            places = draw(st.integers(0, 18))
            typed.append(f"decimals{colon}{places}")
            value = value and _half_up(Fraction(value), places)
        elif name == "unix":
            typed.append(name)
            if value:
                since = datetime.fromisoformat(value) - EPOCH
                value = str(since.days * 86400 + since.seconds)  # seconds and days floor
            kind = "decimal"
        elif name == "tz":
            zone = ZoneInfo(draw(st.sampled_from(ZONES)))
            typed.append(f"tz{colon}{quote}{zone}{quote}")
            value = value and _in_zone(datetime.fromisoformat(value), zone, None)
        else:
            format_ = draw(st.lists(FORMAT_PIECES, min_size=1).map("".join).filter(bool))
            typed.append(f"date{colon}{quote}{format_}{quote}")
            value = value and _in_zone(datetime.fromisoformat(value), zone, format_)
            kind = "text"
    bar = draw(SPACE) + draw(st.sampled_from(["|", "\\|"])) + draw(SPACE)
    return Chain("{{" + draw(SPACE) + bar.join(typed) + draw(SPACE) + "}}", value)


@st.composite
def filtered_templates(draw: st.DrawFn) -> tuple[Event, str, list[str]]:
    """An event, a template with a random chain in two path segments and two query
    values, and the four values the chains should make for the event."""
    event = draw(EVENTS)
    if event.occurred_at is None and draw(st.booleans()):  # the time filters need one
        event = parse_event(event.to_json() | {"occurred_at": draw(VALID_TIME).isoformat()})
    values = variables(event)
    # The time and an amount in every template: most filters are theirs.
    slots = [
        draw(chains(values, "event.occurred_at")),
        draw(chains(values, draw(st.sampled_from(("order.amount", "order.commission"))))),
        draw(chains(values)),
        draw(chains(values)),
    ]
    template = (
        f"https://track.example:8443/pb/{slots[0].typed}/x/{slots[1].typed}"
        f"?a={slots[2].typed}&b={slots[3].typed}&c=lit"
    )
    return event, template, [slot.expected for slot in slots]


@unit
@MANY
@given(case=filtered_templates())
def test_filtered_values_stay_data_and_are_what_their_filters_make(
    case: tuple[Event, str, list[str]],
) -> None:
    event, source, expected = case
    template = parse(source)
    check_new(template)
    request = deliver.build_request("POST", template, event, "d-1")
    url = request.url

    assert re.fullmatch(r"[\x21-\x7e]+", url), url  # nothing that could end a request line
    split = urlsplit(url)
    assert (split.scheme, split.hostname, split.port) == ("https", "track.example", 8443)
    assert "#" not in url
    segments = split.path.split("/")
    assert len(segments) == 5
    assert (segments[1], segments[3]) == ("pb", "x")
    query = parse_qsl(split.query, keep_blank_values=True)
    assert [name for name, _ in query] == ["a", "b", "c"]
    decoded = [unquote(segments[2], errors="strict"), unquote(segments[4], errors="strict")]
    assert decoded + [value for _, value in query] == [*expected, "lit"]
    assert request.body is not None
    sent = json.loads(request.body)
    if template.uses_filters:
        assert sent.pop("rendered_query") == {"a": expected[2], "b": expected[3], "c": "lit"}
    assert sent == body(variables(event))


@unit
@MANY
@given(amount=AMOUNTS, places=st.integers(0, 18))
def test_decimals_and_cents_agree_with_exact_fractions(amount: Decimal, places: int) -> None:
    raw = format(amount, "f")
    template = parse(
        f"https://t.example/?d={{{{order.amount | decimals: {places}}}}}"
        "&c={{order.amount|cents}}"
    )
    rendered = dict(parse_qsl(urlsplit(render(template, {"order.amount": raw})).query))
    assert rendered == {"d": _half_up(Fraction(raw), places), "c": _half_up(Fraction(raw) * 100, 0)}


# --- the README ------------------------------------------------------------------------------


def _section(heading: str) -> str:
    text = README.read_text()
    return text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]


def _table_rows(section: str) -> list[list[str]]:
    """The body rows of the section's table, each cell as a markdown renderer shows it:
    `\\|` in a cell is `|`."""
    rows = []
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append([cell.replace("\\|", "|") for cell in cells])
    return rows[1:]  # the header


def _code(cell: str) -> str:
    """The one code span of a cell."""
    [code] = re.findall(r"`([^`]+)`", cell)
    return str(code)


def _first_code(cell: str) -> str:
    code: str = re.findall(r"`([^`]+)`", cell)[0]
    return code


@unit
def test_the_readme_filter_table_shows_every_filter_rendering_as_it_says() -> None:
    rows = _table_rows(_section("### Filters"))
    assert [_first_code(row[0]).split(":")[0] for row in rows] == list(KNOWN_FILTERS)
    for _, example, renders in rows:
        snippet = _code(example)
        name = snippet.split()[1]
        samples = re.findall(r"`([^`]*)` for (?:`([^`]*)`|an empty value)", renders)
        assert samples, renders
        for output, given_value in samples:
            assert filtered(snippet, {name: given_value}) == output, (snippet, given_value)


@unit
def test_the_readme_filter_rules_examples_hold() -> None:
    rules = " ".join(_section("### Filters").split())
    [(source, message)] = re.findall(r"`([^`]+)` is refused with `([^`]+)`", rules)
    assert refusal_of(source) == message
    [(snippet, sent)] = re.findall(r"`(\{\{[^`]+\}\})` goes out as `([^`]+)`", rules)
    assert render(parse(BASE + snippet), {}) == BASE + sent
    [chain] = re.findall(r"So `default` goes first: `([^`]+)`", rules)
    assert filtered(chain, {"order.status": ""}) == "lead"
    assert filtered(chain, {"order.status": "approved"}) == "sale"
    assert filtered('{{ order.status | map: "approved=sale, *=lead" }}', {}) == ""
    assert "`1.005` is `1.01` and `-1.005` is `-1.01`" in rules
    assert filtered("{{ order.amount | decimals: 2 }}", {"order.amount": "-1.005"}) == "-1.01"
    [directives] = re.findall(r"strftime with `([^`]+)`", rules)
    assert directives.split() == list(DIRECTIVES)


def _readme_event(link: str) -> Event:
    """The example of README "The event", arriving through `link`."""
    [example] = re.findall(r"```json\n(.*?)```", _section("## The event"), re.S)
    data = json.loads(example)
    return parse_event(data | {"link": {"url": link}})


@unit
def test_the_readme_tracker_templates_render_as_it_says() -> None:
    section = _section("### Templates for trackers")
    [link] = re.findall(r"arriving through the link\s+`([^`]+)`", section)
    values = variables(_readme_event(link))
    rows = _table_rows(section)
    assert [row[0] for row in rows] == ["Keitaro", "Voluum", "Everflow"]
    for tracker, theirs, ours, renders in rows:
        template = parse(_code(ours))
        check_new(template)  # one a callback can be saved with
        rendered = render(template, values)
        assert rendered == _code(renders), tracker
        # The parameters the tracker expects, in its order, and the same last path segment.
        expected, got = urlsplit(_code(theirs)), urlsplit(rendered)
        assert [k for k, _ in parse_qsl(expected.query)] == [k for k, _ in parse_qsl(got.query)]
        assert expected.path.rsplit("/", 1)[1] == got.path.rsplit("/", 1)[1]
        assert str(got.hostname).endswith(".example")


@unit
def test_the_readme_rendered_query_example_is_what_keitaros_template_posts() -> None:
    requests = " ".join(_section("### Requests").split())
    [example] = re.findall(r"as one flat object \(`([^`]+)`", requests)
    trackers = _section("### Templates for trackers")
    [link] = re.findall(r"arriving through the link\s+`([^`]+)`", trackers)
    keitaro = _code(_table_rows(trackers)[0][2])
    request = deliver.build_request("POST", parse(keitaro), _readme_event(link), "d-1")
    assert request.body is not None
    assert json.loads(request.body)["rendered_query"] == json.loads(example)


# --- end to end: the CLI, the service and a worker -------------------------------------------

FILTERED = (
    "https://t.example/pb/{{ order.status | default: 'pending' | map: 'approved=sale, *=lead' }}"
    "?c={{ order.amount | cents }}"
    "&d={{ event.occurred_at | tz: 'Europe/Berlin' | date: '%d.%m. %H:%M' }}"
    "&u={{ event.occurred_at | unix }}&cur={{ order.currency | default: 'EUR' | lower }}"
    "&s={{ link.sub_id \\| upper }}"
)


def _event_from_body(sent: dict[str, Any]) -> Event:
    """The event a POST body was made from: it carries every field."""
    return parse_event(
        {
            "id": sent["event"]["id"],
            "type": sent["event"]["type"],
            "occurred_at": sent["event"]["occurred_at"],
            "affiliate_id": sent["affiliate"]["id"],
            "order": sent["order"],
            "link": {"url": sent["link"]["url"], "sub_id": sent["link"]["sub_id"]},
        }
    )


async def test_preview_and_the_api_render_filters_as_delivery_does(
    api: Api, settings: Settings, tmp_path: Path
) -> None:
    data = event_data("filters-preview", occurred_at=OCCURRED_AT)
    event_file = tmp_path / "event.json"
    event_file.write_text(json.dumps(data))
    postback = Postback(postback_env(settings), tmp_path)

    args = ["--json", "--method", "POST", "--url", FILTERED, "--file", str(event_file)]
    shown = json.loads(succeeded(postback("preview", *args)))

    event = parse_event(data)
    expected = deliver.build_request("POST", parse(FILTERED), event, deliver.delivery_id(event))
    assert shown == expected.as_json()
    assert shown["url"] == (
        "https://t.example/pb/lead?c=1050&d=21.11.%2011%3A00&u=1795255200&cur=eur&s=FB1"
    )
    assert shown["body"]["rendered_query"] == {
        "c": "1050",
        "d": "21.11. 11:00",
        "u": "1795255200",
        "cur": "eur",
        "s": "FB1",
    }

    spec = {"affiliate_id": "ann", "event_type": "order.created", "url": FILTERED, "method": "POST"}
    status, previewed = await api.call("POST", "/v1/callbacks/preview", json=spec)
    assert status == 200, previewed
    sample = _event_from_body(previewed["body"])
    again = deliver.build_request(
        "POST", parse(FILTERED), sample, previewed["headers"]["Idempotency-Key"]
    )
    assert previewed == again.as_json()
    # The sample order: 100.00 EUR, pending.
    assert previewed["url"].startswith("https://t.example/pb/lead?c=10000&d=")
    assert previewed["body"]["rendered_query"]["cur"] == "eur"


async def test_a_template_with_an_unknown_filter_is_refused_when_saved(
    api: Api, db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    url = "https://t.example/pb?c={{ order.amount | cent }}"
    said = "unknown filter 'cent' at character 42 of the template; did you mean 'cents'?"
    postback = Postback(postback_env(settings), tmp_path)

    line = refusal(
        postback("callbacks", "set", "--affiliate", "ann", "--event", "order.created", "--url", url)
    )
    status, answer = await api.call(
        "PUT", "/v1/callbacks/ann/order.created", json={"url": url, "method": "GET"}
    )

    assert line == f"postback: error: {said}"
    assert (status, answer["errors"]) == (422, [{"field": "url", "message": said}])
    assert await db.fetchval("SELECT count(*) FROM callbacks") == 0


async def test_a_worker_posts_filtered_values_and_their_rendered_query_signed(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    secret = sign.generate()
    url = (
        receiver.url + '/pb?s={{ order.status | map: "approved=sale, *=lead" }}'
        "&c={{ order.commission | decimals: 1 }}"
    )
    await save_callback(db, "ann", "order.created", "POST", url, secret)
    data = event_data(
        "filters-worker",
        occurred_at=OCCURRED_AT,
        order={"number": "#1001", "amount": "10.50", "commission": "1.05", "status": "approved"},
    )
    await producer.publish(data)

    await drain(settings)

    [got] = receiver.requests
    assert (got.method, got.path_qs) == ("POST", "/pb?s=sale&c=1.1")
    sent = json.loads(got.body)
    assert sent.pop("rendered_query") == {"s": "sale", "c": "1.1"}
    assert sent == body(variables(parse_event(data)))
    signed = sign.Signer(secret).headers(
        got.headers["webhook-id"], int(got.headers["webhook-timestamp"]), got.body
    )
    assert got.headers["webhook-signature"] == signed["webhook-signature"]
