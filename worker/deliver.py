"""The HTTP side of a delivery: build the request from a callback and an event, send it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Mapping
from importlib.metadata import version
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from producer.event import Event
from producer.record import delivery_id as delivery_id  # its one home: ingest records by it
from worker import address, render, sign
from worker.exchange import ErrorClass, Outcome, Request

USER_AGENT = f"postback-relay/{version('postback-relay')}"
MAX_REDIRECTS = 3
BODY_LIMIT = 64 * 1024
"""Bytes of a response body read and kept; a receiver cannot make the worker read more."""

QUICK_RETRY_SECONDS = 0.5
"""A failed connect is tried once more this soon, inside the same attempt: most are a
receiver restarting, and the schedule's first wait (a minute) would be for nothing."""

_UNUSABLE_URL = (aiohttp.InvalidURL, aiohttp.RedirectClientError, aiohttp.NonHttpUrlClientError)
"""A URL aiohttp will not request: malformed, or not http(s), from the template or a
redirect's Location."""


def build_request(
    method: str,
    template: render.Template,
    event: Event,
    delivery: uuid.UUID | str,
    secret: str | sign.Signer | None = None,
    timestamp: int | None = None,
) -> Request:
    """The request one attempt sends; signed when the callback has a secret (as it is, or
    already set up: the worker keeps a `Signer` with each callback it loads).

    `delivery` is the Idempotency-Key and the signature's message id. `timestamp` (Unix
    seconds, default now) is what the signature vouches for, so each attempt is built
    afresh and a receiver can refuse stale replays.
    """
    # One set of variables for both the URL and a POST's body.
    values = render.variables(event)
    url = render.render(template, values)
    body = None
    if method == "POST":
        body = _body(values, url if template.uses_filters else None)
    return _request(method, url, body, str(delivery), secret, timestamp)


def resend_request(
    stored: dict[str, Any],
    event: Event,
    secret: str | sign.Signer | None,
    timestamp: int | None = None,
) -> Request:
    """A recorded request (`Request.as_json`) sent again as it was: the same method, URL and
    Idempotency-Key, and the same body, which is made from the event and, when it had a
    `rendered_query`, the recorded URL; signed afresh with the callback's secret as it is
    now, since a receiver refuses an old timestamp."""
    method = stored["method"]
    return _request(
        method,
        stored["url"],
        recorded_body(stored, event) if method == "POST" else None,
        stored["headers"]["Idempotency-Key"],
        secret,
        timestamp,
    )


def _request(
    method: str,
    url: str,
    body: bytes | None,
    message_id: str,
    secret: str | sign.Signer | None,
    timestamp: int | None,
) -> Request:
    """`body`: a POST's, None for a GET."""
    headers = {"User-Agent": USER_AGENT, "Idempotency-Key": message_id}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if secret is not None:
        signer = sign.Signer(secret) if isinstance(secret, str) else secret
        signed_at = int(time.time()) if timestamp is None else timestamp
        headers |= signer.headers(message_id, signed_at, _signed_content(url, body))
    return Request(method, url, headers, body)


def post_body(event: Event, rendered: str | None = None) -> bytes:
    """A POST's body, the same bytes for every attempt: it is made from the event alone,
    and for a template with filters from the URL rendered from it (`rendered`), whose query
    it carries as `rendered_query`. (The ledger keeps it as JSON, which does not keep the
    order of its keys.)"""
    return _body(render.variables(event), rendered)


def recorded_body(stored: dict[str, Any], event: Event) -> bytes:
    """The bytes a recorded POST (`Request.as_json`) sent, made again: from the event, and
    from the recorded URL when the body had a `rendered_query`."""
    sent = stored.get("body")
    filtered = isinstance(sent, dict) and "rendered_query" in sent
    return post_body(event, stored["url"] if filtered else None)


def _body(values: Mapping[str, str], rendered: str | None) -> bytes:
    return json.dumps(render.body(values, rendered), separators=(",", ":")).encode()


