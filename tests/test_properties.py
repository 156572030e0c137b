"""Properties over generated input: nothing an event or a template says can crash the relay
or change where a postback goes.

The example-based tests pin down what known inputs give. These state what must hold for
every input, and let hypothesis hunt for the order number, template or request body that
breaks it: a substituted value never adds a path segment, a query parameter or a fragment,
never reaches a header, and always decodes back to itself; the template parser, the event
model, the ingest parser and the filters refuse bad input only with their documented
errors; and every failure is of a class the filters know.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from yarl import URL

from ops.actions.filters import DeliveryQuery, InputError, read
from ops.service.ingest import BatchRefused, parse_batch
from producer.event import (
    EVENT_TYPES,
    Event,
    InvalidEvent,
    loads_event,
    parse_event,
)
from producer.json_input import BadJson, read_json
from producer.queue import serialize
from tests.support.generated import (
    ANY_TIME,
    EVENTS,
    FEW,
    HOSTILE_TEXT,
    MANY,
    UNICODE,
    event_data,
)
from worker import deliver, render, sign
from worker.exchange import ERROR_CLASSES, FAILURE_CLASSES, ErrorClass, Outcome
from worker.ledger import STATES

pytestmark = pytest.mark.unit

# --- strategies (the shared ones: tests/support/generated.py) ------------------------------

HUGE_INTS = st.builds(
    # Past int64 and past what a float holds, but under Python's 4300-digit str limit, so
    # json.dumps can still write them (the ingest tests feed longer numbers as text).
    lambda digits, sign_: sign_ * 10**digits + 7,
    st.integers(min_value=18, max_value=4000),
    st.sampled_from([-1, 1]),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE_INTS,
    st.floats(),  # nan and ±inf included: Python's json reads and writes NaN and Infinity
    st.text(UNICODE),
    st.sampled_from(
        ["10.50", "1e400", "-0", "NaN", "1_000", " 1 ", "0x10", "\uff12", "order.created"]
    ),
)
EVENT_KEYS = st.sampled_from(
    ["id", "type", "affiliate_id", "occurred_at", "order", "link", "number", "amount",
     "commission", "currency", "status", "url", "sub_id", "affiliateId"]
)  # fmt: skip
JSON = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(EVENT_KEYS | st.text(UNICODE, max_size=8), children, max_size=6)
    ),
    max_leaves=20,
)

# --- 1. rendering ------------------------------------------------------------------------

RENDER_TEMPLATES = (
    # values in path segments, query values and the fragment
    "https://track.example/pb/{{order.number}}/x/{{ order.amount }}"
    "?order={{order.number}}&amt={{order.amount}}&sub={{link.sub_id}}#{{link.hash}}",
    # a value in a query key, several values next to each other, a port
    "https://track.example:8443/{{order.number}}{{order.status}}{{event.id}}/end"
    "?{{order.number}}=1&k={{order.currency}}{{affiliate.id}}",
    # IPv6 host with userinfo, a key without "=", text around values, escaped braces
    "http://user:pw@[2001:db8::1]:8080/a\\{{order.number\\}}b/c"
    "?x=&{{link.query.ref}}={{link.query.ref}}&last#frag-{{order.number}}{{link.hash}}",
    # no path at all, a value as the whole fragment
    "https://TRACK.example?only={{order.number}}#{{order.status}}",
)
RENDER_IDS = ("path-query-fragment", "query-key-adjacent", "ipv6-userinfo-escaped", "no-path")
_PLACEHOLDER = re.compile(r"(zqx\d+xqzv)")


@dataclass(frozen=True, slots=True)
class Shape:
    """A URL cut where a parser cuts it; every piece is left as sent (percent-encoded)."""

    scheme: str
    host: str | None
    port: int | None
    segments: tuple[str, ...]
    query: tuple[str, ...]
    """The query's `&`-separated pieces, each `key=value`, `key` or empty."""
    fragment: str


def _shape(url: str) -> Shape:
    split = urlsplit(url)
    return Shape(
        split.scheme,
        split.hostname,
        split.port,
        tuple(split.path.split("/")),
        tuple(split.query.split("&")),
        split.fragment,
    )


