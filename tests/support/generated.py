"""Generated input for the property tests: events, amounts, times and hostile text, as
hypothesis strategies shared by the tests of templates, filters, events and ingest."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from hypothesis import settings
from hypothesis import strategies as st

from producer.event import EVENT_TYPES, STORE_WIDE, parse_event

# deadline=None: pydantic and hypothesis warm up on the first examples, and a shared CI
# machine must not turn a slow example into a failure. The counts keep the file well under
# 20 s.
FEW = settings(max_examples=100, deadline=None)
MANY = settings(max_examples=300, deadline=None)

# --- strategies --------------------------------------------------------------------------

# Text a value can carry. Surrogates are left out: the model refuses a string holding one
# (from a JSON escape such as "\ud800"; the ingest tests send those), so none reaches render.
UNICODE = st.characters(codec="utf-8")
HOSTILE_PIECES = (
    "&x=1", "#", "?", "/", "%00", "%", "%2F", "%zz", "\r\n", "\r", "\n", "\x00", "\t", " ",
    "+", "=", ";", ",", ":", "@", "\\", "[", "]", "..", ".", "~", "'", '"', "<", ">",
    "😀", "ü", "\u2028", "\ufeff", "\u0130", "\u3002", "١٢", "Set-Cookie: a=b",
    "{{order.number}}", "https://evil.example/", "//evil.example",
)  # fmt: skip
"""Characters and strings that mean something to a URL, an HTTP request line or a header."""

HOSTILE_TEXT = st.one_of(
    st.text(UNICODE),
    st.lists(st.one_of(st.sampled_from(HOSTILE_PIECES), st.text(UNICODE, max_size=3))).map("".join),
)


def bounded(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """Event text as the model allows it: bounded, and without NUL, which it refuses."""
    alphabet = st.characters(codec="utf-8", exclude_characters="\x00")
    pieces = st.sampled_from([p for p in HOSTILE_PIECES if "\x00" not in p])
    return st.text(alphabet, min_size=min_size, max_size=max_size) | st.lists(
        pieces, min_size=min_size, max_size=max_size
    ).map(lambda chosen: "".join(chosen)[:max_size])


AMOUNTS = st.builds(
    # At most 20 digits before the point and 18 after, as the model allows.
    lambda digits, places: Decimal(digits).scaleb(-places),
    st.integers(min_value=-(10**20) + 1, max_value=10**20 - 1),
    st.integers(min_value=0, max_value=18),
)
LINK_URLS = st.builds(
    "{}://{}{}/{}?{}#{}".format,
    st.sampled_from(["http", "https", "HTTPS"]),
    st.sampled_from(["shop.example", "SHOP.example:8443", "user@shop.example", "[2001:db8::1]"]),
    st.sampled_from(["", ":80"]),
    bounded(0, 40),
    st.one_of(
        bounded(0, 40),
        st.lists(st.tuples(bounded(0, 8), bounded(0, 8)), max_size=4).map(
            lambda pairs: "&".join(f"{quote(k)}={quote(v)}" for k, v in [("ref", "x"), *pairs])
        ),
    ),
    bounded(0, 40),
).filter(lambda url: len(url) <= 4096)
ANY_OFFSET = st.builds(
    timezone,
    st.timedeltas(
        min_value=timedelta(hours=-23, minutes=-59, seconds=-59),
        max_value=timedelta(hours=23, minutes=59, seconds=59),
    ),
)
"""Offsets as Python allows them: seconds and microseconds included."""
ANY_TIME = st.datetimes(timezones=st.timezones() | ANY_OFFSET)


def _whole_minutes(moment: datetime) -> bool:
    offset = moment.utcoffset()
    return offset is not None and not offset % timedelta(minutes=1)


VALID_TIME = ANY_TIME.filter(_whole_minutes)
"""RFC 3339 offsets are whole minutes; the model refuses others (tested below)."""


@st.composite
def event_data(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event as a producer hands it over: Python values, optional fields varied."""
    order: dict[str, Any] = {
        "number": draw(bounded(1, 128)),
        "amount": draw(AMOUNTS | AMOUNTS.map(str)),
        "commission": draw(AMOUNTS | AMOUNTS.map(str)),
    }
    if draw(st.booleans()):
        order["currency"] = draw(st.from_regex(r"[A-Z]{3}", fullmatch=True))
    if draw(st.booleans()):
        order["status"] = draw(bounded(1, 64))
    link: dict[str, Any] = {"url": draw(LINK_URLS)}
    if draw(st.booleans()):
        link["sub_id"] = draw(bounded(0, 256))
    data: dict[str, Any] = {
        "id": draw(bounded(1, 128)),
        "type": draw(st.sampled_from(EVENT_TYPES)),
        # `*` names the store-wide callback, never an event's affiliate.
        "affiliate_id": draw(bounded(1, 64).filter(lambda a: a != STORE_WIDE)),
        "order": order,
        "link": link,
    }
    if draw(st.booleans()):
        data["occurred_at"] = draw(VALID_TIME)
    return data


EVENTS = event_data().map(parse_event)