def _signed_content(url: str, body: bytes | None) -> bytes:
    """What the signature covers: the body, as Standard Webhooks has it; for a GET, which
    has none, the request target in its place, so no query parameter can be changed under
    the signature. After a redirect the same headers go along, so the signature covers the
    target the relay first asked for, not the one the redirected-to receiver gets."""
    if body is not None:
        return body
    try:
        # UTF-8, as aiohttp writes the request line.
        return request_target(url).encode()
    except ValueError:
        # Never sent: `send` refuses such a URL as invalid_url before anything goes out.
        return b""


def wire_url(url: str) -> URL:
    """The URL a request to `url` goes to. Raises ValueError for one yarl cannot read."""
    # encoded=True: the rendered URL goes out byte for byte; yarl would otherwise
    # "normalise" it, e.g. turn an encoded value's %2F back into /.
    return URL(url, encoded=True)


def request_target(url: str) -> str:
    """The request target on the request line of a request to `url`: its path and query,
    exactly as they are in it (`/` for an empty path, never the fragment).

    Raises ValueError for a URL yarl cannot read.
    """
    # What aiohttp's ClientRequest.send writes when not sending through a proxy, which the
    # relay never does.
    return wire_url(url).raw_path_qs


def session(
    connect_timeout: float,
    request_timeout: float,
    allowed: tuple[address.Network, ...],
    resolver: AbstractResolver | None = None,
) -> aiohttp.ClientSession:
    """The one session a worker (or the service, for test fires) shares, so connections
    are reused.

    Every socket it opens, for each address a name resolves to and each redirect hop, is
    checked against the SSRF policy first; `allowed` are the networks opened on top.
    `resolver` stands in for the system's name resolution (the tests' hosts table).
    """
    # `connect` covers name resolution and the TCP/TLS handshake, not just the socket.
    timeout = aiohttp.ClientTimeout(total=request_timeout, connect=connect_timeout)
    connector = aiohttp.TCPConnector(
        socket_factory=address.SocketFactory(allowed),
        resolver=address.PolicyResolver(allowed, resolver),
        # No pool-wide cap for a receiver that holds its connections to fill: each request
        # holds one connection for at most the total timeout, and a worker runs at most
        # max_jobs of them.
        limit=0,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        # Cookies from one affiliate must never travel to another.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Never through a proxy from the environment: only the proxy's address would be
        # checked, and it would connect anywhere.
        trust_env=False,
        middlewares=(_never_resend,),
    )


class _CutOff(aiohttp.ClientError):
    """A request the receiver cut off on a kept-alive connection, kept from aiohttp's
    re-send; `cut` is the error aiohttp raised."""

    def __init__(self, cut: aiohttp.ClientOSError | aiohttp.ServerDisconnectedError) -> None:
        super().__init__(cut)
        self.cut = cut