def _placeholders(template: render.Template) -> dict[str, str]:
    """Harmless values: unreserved characters only, so they go out exactly as given."""
    names = sorted({part.name for part in template.parts if isinstance(part, render.Variable)})
    return {name: f"zqx{index}xqzv" for index, name in enumerate(names)}


def _fill(
    piece: str, placeholders: Mapping[str, str], values: Mapping[str, str], *, decode: bool
) -> str:
    """`piece` of the placeholder rendering with each placeholder replaced by its value;
    with `decode`, the template's own text around them is percent-decoded, as a receiver
    decodes it (a non-ASCII character typed into the template goes out encoded)."""
    names = {token: name for name, token in placeholders.items()}
    chunks = _PLACEHOLDER.split(piece)  # literal, placeholder, literal, ...
    return "".join(
        values.get(names[chunk], "") if odd else (unquote(chunk) if decode else chunk)
        for odd, chunk in zip(itertools.cycle((False, True)), chunks, strict=False)
    )


def _assert_safe_on_the_wire(url: str) -> None:
    """Printable ASCII only: no CR, LF, NUL or space to end a request line or start a header."""
    assert re.fullmatch(r"[\x21-\x7e]+", url), url


def _assert_values_stay_data(template: render.Template, values: Mapping[str, str]) -> None:
    """Rendering `values` keeps the URL the template's, and each value decodes back to itself.

    The template's own text must not hold `%` or `+`, which would make "decodes back"
    ambiguous (`%4` followed by a value `1` is `%41`).
    """
    placeholders = _placeholders(template)
    encoded = {name: quote(values.get(name, ""), safe="") for name in placeholders}
    plain = render.render(template, placeholders)
    url = render.render(template, values)
    _assert_safe_on_the_wire(url)
    got, shape = _shape(url), _shape(plain)

    # Where the request goes and how many pieces its path and query have: as the template's.
    assert (got.scheme, got.host, got.port) == (shape.scheme, shape.host, shape.port)
    assert got.host == template.host
    assert len(got.segments) == len(shape.segments)
    assert len(got.query) == len(shape.query)
    # Each piece is the template's text with the encoded values in place, and decodes to
    # the template's text with the values themselves in place.
    pieces = [
        *zip(got.segments, shape.segments, strict=True),
        *zip(got.query, shape.query, strict=True),
        (got.fragment, shape.fragment),
    ]
    for sent_piece, template_piece in pieces:
        assert sent_piece == _fill(template_piece, placeholders, encoded, decode=False)
        assert unquote(sent_piece, errors="strict") == _fill(
            template_piece, placeholders, values, decode=True
        )
    # Query keys as parsers read them (an empty piece is no parameter): the template's.
    keys = [
        _fill(piece.partition("=")[0], placeholders, values, decode=True)
        for piece, sent_piece in zip(shape.query, got.query, strict=True)
        if sent_piece
    ]
    assert [key for key, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)] == keys

    # What the relay sends goes through yarl (encoded=True, as deliver.send does).
    sent, expected = URL(url, encoded=True), URL(plain, encoded=True)
    assert (sent.scheme, sent.host, sent.port) == (expected.scheme, expected.host, expected.port)
    assert len(sent.raw_path.split("/")) == len(expected.raw_path.split("/"))
    assert [key for key, _ in sent.query.items()] == keys
    assert sent.raw_fragment == got.fragment


@pytest.mark.parametrize("source", RENDER_TEMPLATES, ids=RENDER_IDS)
@MANY
@given(data=st.data())
def test_substituted_values_never_change_the_url_and_decode_back(
    source: str, data: st.DataObject
) -> None:
    template = render.parse(source)
    names = _placeholders(template)
    values = data.draw(st.fixed_dictionaries(dict.fromkeys(names, HOSTILE_TEXT)), label="values")
    _assert_values_stay_data(template, values)


