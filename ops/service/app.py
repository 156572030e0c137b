"""`postback serve`: one aiohttp service for the order system and for ops.

- `POST /v1/events`: ingest, with the ingest token;
- `/v1/overview`, `/v1/deliveries`, `/v1/dead-letters`, `/v1/callbacks`: the ops API, with
  the ops token;
- `/healthz`, `/metrics`, `/openapi.json` and the ops page at `/`: no token (the page asks
  for the ops token and sends it with each call it makes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from pydantic import SecretStr
from redis.exceptions import RedisError
from yarl import URL

from ops.actions.filters import InputError
from ops.service import api, ingest
from ops.service.api import SERVICES, Services, error
from ops.service.openapi import document
from producer import queue, record
from producer.connection import open_redis
from worker import database, deliver, metrics, tracing
from worker.config import Settings
from worker.pool import HEALTH_CHECK_SECONDS

log = structlog.get_logger("postback.serve")

PAGE = Path(__file__).resolve().parent / "page"
HEALTH_TIMEOUT = 3.0
"""Seconds each health check, and each source a `/metrics` scrape reads, may take before
its part is called down."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_INGEST_TOKEN = web.AppKey("ingest_token", bytes)
_OPS_TOKEN = web.AppKey("ops_token", bytes)


_DOWN: tuple[type[BaseException], ...] = (
    RedisError,
    database.DatabaseUnavailable,
    *database.UNAVAILABLE,
)
"""What a health check's call raises when its part is down."""


class Insecure(Exception):
    """A token is not configured and the service was not told to run without it."""


def _token(value: SecretStr | None) -> bytes:
    return b"" if value is None else value.get_secret_value().encode()