async def _never_resend(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """aiohttp (3.10+) silently sends a GET again when the receiver closed the kept-alive
    connection it went out on: two requests on the wire in one recorded attempt. It re-sends
    on exactly these two errors, so passed on as another, every request is an attempt of its
    own: the cut-off one fails as http_error and is retried on the schedule.
    tests/test_receivers.py counts requests against attempts."""
    try:
        return await handler(request)
    except aiohttp.ClientConnectorError:
        raise  # a ClientOSError too, but nothing was sent: `attempt` tries it again at once
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        raise _CutOff(exc) from exc


async def send(
    http: aiohttp.ClientSession, request: Request, started: float | None = None
) -> Outcome:
    """`started` (a `time.perf_counter()`) is when the duration counts from: by default now,
    and for `attempt`'s second try, when the first began."""
    started = time.perf_counter() if started is None else started
    try:
        url = wire_url(request.url)
    except ValueError:
        # A URL stored before the template check refused its kind must not crash the job.
        return _failure(started, "invalid_url", "the URL cannot be requested (only http(s) is)")
    try:
        async with http.request(
            request.method,
            url,
            headers=request.headers,
            data=request.body,
            allow_redirects=True,
            # aiohttp gives up when it receives its max_redirects-th redirect: +1 follows 3.
            max_redirects=MAX_REDIRECTS + 1,
        ) as response:
            raw = await _read_capped(response.content)
            status = response.status
            headers = tuple((header_text(k), header_text(v)) for k, v in response.headers.items())
    except TimeoutError:
        return _failure(started, "timeout", "no complete answer within the timeout")
    except aiohttp.TooManyRedirects:
        return _failure(started, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects")
    except _UNUSABLE_URL as exc:
        return _unusable(started, exc)
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, address.BlockedAddress):
            return _failure(started, "blocked_address", exc.os_error.detail)
        return _failure(started, "connect_error", str(exc))
    except _CutOff as exc:
        return _failure(started, "http_error", _without_url(exc.cut))
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
        return _failure(started, "http_error", _without_url(exc))
    return Outcome(status, _elapsed_ms(started), excerpt=excerpt(raw), headers=headers)


def _unusable(started: float, exc: Exception) -> Outcome:
    redirect = isinstance(exc, aiohttp.RedirectClientError)
    if isinstance(exc, aiohttp.InvalidURL):
        # aiohttp refuses a host that spells an IPv4 address the legacy way (2130706433),
        # whatever the allow-list says; when the address is one the policy refuses, that is
        # what ops are told.
        # A host refused for its spelling comes as the bare host, not a URL.
        host = (exc.url.host or "") if isinstance(exc.url, URL) else str(exc.url)
        legacy = address.legacy_spelling(host)
        if legacy is not None:
            whose = "a redirect's host" if redirect else "the URL's host"
            said = f"{whose} {host} is {legacy} in a legacy spelling, which is never requested"
            reason = address.refusal(legacy)
            if reason is None:
                return _failure(started, "invalid_url", said)
            return _failure(started, "blocked_address", f"{said}; it is {reason}")
    # The exceptions' text quotes the URL, whose query may hold the affiliate's token.
    what = "a redirect's Location" if redirect else "the URL"
    return _failure(started, "invalid_url", f"{what} cannot be requested (only http(s) is)")


def _without_url(exc: BaseException) -> str:
    """The error's text without the URL a response error quotes: its query may hold the
    affiliate's token, and error texts reach the logs."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _connect_failed(outcome: Outcome) -> bool:
    return outcome.error_class == "connect_error"


async def attempt(http: aiohttp.ClientSession, request: Request) -> Outcome:
    """One attempt of a delivery: the request, sent a second time only if the connect failed.

    Nothing reached the receiver when a connect fails, so the quick second try cannot
    duplicate anything; the attempt is recorded once, with the time both tries took.
    """
    # Two plain tries rather than a retry library: its per-call set-up was the largest part
    # of the relay's own CPU per delivery (issue 18), for a rule this short.
    started = time.perf_counter()
    outcome = await send(http, request, started)
    if not _connect_failed(outcome):
        return outcome
    await asyncio.sleep(QUICK_RETRY_SECONDS)
    outcome = await send(http, request, started)
    if _connect_failed(outcome):
        outcome = dataclasses.replace(outcome, error=f"{outcome.error} (and again after a retry)")
    return outcome


async def _read_capped(stream: aiohttp.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < BODY_LIMIT:
        chunk = await stream.read(BODY_LIMIT - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def excerpt(raw: bytes) -> str:
    """Text safe to store whatever the receiver sent: NUL bytes cannot go into Postgres text."""
    return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def header_text(value: str) -> str:
    """A header as `excerpt` keeps a body: aiohttp hands on bytes that are not UTF-8 as lone
    surrogates, which Postgres cannot hold (nor a terminal show)."""
    if value.isascii() and "\x00" not in value:
        return value  # what the round trip below gives back, without it: nearly every header
    return excerpt(value.encode("utf-8", errors="surrogatepass"))


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _failure(started: float, error_class: ErrorClass, message: str) -> Outcome:
    return Outcome(None, _elapsed_ms(started), error_class, message)
