"""The ops API under /v1/: deliveries, dead letters and callbacks, for the page and scripts.

Handlers are thin: each reads its input, calls the function the CLI calls too (records,
replay, callbacks, testfire), and answers JSON. Every refusal is JSON with `error` and,
where a field is to blame, `errors: [{field, message}]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from arq.connections import ArqRedis

from ops.actions import lookup, replay, testfire
from ops.actions.lookup import Cursor, Filter, InputError, check_text
from producer.event import EVENT_TYPES, InvalidEvent, parse_event
from producer.json_input import BadJson, read_json
from worker import callbacks, render
from worker.config import Settings

DEFAULT_ACTOR = "api"
MAX_ACTOR = 200
MAX_NOTE = 2000


@dataclass(frozen=True, slots=True)
class Services:
    """What the handlers share, opened when the service starts."""

    settings: Settings
    db: asyncpg.Pool
    redis: ArqRedis
    http: aiohttp.ClientSession
    """For test fires, with the workers' timeouts."""


SERVICES = web.AppKey("services", Services)

routes = web.RouteTableDef()


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        raise InputError(unknown[0], f"unknown parameter; known: {', '.join(allowed)}")
    return {key: check_text(key, request.query[key]) for key in allowed if key in request.query}


async def _body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The request's JSON object (empty body: `{}`), with no key outside `allowed`."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = read_json(raw)  # as ingest reads it: a test fire's event reads the same
    except BadJson as exc:
        raise InputError("body", str(exc)) from None
    if not isinstance(data, dict):
        raise InputError("body", "must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InputError(unknown[0], f"unknown field; known: {', '.join(allowed)}")
    return data


def _text(
    data: Mapping[str, Any], key: str, *, default: str | None = None, limit: int = MAX_ACTOR
) -> str | None:
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(key, "must be a string")
    if len(value) > limit:
        raise InputError(key, f"must be at most {limit} characters")
    return check_text(key, value)


def _actor(data: Mapping[str, Any]) -> str:
    actor = _text(data, "actor", default=DEFAULT_ACTOR)
    if not actor or not actor.strip():
        raise InputError("actor", "must not be empty")
    return actor.strip()


def _mode(data: Mapping[str, Any]) -> replay.Mode:
    mode = data.get("mode", "rerender")
    if mode not in replay.MODES:
        raise InputError("mode", f"must be one of {', '.join(replay.MODES)}")
    result: replay.Mode = mode
    return result


def _delivery_id(request: web.Request) -> Any:
    return lookup.parse_id(request.match_info["id"])


def _callback_key(request: web.Request) -> tuple[str, str]:
    event_type = request.match_info["event_type"]
    if event_type not in EVENT_TYPES:
        raise InputError("event_type", f"must be one of {', '.join(EVENT_TYPES)}")
    return check_text("affiliate", request.match_info["affiliate"]), event_type


def error(status: int, message: str, errors: list[dict[str, Any]] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if errors is not None:
        body["errors"] = errors
    return web.json_response(body, status=status)


async def _listing(request: web.Request, dead_letters: bool) -> web.Response:
    allowed = (*lookup.FILTER_FIELDS, "limit", "cursor")
    if dead_letters:
        allowed = tuple(name for name in allowed if name != "state")
    given = _query(request, allowed)
    where = Filter.parse(given)
    if dead_letters:
        where = where.dead_letters()
    cursor = Cursor.decode(given["cursor"]) if "cursor" in given else None
    page = await lookup.list_deliveries(
        _services(request).db, where, lookup.parse_limit(given.get("limit")), cursor
    )
    return web.json_response({"items": page.items, "next": page.next})


@routes.get("/v1/deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    return await _listing(request, dead_letters=False)


@routes.get("/v1/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    return await _listing(request, dead_letters=True)


@routes.get("/v1/deliveries/{id}")
async def show_delivery(request: web.Request) -> web.Response:
    _query(request, ())
    found = await lookup.show_delivery(_services(request).db, _delivery_id(request))
    if found is None:
        return error(404, "no such delivery")
    return web.json_response(found)


def _result_response(result: replay.Result) -> web.Response:
    if result.outcome == "not_found":
        return error(404, "no such delivery")
    if result.outcome == "skipped":
        return error(409, f"not done: {result.reason}")
    return web.json_response({"delivery_id": result.delivery_id, "outcome": result.outcome})


@routes.post("/v1/dead-letters/{id}/replay")
async def replay_one(request: web.Request) -> web.Response:
    _query(request, ())
    delivery = _delivery_id(request)
    data = await _body(request, ("mode", "actor"))
    services = _services(request)
    result = await replay.replay(
        services.db,
        services.redis,
        services.settings.queue_name,
        delivery,
        _mode(data),
        _actor(data),
    )
    return _result_response(result)


@routes.post("/v1/dead-letters/replay")
async def replay_all(request: web.Request) -> web.Response:
    _query(request, ())
    data = await _body(request, ("mode", "actor", "filter", "all"))
    given = data.get("filter", {})
    if not isinstance(given, dict):
        raise InputError("filter", "must be a JSON object")
    if data.get("all", False) not in (True, False):
        raise InputError("all", "must be true or false")
    if not any(given.values()) and data.get("all") is not True:
        # One stray request must not replay every dead letter there is.
        raise InputError("filter", 'give at least one filter, or "all": true')
    fields = tuple(name for name in lookup.FILTER_FIELDS if name != "state")
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise InputError(f"filter.{unknown[0]}", f"unknown field; known: {', '.join(fields)}")
    text = {key: _text(given, key, limit=4096) for key in given}
    services = _services(request)
    summary = await replay.replay_matching(
        services.db,
        services.redis,
        services.settings.queue_name,
        Filter.parse(text),
        _mode(data),
        _actor(data),
    )
    return web.json_response(
        {
            "replayed": summary.replayed,
            "skipped": summary.skipped,
            "failed": summary.failed,
            "problems": summary.problems,
        }
    )


@routes.post("/v1/dead-letters/{id}/discard")
async def discard_one(request: web.Request) -> web.Response:
    _query(request, ())
    delivery = _delivery_id(request)
    data = await _body(request, ("note", "actor"))
    note = _text(data, "note", limit=MAX_NOTE)
    if note is None or not note.strip():
        raise InputError("note", "is required: say why it is discarded")
    result = await replay.discard(_services(request).db, delivery, note, _actor(data))
    return _result_response(result)


@routes.get("/v1/callbacks")
async def list_callbacks(request: web.Request) -> web.Response:
    given = _query(request, ("affiliate",))
    found = await callbacks.list_all(_services(request).db, given.get("affiliate") or None)
    return web.json_response({"items": [cb.public() for cb in found]})


@routes.put("/v1/callbacks/{affiliate}/{event_type}")
async def set_callback(request: web.Request) -> web.Response:
    _query(request, ())
    affiliate, event_type = _callback_key(request)
    data = await _body(request, ("method", "url", "secret"))
    url = _text(data, "url", limit=8192)
    if url is None:
        raise InputError("url", "is required")
    method = _text(data, "method", default="GET") or "GET"
    try:
        spec = callbacks.validate(
            affiliate,
            event_type,
            method,
            url,
            _text(data, "secret"),
            allowed=_services(request).settings.allowed,
        )
    except callbacks.CallbackError as exc:
        raise InputError(exc.field, exc.message) from None
    saved = await callbacks.save(_services(request).db, spec)
    # A generated secret is answered this once, for the affiliate; never again.
    shown = {"secret": spec.secret} if spec.generated else {}
    return web.json_response(saved.public() | shown)


@routes.delete("/v1/callbacks/{affiliate}/{event_type}")
async def remove_callback(request: web.Request) -> web.Response:
    _query(request, ())
    affiliate, event_type = _callback_key(request)
    if not await callbacks.remove(_services(request).db, affiliate, event_type):
        return error(404, f"no {event_type} callback for affiliate {affiliate}")
    return web.json_response({"removed": True})


async def _switch(request: web.Request, enabled: bool) -> web.Response:
    _query(request, ())
    affiliate, event_type = _callback_key(request)
    db = _services(request).db
    if not await callbacks.set_enabled(db, affiliate, event_type, enabled):
        return error(404, f"no {event_type} callback for affiliate {affiliate}")
    found = await callbacks.get(db, affiliate, event_type)
    assert found is not None
    return web.json_response(found.public())


@routes.post("/v1/callbacks/{affiliate}/{event_type}/enable")
async def enable_callback(request: web.Request) -> web.Response:
    return await _switch(request, True)


@routes.post("/v1/callbacks/{affiliate}/{event_type}/disable")
async def disable_callback(request: web.Request) -> web.Response:
    return await _switch(request, False)


@routes.post("/v1/callbacks/{affiliate}/{event_type}/test")
async def test_callback(request: web.Request) -> web.Response:
    _query(request, ())
    affiliate, event_type = _callback_key(request)
    data = await _body(request, ("event", "actor"))
    event = None
    if data.get("event") is not None:
        try:
            event = parse_event(data["event"])
        except InvalidEvent as exc:
            errors = [{"field": f"event.{e.field}", "message": e.message} for e in exc.errors]
            return error(422, str(exc), errors)
    services = _services(request)
    callback = await callbacks.get(services.db, affiliate, event_type)
    if callback is None:
        return error(404, f"no {event_type} callback for affiliate {affiliate}")
    try:
        fired = await testfire.fire(services.db, services.http, callback, event, _actor(data))
    except testfire.EventMismatch as exc:
        raise InputError("event", str(exc)) from None
    except render.TemplateError as exc:  # only a template edited into the table by hand
        return error(409, f"the stored template is invalid: {exc}; set the callback again")
    return web.json_response(fired)
