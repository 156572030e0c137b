"""How the CLI lays out one delivery (`postback deliveries show`): plain functions from the
ledger's JSON to text, tested without a database."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ops.cli import console

pytestmark = pytest.mark.unit

URL = "https://t.example/pb?o=%231001"
BODY = {"link": {"query": {}}, "order": {"number": "#1001", "amount": "10.50"}}
AS_SENT = json.dumps(BODY, separators=(",", ":")).encode()
STORED = {"order": BODY["order"], "link": BODY["link"]}
"""The body as the ledger gives it back: the same JSON, its keys in another order."""


def request(method: str = "POST", **headers: str) -> dict[str, Any]:
    return {
        "method": method,
        "url": URL,
        "headers": {"User-Agent": "postback-relay/1", "Idempotency-Key": "d-1", **headers},
        "body": STORED if method == "POST" else None,
    }


def attempt(number: int = 1, **changes: Any) -> dict[str, Any]:
    return {
        "number": number,
        "started_at": "2026-11-21T09:00:00+00:00",
        "duration_ms": 12.3,
        "status_code": 500,
        "error_class": None,
        "error": None,
        "response_excerpt": "down for\nmaintenance",
        "response_headers": {"Content-Type": "text/plain", "Retry-After": "60"},
        "request": request(),
        **changes,
    }


def delivery(**changes: Any) -> dict[str, Any]:
    return {
        "id": "3f2a9c1e-0000-4000-8000-000000000001",
        "event_id": "e-1",
        "event_type": "order.created",
        "affiliate_id": "ann",
        "order_number": "#1001",
        "state": "retrying",
        "reason": "HTTP 500",
        "error_class": "http_5xx",
        "blocked_by": None,
        "create_wait_until": None,
        "order_note": None,
        "created_at": "2026-11-21T09:00:00+00:00",
        "occurred_at": "2026-11-21T08:59:00+00:00",
        "next_attempt_at": None,
        "callback_id": 12,
        "callback_store_wide": False,
        "request": request(),
        "attempts": [attempt()],
        "actions": [],
        **changes,
    }


def test_a_post_is_shown_as_an_http_message_with_the_body_as_sent() -> None:
    assert console.request_lines(request(**{"webhook-id": "d-1"}), AS_SENT) == [
        f"POST {URL}",
        "User-Agent: postback-relay/1",
        "Idempotency-Key: d-1",
        "webhook-id: d-1",
        "",
        AS_SENT.decode(),
    ]


def test_a_get_has_no_body() -> None:
    assert console.request_lines(request("GET"), None) == [
        f"GET {URL}",
        "User-Agent: postback-relay/1",
        "Idempotency-Key: d-1",
    ]


@pytest.mark.parametrize(
    ("as_sent", "shown"),
    [
        pytest.param(AS_SENT, AS_SENT.decode(), id="the-bytes-sent"),
        pytest.param(None, json.dumps(STORED, separators=(",", ":")), id="unknown"),
        pytest.param(b'{"other":1}', json.dumps(STORED, separators=(",", ":")), id="not-it"),
        pytest.param(b"\xff", json.dumps(STORED, separators=(",", ":")), id="not-json"),
    ],
)
def test_the_body_is_the_bytes_sent_only_when_they_hold_the_stored_json(
    as_sent: bytes | None, shown: str
) -> None:
    assert console.sent_body(STORED, as_sent) == shown


def test_an_answer_shows_its_status_headers_and_excerpt() -> None:
    assert console.response_lines(attempt()) == [
        "HTTP 500",
        "Content-Type: text/plain",
        "Retry-After: 60",
        "",
        "down for maintenance",
    ]


def test_an_answer_recorded_before_headers_were_kept_says_so() -> None:
    lines = console.response_lines(attempt(response_headers=None, response_excerpt=""))
    assert lines == ["HTTP 500", "(headers not recorded)"]


def test_no_answer_is_said_once() -> None:
    """The attempt's line says why: `timeout: ...`."""
    failed = attempt(
        status_code=None,
        error_class="timeout",
        error="no complete answer within the timeout",
        response_headers=None,
        response_excerpt=None,
    )
    assert console.response_lines(failed) == ["(no answer)"]


def test_an_exchange_marks_what_went_and_what_came_as_curl_does() -> None:
    lines = console.exchange_lines(attempt(request=request("GET")), None)
    assert lines == [
        f"> GET {URL}",
        "> User-Agent: postback-relay/1",
        "> Idempotency-Key: d-1",
        "< HTTP 500",
        "< Content-Type: text/plain",
        "< Retry-After: 60",
        "<",
        "< down for maintenance",
    ]
    assert console.exchange_lines(attempt(request=None), None)[0] == "> (not recorded)"


def test_show_prints_each_attempt_in_full_under_its_summary() -> None:
    second = attempt(2, status_code=200, response_excerpt="ok", response_headers={})
    text = console.delivery_text(delivery(attempts=[attempt(), second]), AS_SENT)
    lines = text.splitlines()
    assert f"request    POST {URL}" in lines
    assert "  #1  2026-11-21 09:00:00 UTC  12 ms  HTTP 500" in lines
    assert "  #2  2026-11-21 09:00:00 UTC  12 ms  HTTP 200" in lines
    assert lines.count(f"      > {AS_SENT.decode()}") == 2
    assert lines.count("      < Retry-After: 60") == 1
    assert "      < ok" in lines
    # The last request is shown once, with its attempt.
    assert lines.count("           User-Agent: postback-relay/1") == 0


def test_show_prints_the_request_in_full_when_no_attempt_shows_it() -> None:
    text = console.delivery_text(delivery(attempts=[attempt(request=None)]), AS_SENT)
    lines = text.splitlines()
    index = lines.index(f"request    POST {URL}")
    assert lines[index + 1 : index + 5] == [
        "           User-Agent: postback-relay/1",
        "           Idempotency-Key: d-1",
        "",
        f"           {AS_SENT.decode()}",
    ]


def test_a_receivers_headers_cannot_drive_the_terminal() -> None:
    loud = attempt(response_headers={"X-Title": "\x1b]0;pwned\x07"})
    assert "\x1b" not in console.delivery_text(delivery(attempts=[loud]))


@pytest.mark.parametrize(
    ("callback_id", "store_wide", "word", "line"),
    [
        (12, False, "own", "callback   #12 (own)"),
        (12, True, "store-wide", "callback   #12 (store-wide)"),
        (12, None, "removed", "callback   #12 (removed since)"),
        (None, None, "-", "callback   none"),
    ],
)
def test_a_delivery_says_which_callback_it_went_to(
    callback_id: int | None, store_wide: bool | None, word: str, line: str
) -> None:
    d = delivery(callback_id=callback_id, callback_store_wide=store_wide)
    assert console.callback_used(d) == word
    assert line in console.delivery_text(d).splitlines()