@pytest.mark.parametrize("source", RENDER_TEMPLATES, ids=RENDER_IDS)
@FEW
@given(values=st.dictionaries(st.sampled_from(render.KNOWN_VARIABLES), HOSTILE_TEXT))
def test_missing_values_render_empty_and_keep_the_url(source: str, values: dict[str, str]) -> None:
    _assert_values_stay_data(render.parse(source), values)


EVERY_VARIABLE = render.parse(
    "https://track.example/pb/{{event.type}}/{{order.number}}?id={{event.id}}"
    "&at={{event.occurred_at}}&aff={{affiliate.id}}&amt={{order.amount}}"
    "&com={{order.commission}}&cur={{order.currency}}&st={{order.status}}&url={{link.url}}"
    "&path={{link.path}}&hash={{link.hash}}&sub={{link.sub_id}}&ref={{link.query.ref}}"
    "#{{order.number}}"
)
HEADER_TEXT = re.compile(r"[A-Za-z0-9+/=,.\-]*")
"""Every character a header the relay sets can hold: product/version, uuids, digits, base64."""
SECRETS = st.one_of(
    st.none(),
    st.just(sign.generate()),
    st.text(UNICODE, min_size=1).filter(lambda s: not s.startswith(sign.SECRET_PREFIX)),
)


@FEW
@given(
    event=EVENTS,
    method=st.sampled_from(["GET", "POST"]),
    secret=SECRETS,
    timestamp=st.integers(min_value=0, max_value=2**40),
)
def test_event_values_reach_the_url_encoded_and_never_a_header(
    event: Event, method: str, secret: str | None, timestamp: int
) -> None:
    delivery = deliver.delivery_id(event)
    request = deliver.build_request(method, EVERY_VARIABLE, event, delivery, secret, timestamp)
    values = render.variables(event)

    assert request.url == render.render(EVERY_VARIABLE, values)
    _assert_values_stay_data(EVERY_VARIABLE, values)

    expected = {"User-Agent": deliver.USER_AGENT, "Idempotency-Key": str(delivery)}
    if method == "POST":
        expected["Content-Type"] = "application/json"
    if secret is not None:
        expected |= {"webhook-id": str(delivery), "webhook-timestamp": str(timestamp)}
        assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", request.headers.pop("webhook-signature"))
    # Exactly these headers, none made from an event value, and none able to break a line.
    assert request.headers == expected
    assert uuid.UUID(request.headers["Idempotency-Key"]) == delivery
    for name, header in request.headers.items():
        assert HEADER_TEXT.fullmatch(name), name
        assert HEADER_TEXT.fullmatch(header), (name, header)

    if method == "POST":
        assert request.body is not None
        sent = json.loads(request.body)
        assert sent["order"]["number"] == event.order.number
        assert sent["link"]["url"] == event.link.url
    else:
        assert request.body is None


# --- 2. the template parser --------------------------------------------------------------

