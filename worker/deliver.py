"""The HTTP side of a delivery: build the request from a callback and an event, send it."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import aiohttp
from yarl import URL

from producer.event import Event
from worker import render, sign

USER_AGENT = f"postback-relay/{version('postback-relay')}"
MAX_REDIRECTS = 3
BODY_LIMIT = 64 * 1024
"""Bytes of a response body read and kept; a receiver cannot make the worker read more."""

_DELIVERY_NAMESPACE = uuid.UUID("5d0b5c6e-7c1a-4f4e-9a55-0f6a2b8d4e21")


def delivery_id(event: Event) -> uuid.UUID:
    """Stable for the event and its callback key, so every try carries the same id."""
    return uuid.uuid5(_DELIVERY_NAMESPACE, f"{event.id}\n{event.affiliate_id}\n{event.type}")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None

    def as_json(self) -> dict[str, Any]:
        """The request as recorded in the ledger and shown by `preview --json`."""
        return {
            "method": self.method,
            "url": self.url,
            "headers": self.headers,
            "body": None if self.body is None else json.loads(self.body),
        }


def build_request(
    method: str,
    template: render.Template,
    event: Event,
    delivery: uuid.UUID,
    secret: str | None = None,
    timestamp: int | None = None,
) -> Request:
    """The request one attempt sends; signed when the callback has a secret.

    `timestamp` (Unix seconds, default now) is what the signature vouches for, so each
    attempt is built afresh and a receiver can refuse stale replays.
    """
    values = render.variables(event)
    headers = {"User-Agent": USER_AGENT, "Idempotency-Key": str(delivery)}
    body = None
    if method == "POST":
        headers["Content-Type"] = "application/json"
        body = json.dumps(render.body(values), separators=(",", ":")).encode()
    if secret is not None:
        signed_at = int(time.time()) if timestamp is None else timestamp
        headers |= sign.headers(secret, str(delivery), signed_at, body or b"")
    return Request(method, render.render(template, values), headers, body)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt got: a status code, or an error class and message."""

    status: int | None
    duration_ms: float
    error_class: str | None = None
    error: str | None = None
    excerpt: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def session(connect_timeout: float, request_timeout: float) -> aiohttp.ClientSession:
    """The one session a worker shares across deliveries, so connections are reused."""
    # `connect` covers name resolution and the TCP/TLS handshake, not just the socket.
    timeout = aiohttp.ClientTimeout(total=request_timeout, connect=connect_timeout)
    # Cookies from one affiliate must never travel to another.
    return aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.DummyCookieJar())


async def send(http: aiohttp.ClientSession, request: Request) -> Outcome:
    started = time.perf_counter()
    try:
        async with http.request(
            request.method,
            # encoded=True: the rendered URL goes out byte for byte; yarl would otherwise
            # "normalise" it, e.g. turn an encoded value's %2F back into /.
            URL(request.url, encoded=True),
            headers=request.headers,
            data=request.body,
            allow_redirects=True,
            # aiohttp gives up when it receives its max_redirects-th redirect: +1 follows 3.
            max_redirects=MAX_REDIRECTS + 1,
        ) as response:
            raw = await _read_capped(response.content)
            status = response.status
    except TimeoutError:
        return _failure(started, "timeout", "no complete answer within the timeout")
    except aiohttp.TooManyRedirects:
        return _failure(started, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects")
    except aiohttp.ClientConnectorError as exc:
        return _failure(started, "connect_error", str(exc))
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
        return _failure(started, "http_error", f"{type(exc).__name__}: {exc}")
    return Outcome(status, _elapsed_ms(started), excerpt=excerpt(raw))


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


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _failure(started: float, error_class: str, message: str) -> Outcome:
    return Outcome(None, _elapsed_ms(started), error_class, message)