def create_app(settings: Settings, insecure: bool = False) -> web.Application:
    """The service's application. Without `insecure`, both tokens must be configured."""
    missing = [
        name
        for name, value in (
            ("POSTBACK_INGEST_TOKEN", settings.ingest_token),
            ("POSTBACK_OPS_TOKEN", settings.ops_token),
        )
        if value is None
    ]
    if missing and not insecure:
        raise Insecure(
            f"{' and '.join(missing)} not set: set them, or run `postback serve --insecure` "
            "to serve those endpoints to anyone who can reach this port"
        )
    app = web.Application(
        client_max_size=ingest.MAX_BODY, middlewares=[_secure, _errors, _authorize]
    )
    app[_INGEST_TOKEN] = _token(settings.ingest_token)
    app[_OPS_TOKEN] = _token(settings.ops_token)
    for name in missing:
        log.warning("serving_without_token", setting=name)
    app.cleanup_ctx.append(_connections(settings))
    app.router.add_post("/v1/events", post_events)
    app.router.add_routes(api.routes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/", page)
    app.router.add_static("/page/", PAGE, append_version=True)
    return app


def _connections(
    settings: Settings,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def connections(app: web.Application) -> AsyncIterator[None]:
        assert settings.database_url is not None
        assert settings.redis_url is not None
        db = await database.create_pool(settings.database_url, settings.db_pool_size, min_size=0)
        redis = open_redis(settings.redis_url, settings.queue_name)
        http = deliver.session(settings.connect_timeout, settings.request_timeout, settings.allowed)
        app[SERVICES] = Services(settings, db, redis, http)
        try:
            yield
        finally:
            await http.close()
            await redis.aclose()
            await db.close()

    return connections


def _required_token(request: web.Request) -> bytes | None:
    """The token the matched route needs: None for the open ones, b"" when not configured.

    Decided by the route the request matched, not by its path's text, so no spelling of a
    path (a double slash, an encoded character) reaches a handler without its token.
    """
    resource = request.match_info.route.resource
    route = "" if resource is None else resource.canonical
    if route == "/v1/events":
        return request.app[_INGEST_TOKEN]
    if route.startswith("/v1/"):
        return request.app[_OPS_TOKEN]
    return None


_CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@web.middleware
async def _authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    expected = _required_token(request)
    if expected is None:  # an open endpoint
        return await handler(request)
    if expected:
        # Before anything else: a caller without the token gets 401 whatever it sent, and
        # learns nothing from which of the other checks its request would fail.
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return _unauthorized("missing bearer token (Authorization: Bearer TOKEN)")
        # Constant time: how much of a guess is right must not show in the timing.
        if not hmac.compare_digest(given.strip().encode(errors="surrogateescape"), expected):
            return _unauthorized("wrong token")
    elif _name(request.host) not in _LOCAL_NAMES:
        # No token configured (--insecure): only this machine may call. Checking the name
        # it was called by also stops a web page from rebinding its own name to 127.0.0.1.
        return error(403, "without a token, only requests to localhost are served")
    if request.method in _CHANGES:
        # A browser sends a cross-site POST of text/plain or form data without asking
        # first; a web page visited by an ops engineer must not replay or disable anything
        # through a service on their machine. With --insecure no token stops such a
        # request, so this check must not depend on one.
        origin = request.headers.get("Origin")
        if origin is not None and _authority(origin) != request.host:
            return error(403, "cross-site request refused")
        if request.can_read_body and request.content_type != "application/json":
            return error(415, "send the body as JSON (Content-Type: application/json)")
    return await handler(request)


def _authority(origin: str) -> str | None:
    """`host:port` of an Origin header (None for "null" or nonsense)."""
    try:
        return URL(origin).host_port_subcomponent
    except ValueError:
        return None


def _name(host_header: str) -> str | None:
    """The host name of a Host header, without the port or brackets."""
    try:
        return URL(f"http://{host_header}").host
    except ValueError:
        return None


def _unauthorized(message: str) -> web.Response:
    response = error(401, message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="postback"'
    return response


SECURITY_HEADERS = {
    # The page runs only its own script and style files: markup a receiver or a producer
    # wrote cannot run even if it ever reached the page as HTML. Its forms are sent by
    # the script, never by the browser (whose GET would put what they hold in a URL).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""Sent with every response, the API's included: one policy, nothing to forget per route."""


@web.middleware
async def _secure(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # what `_errors` lets through: redirects
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as JSON that says what went wrong, never an HTML page or a traceback."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"the body is larger than {ingest.MAX_BODY} bytes (1 MiB)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error(exc.status, exc.reason)
        if "Allow" in exc.headers:  # a 405 says which methods the path has
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except InputError as exc:
        return error(422, str(exc), [{"field": e.field, "message": e.message} for e in exc.errors])
    except RedisError as exc:
        log.warning("redis_unavailable", path=request.path, error=str(exc))
        return error(
            503, "Redis is unreachable; try again (sending the same request again is safe)"
        )
    except Exception as exc:
        if database.transient(exc) or isinstance(exc, database.DatabaseUnavailable):
            log.warning("database_unavailable", path=request.path, error=database.describe(exc))
            return error(503, "Postgres is unreachable; try again")
        # A bug. Logged without a traceback when the error can quote stored data (a
        # Postgres error's detail quotes the row, and rows hold affiliates' tokens).
        log.error(
            "request_crashed",
            path=request.path,
            error=database.describe(exc),
            exc_info=not isinstance(exc, asyncpg.PostgresError),
        )
        return error(500, "internal error; the service's log has the details")


_DB_INIT = "run `postback db init`"


async def post_events(request: web.Request) -> web.Response:
    """Validate the whole batch, record it in the ledger, then enqueue it; 202 with the ids
    taken once they are in Postgres."""
    with tracing.ingest(request.headers) as span:
        answer = await _post_events(request, span)
        span.set("http.response.status_code", answer.status)
        return answer


async def _post_events(request: web.Request, span: tracing.Span) -> web.Response:
    body = await request.read()
    try:
        events = ingest.parse_batch(body)
    except ingest.BatchRefused as exc:
        errors = [refusal.as_json() for refusal in exc.refusals]
        return error(422, "refused; nothing was enqueued", errors)
    span.set("postback.batch.size", len(events))
    services = request.app[SERVICES]
    try:
        done = await record.accept(
            services.db, services.redis, services.settings.queue_name, events
        )
    except Exception as exc:
        # Nothing is queued before the ledger has the batch: the order system sends it again.
        if database.transient(exc) or isinstance(exc, database.DatabaseUnavailable):
            log.warning("ingest_not_recorded", events=len(events), error=database.describe(exc))
            return error(
                503,
                "Postgres is unreachable: nothing was recorded or enqueued; send the same "
                "request again (safe: event ids are idempotent)",
            )
        if isinstance(exc, database.OUTDATED_SCHEMA):
            log.error("schema_outdated", error=database.describe(exc), hint=_DB_INIT)
            return error(
                503,
                f"the database's schema is older than this relay's: {_DB_INIT}; nothing was "
                "recorded or enqueued",
            )
        raise
    if done.queued is None:
        # Recorded, so safe: the sweep queues them within a minute.
        log.warning("ingest_left_to_sweep", events=len(events), error=done.redis_error)
    queued = done.queued or [True] * len(events)
    return web.json_response(
        {
            "accepted": [event.id for event in events],
            "already_queued": [e.id for e, new in zip(events, queued, strict=True) if not new],
            "queued": done.queued is not None,
        },
        status=202,
    )


async def healthz(request: web.Request) -> web.Response:
    """200 when Redis, Postgres and at least one worker are up; 503 naming what is down."""
    services = request.app[SERVICES]
    (redis_ok, _), (postgres_ok, _) = await asyncio.gather(
        _check(services.redis.ping()), _check(services.db.fetchval("SELECT 1"))
    )
    checks: dict[str, dict[str, Any]] = {"redis": redis_ok, "postgres": postgres_ok}
    if redis_ok["ok"]:
        # arq's health check: each worker reports in every few seconds.
        beat, report = await _check(
            queue.worker_report(services.redis, services.settings.queue_name)
        )
        if beat["ok"] and report is None:
            seconds = HEALTH_CHECK_SECONDS + 1
            beat = {"ok": False, "error": f"no worker has reported in the last {seconds} s"}
        elif beat["ok"]:
            beat["report"] = report
        checks["worker"] = beat
    else:
        checks["worker"] = {"ok": False, "error": "unknown: Redis is unreachable"}
    down = [name for name, check in checks.items() if not check["ok"]]
    return web.json_response(
        {"status": "down" if down else "ok", "down": down, "checks": checks},
        status=503 if down else 200,
    )


async def _check(call: Awaitable[Any]) -> tuple[dict[str, Any], Any]:
    """A part's health as shown, and what the call returned when it worked."""
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            value = await call
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {HEALTH_TIMEOUT:g} s"}, None
    except _DOWN as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, None
    return {"ok": True}, value


async def metrics_text(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = await metrics.exposition(
        services.redis, services.db, services.settings.queue_name, within=HEALTH_TIMEOUT
    )
    response = web.Response(body=body)
    response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return response


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE / "index.html")


async def serve(settings: Settings, host: str, port: int, insecure: bool = False) -> None:
    """Run the service until SIGTERM or SIGINT, then finish the requests in flight."""
    async with serving(settings, host, port, insecure) as url, stop_signals() as stop:
        log.info("serving", url=url)
        await stop.wait()
        log.info("stopping")


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, host: str, port: int, insecure: bool = False
) -> AsyncIterator[str]:
    """The service listening on `host` and `port` (0: any free port) for the block; yields
    the page's URL, with the port it got. On the way out, requests in flight finish first."""
    runner = web.AppRunner(create_app(settings, insecure), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield str(URL.build(scheme="http", host=bound_host, port=bound_port, path="/"))
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def stop_signals() -> AsyncIterator[asyncio.Event]:
    """An event the first SIGTERM or SIGINT (Ctrl-C) sets, instead of interrupting, from the
    moment the block is entered: what says Ctrl-C stops it is said inside, once that holds
    (said before, a quick Ctrl-C would interrupt the clean-up)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signal_number in signals:
        loop.add_signal_handler(signal_number, stop.set)
    try:
        yield stop
    finally:
        for signal_number in signals:
            loop.remove_signal_handler(signal_number)