TEMPLATE_PIECES = (
    "{{", "}}", "\\{", "\\}", "{", "}", "{{ }}", "http://", "https://", "HTTP://", "hTtPs://",
    "ftp://", "//", "/", "[", "]", "::1", "[::1]", "v1.x", "%", "%2F", "%zz", "%00", ":",
    ":80", ":65536", ":-1", ":٨٠", ":+8", "@", "?", "#", "&", "=", " ", "\t", "\n", "\x00",
    "\x7f", "\\", "|", "^", "`", '"', "<", ">", "ü", "\u0661", "\U0001d7d9", "😀", "\u3002",
    "\uff0e", "\u200b", "xn--bcher-kva.example", "track.example", "127.0.0.1", "0x7f.1", ".", "..",
    "order.number", "{{order.number}}", "{{ order.amount }}", "\\{{link.hash\\}}",
    "{{order.numbr}}", "{{link.query.}}", "{{link.query.ref}}", "{{link.query.a b}}",
    "{{Order.Number}}", "{{{{", "}}}}",
)  # fmt: skip
TEMPLATE_TEXT = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(TEMPLATE_PIECES), st.text(max_size=3)), max_size=20).map(
        "".join
    ),
    st.text(min_size=4090, max_size=4100),  # around the length limit
)
# Mostly accepted templates: a literal scheme and authority, then anything URL-like.
AUTHORITIES = (
    "track.example", "TRACK.Example:8443", "user:pw@track.example", "[::1]", "[2001:db8::1]:80",
    "127.0.0.1", "a", "xn--bcher-kva.example", "track.example:", "[v1.x]", "a%41b", "1.2.3",
    "track.example.", "_s.example", "a@b@c", "h:0",
)  # fmt: skip
TAIL_PIECES = tuple(p for p in TEMPLATE_PIECES if "{" not in p and "}" not in p) + tuple(
    f"{{{{{name}}}}}" for name in (*render.KNOWN_VARIABLES, "link.query.ref", "link.query.x y")
)
ACCEPTABLE_TEMPLATES = st.builds(
    "{}://{}{}{}".format,
    st.sampled_from(["http", "https", "HTTPS"]),
    st.sampled_from(AUTHORITIES),
    st.sampled_from(["/", "?", "#", ""]),
    st.lists(st.one_of(st.sampled_from(TAIL_PIECES), st.text(max_size=3)), max_size=12).map(
        "".join
    ),
)


def _parse_or_refuse(source: str) -> render.Template | None:
    """The template, or None when `parse` refused it the documented way."""
    try:
        template = render.parse(source)
    except render.TemplateError as exc:
        message = str(exc)
        assert message
        assert "\n" not in message  # one line an affiliate manager can read
        return None
    assert isinstance(template.host, str)
    assert template.host
    _assert_sent_to_its_host(template, render.render(template, {}))
    return template


def _assert_sent_to_its_host(template: render.Template, url: str) -> None:
    """The URL is one the worker can send, to the host checked when the callback was saved."""
    _assert_safe_on_the_wire(url)
    assert urlsplit(url).hostname == template.host
    # deliver.send hands URL(url, encoded=True) to aiohttp: if yarl refused it, the job
    # would crash on every attempt; if yarl read another host, the SSRF check at save time
    # would have looked at the wrong one. (yarl keeps the host's case as written.)
    sent = URL(url, encoded=True)
    assert sent.scheme in ("http", "https")
    assert sent.raw_host is not None
    assert sent.raw_host.lower() == template.host.lower()


@MANY
@given(source=TEMPLATE_TEXT)
# Found by the property: urlsplit reads these as the host ::1 (or h), yarl refuses them.
@example(source="https://[::1]http://")
@example(source="https://[2001:db8::1]x/p?{{order.number}}")
@example(source="https://evil.example[2001:db8::1]/")
@example(source="https://[x]@h/")
def test_the_parser_refuses_any_text_only_with_template_error(source: str) -> None:
    _parse_or_refuse(source)


@MANY
@given(source=ACCEPTABLE_TEMPLATES, data=st.data())
def test_an_accepted_template_keeps_its_host_and_url_whatever_the_values(
    source: str, data: st.DataObject
) -> None:
    template = _parse_or_refuse(source)
    if template is None:
        return
    names = _placeholders(template)
    values = data.draw(st.fixed_dictionaries(dict.fromkeys(names, HOSTILE_TEXT)), label="values")
    _assert_sent_to_its_host(template, render.render(template, values))
    if "%" not in source and "+" not in source:
        # (A `%` or `+` typed into the template would make "decodes back" ambiguous.)
        _assert_values_stay_data(template, values)


# --- 3. the event model ------------------------------------------------------------------


def _event_or_refusal(data: Any) -> Event | InvalidEvent:
    """What the producer, `postback send` and ingest all do: `parse_event`."""
    try:
        return parse_event(data)
    except InvalidEvent as exc:
        refusal = exc
    assert refusal.errors, "a refusal names at least one field"
    for error in refusal.errors:
        assert error.field
        assert error.message
    return refusal


@MANY
@given(data=JSON)
def test_any_json_value_is_an_event_or_invalid_event(data: Any) -> None:
    _event_or_refusal(data)
    # The same value as JSON text, read with exact decimals as ingest and `send` read it.
    with contextlib.suppress(InvalidEvent):
        loads_event(json.dumps(data))


def _paths(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        out.append(prefix + key)
        if isinstance(value, Mapping):
            out.extend(_paths(value, f"{prefix}{key}."))
    return out


@st.composite
def almost_valid(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid event with one field replaced by random JSON, removed, or one key added."""
    data = draw(event_data().map(lambda d: parse_event(d).to_json()))
    optional = ["order.currency", "order.status", "link.sub_id", "occurred_at"]
    path = draw(st.sampled_from([*_paths(data), *optional, "extra", "order.extra", "link.x"]))
    *parents, key = path.split(".")
    target = data
    for parent in parents:
        target = target[parent]
    if key in target and draw(st.booleans()):
        del target[key]
    else:
        target[key] = draw(JSON)
    return data, path


@MANY
@given(case=almost_valid())
def test_an_almost_valid_event_is_an_event_or_a_refusal_naming_that_field(
    case: tuple[dict[str, Any], str],
) -> None:
    data, path = case
    outcome = _event_or_refusal(data)
    if isinstance(outcome, InvalidEvent):
        fields = [error.field for error in outcome.errors]
        assert any(field == path or field.startswith(path + ".") for field in fields), (
            path,
            fields,
        )


def _assert_same_event(got: Event, want: Event) -> None:
    """Equal field by field, amounts as written and times with their own offset.

    Model equality is not enough: Python compares times in different zones as instants, and
    never as equal when one falls in a daylight-saving fold or gap.
    """
    assert got.model_dump(exclude={"occurred_at"}) == want.model_dump(exclude={"occurred_at"})
    assert got.to_json() == want.to_json()
    if want.occurred_at is None:
        assert got.occurred_at is None
        return
    assert got.occurred_at is not None
    assert got.occurred_at.replace(tzinfo=None) == want.occurred_at.replace(tzinfo=None)
    assert got.occurred_at.utcoffset() == want.occurred_at.utcoffset()


@MANY
@given(data=event_data())
def test_a_valid_event_survives_its_json_round_trip_unchanged(data: dict[str, Any]) -> None:
    event = parse_event(data)
    wire = event.to_json()
    # As the producer queues it and the worker reads it, and as ingest reads a body.
    for decoded in (parse_event(read_json(serialize(wire))), loads_event(json.dumps(wire))):
        _assert_same_event(decoded, event)
    assert render.variables(parse_event(wire)) == render.variables(event)


@FEW
@given(data=event_data(), occurred_at=ANY_TIME)
# Found by the property: local mean time in Abidjan in 1912 was -00:16:08, which the JSON
# form used to cut to -00:16.
@example(
    data={
        "id": "e",
        "type": "order.created",
        "affiliate_id": "a",
        "order": {"number": "1", "amount": "1", "commission": "1"},
        "link": {"url": "https://shop.example/"},
    },
    occurred_at=datetime(1912, 1, 1, tzinfo=timezone(-timedelta(minutes=16, seconds=8))),
)
def test_any_aware_time_is_kept_to_the_second_or_refused(
    data: dict[str, Any], occurred_at: datetime
) -> None:
    outcome = _event_or_refusal({**data, "occurred_at": occurred_at})
    if isinstance(outcome, InvalidEvent):
        assert [error.field for error in outcome.errors] == ["occurred_at"]
        return
    _assert_same_event(loads_event(json.dumps(outcome.to_json())), outcome)


# --- 4. ingest ---------------------------------------------------------------------------

JSON_TOKENS = (
    "{", "}", "[", "]", ",", ":", '"id"', '"order"', '"amount"', '"x"', "null", "true", "1",
    "-0", "1e400", "1E-400", "NaN", "Infinity", "-Infinity", "9" * 5000, '"\\ud800"',
    '"\\u0000"', '"\\udc00x"', "\ufeff", " ", "\n",
)  # fmt: skip
BODIES = st.one_of(
    st.binary(),
    JSON.map(lambda data: json.dumps(data).encode()),
    st.lists(st.sampled_from(JSON_TOKENS), max_size=30).map(lambda ts: "".join(ts).encode()),
    st.lists(st.one_of(event_data().map(lambda d: parse_event(d).to_json()), JSON), max_size=5).map(
        lambda items: json.dumps(items).encode()
    ),
    almost_valid().map(lambda case: json.dumps(case[0]).encode()),
    almost_valid().map(lambda case: json.dumps(case[0]).encode("utf-16")),
)


@MANY
@given(body=BODIES)
@example(body=b"0e1000000000000000000")  # an exponent Decimal cannot hold
@example(body=b'[{"order": {"amount": 1E-1000000000000000000}}]')
@example(body=b'[{"order": {"amount": "1", "amount": "2"}}]')  # a key given twice
def test_any_ingest_body_gives_events_or_refused(body: bytes) -> None:
    document = _decoded(body)
    items = document if isinstance(document, list) else [document]
    try:
        events = parse_batch(body)
    except BatchRefused as exc:
        refused = exc
    else:
        assert len(events) == len(items)
        for event, item in zip(events, items, strict=True):
            _assert_same_event(event, parse_event(item))
        return
    assert refused.refusals
    for refusal in refused.refusals:
        assert refusal.index is None or 0 <= refusal.index < len(items)
        assert refusal.field
        assert refusal.message


def _decoded(body: bytes) -> Any:
    try:
        return read_json(body)
    except BadJson:
        return None


@FEW
@given(data=event_data())
def test_an_ingested_event_is_the_one_the_producer_library_builds(data: dict[str, Any]) -> None:
    event = parse_event(data)
    (single,) = parse_batch(json.dumps(event.to_json()).encode())
    _assert_same_event(single, event)
    batch = parse_batch(json.dumps([event.to_json()] * 2).encode())
    assert len(batch) == 2
    for ingested in batch:
        _assert_same_event(ingested, event)


# --- the filters and the failure classes ----------------------------------------------------

FILTER_TEXT = st.one_of(
    st.text(UNICODE, max_size=20),
    st.sampled_from(["", "2h", "30m", "0s", "1000000d", "2026-11-21T09:00:00Z", "http_500"]),
    st.sampled_from([*EVENT_TYPES, *STATES, *FAILURE_CLASSES]),
    st.from_regex(r"\d{1,12}", fullmatch=True),
    st.just("a\x00b"),
    st.just("\ud800"),  # a lone surrogate, as a percent-encoded query can carry
)


@MANY
@given(typed=st.dictionaries(st.sampled_from([*DeliveryQuery.model_fields, "x"]), FILTER_TEXT))
def test_any_filter_text_is_a_query_or_refused_naming_a_parameter(typed: dict[str, str]) -> None:
    """The CLI's options and the API's parameters are read so: whatever a person types is
    a query, or refused naming what they typed, never a crash or a complaint about a field
    they did not give."""
    try:
        query = read(DeliveryQuery, typed, noun="parameter")
    except InputError as exc:
        refused = exc
    else:
        for name in ("event_type", "state", "error_class"):
            assert getattr(query, name) == (typed.get(name) or None)
        assert query.since is None or query.until is None or query.since < query.until
        return
    assert {error.field for error in refused.errors} <= set(typed)
    assert all(error.message for error in refused.errors)


@MANY
@given(
    status=st.integers(0, 999),
    error_class=st.none() | st.sampled_from(ERROR_CLASSES),
)
def test_every_failure_is_of_a_class_ops_can_filter_by(
    status: int, error_class: ErrorClass | None
) -> None:
    """A status a receiver sends (the HTTP client takes any three digits) or an error
    before any answer: the class recorded is one the filters take."""
    outcome = Outcome(None if error_class else status, 1.0, error_class)
    failure = outcome.failure_class
    if outcome.ok:
        assert failure is None
    else:
        assert failure in FAILURE_CLASSES
        assert read(DeliveryQuery, {"error_class": failure}).error_class == failure
