"""The ops API under /v1/: the overview, deliveries, dead letters, callbacks and affiliates'
erasure, for the page and scripts.

Handlers are thin: each reads its path, query and body as the models the OpenAPI document
is generated from (ops/service/models.py, ops/actions/filters.py), calls the function the
CLI calls too (lookup, replay, callbacks, testfire, erase), and answers JSON. Every refusal
is JSON with `error` and, where a field is to blame, `errors: [{field, message}]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import asyncpg
from aiohttp import web
from arq.connections import ArqRedis
from pydantic import BaseModel

from ops.actions import erase, lookup, overview, replay, switch, testfire
from ops.actions.filters import (
    DeadLetterQuery,
    DeliveryFilter,
    DeliveryQuery,
    InputError,
    Paging,
    read,
)
from ops.service.models import (
    AffiliatePath,
    BulkReplayBody,
    CallbackBody,
    CallbackPath,
    CallbackQuery,
    DeliveryPath,
    DisableBody,
    DiscardBody,
    EnableBody,
    EraseBody,
    ErasePath,
    NoQuery,
    NotificationQuery,
    PreviewBody,
    ReplayBody,
    TestFireBody,
)
from producer.json_input import BadJson, read_json
from worker import callbacks, notify, render
from worker.config import Settings


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


Model = TypeVar("Model", bound=BaseModel)


def _query(request: web.Request, model: type[Model]) -> Model:
    # A parameter given twice counts once, as its first value, as aiohttp reads it.
    given = {key: request.query[key] for key in request.query}
    return read(model, given, noun="parameter")


def _no_query(request: web.Request) -> None:
    _query(request, NoQuery)


def _path(request: web.Request, model: type[Model]) -> Model:
    return read(model, request.match_info)


async def _body(request: web.Request, model: type[Model]) -> Model:
    """The request's JSON object (an empty body is `{}`) as `model`."""
    raw = await request.read()
    if not raw.strip():
        return read(model, {})
    try:
        data = read_json(raw)  # as ingest reads it: a test fire's event reads the same
    except BadJson as exc:
        raise InputError("body", str(exc)) from None
    if not isinstance(data, dict):
        raise InputError("body", "must be a JSON object")
    return read(model, data)


def error(status: int, message: str, errors: list[dict[str, Any]] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if errors is not None:
        body["errors"] = errors
    return web.json_response(body, status=status)


async def _listing(request: web.Request, where: DeliveryFilter, paging: Paging) -> web.Response:
    db = _services(request).db
    page = await lookup.list_deliveries(db, where, paging.limit, paging.cursor)
    return web.json_response({"items": page.items, "next": page.next})


@routes.get("/v1/overview")
async def show_overview(request: web.Request) -> web.Response:
    _no_query(request)
    services = _services(request)
    found = await overview.overview(services.db, services.redis, services.settings.queue_name)
    return web.json_response(found)


@routes.get("/v1/deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    query = _query(request, DeliveryQuery)
    return await _listing(request, query, query)


@routes.get("/v1/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    query = _query(request, DeadLetterQuery)
    return await _listing(request, query.dead_letters(), query)


@routes.get("/v1/deliveries/{id}")
async def show_delivery(request: web.Request) -> web.Response:
    _no_query(request)
    delivery = _path(request, DeliveryPath).id
    found = await lookup.show_delivery(_services(request).db, delivery)
    if found is None:
        return error(404, "no such delivery")
    return web.json_response(found)


def _result_response(result: replay.Result) -> web.Response:
    if result.outcome == "not_found":
        return error(404, "no such delivery")
    if result.outcome == "skipped":
        return error(409, f"not done: {result.reason}")
    answer: dict[str, Any] = {"delivery_id": result.delivery_id, "outcome": result.outcome}
    if result.outcome == "replayed":
        # False: Redis failed after the ledger reopened it, and the sweep queues it.
        answer["queued"] = result.queued
    return web.json_response(answer)


@routes.post("/v1/dead-letters/{id}/replay")
async def replay_one(request: web.Request) -> web.Response:
    _no_query(request)
    delivery = _path(request, DeliveryPath).id
    body = await _body(request, ReplayBody)
    services = _services(request)
    result = await replay.replay(
        services.db, services.redis, services.settings.queue_name, delivery, body.mode, body.actor
    )
    return _result_response(result)


@routes.post("/v1/dead-letters/replay")
async def replay_all(request: web.Request) -> web.Response:
    _no_query(request)
    body = await _body(request, BulkReplayBody)
    services = _services(request)
    if body.dry_run:
        # The very selection a replay works through, counted: what a confirmation quotes.
        ids = await lookup.matching_ids(services.db, body.filter.dead_letters())
        return web.json_response(
            {"matching": len(ids), "replayed": 0, "skipped": 0, "failed": 0, "problems": []}
        )
    summary = await replay.replay_matching(
        services.db,
        services.redis,
        services.settings.queue_name,
        body.filter,
        body.mode,
        body.actor,
    )
    return web.json_response(_summary(summary))


def _summary(summary: replay.Summary) -> dict[str, Any]:
    """A bulk replay's summary as `ReplaySummary`."""
    return {
        "matching": summary.replayed + summary.skipped + summary.failed,
        "replayed": summary.replayed,
        "skipped": summary.skipped,
        "failed": summary.failed,
        "problems": summary.problems,
    }


@routes.post("/v1/dead-letters/{id}/discard")
async def discard_one(request: web.Request) -> web.Response:
    _no_query(request)
    delivery = _path(request, DeliveryPath).id
    body = await _body(request, DiscardBody)
    result = await replay.discard(_services(request).db, delivery, body.note, body.actor)
    return _result_response(result)


@routes.post("/v1/affiliates/{affiliate}/erase")
async def erase_affiliate(request: web.Request) -> web.Response:
    _no_query(request)
    affiliate = _path(request, ErasePath).affiliate
    body = await _body(request, EraseBody)
    db = _services(request).db
    try:
        if body.dry_run:
            found = await erase.count(db, affiliate)
        else:
            found = await erase.erase(db, affiliate, body.actor, body.note)
    except erase.NothingStored as exc:
        return error(404, str(exc))
    return web.json_response(
        found.detail() | {"action_id": found.action_id, "dry_run": body.dry_run}
    )


@routes.get("/v1/affiliates/{affiliate}/actions")
async def list_affiliate_actions(request: web.Request) -> web.Response:
    _no_query(request)
    affiliate = _path(request, AffiliatePath).affiliate
    found = await erase.affiliate_actions(_services(request).db, affiliate)
    return web.json_response({"items": found})


@routes.get("/v1/callbacks")
async def list_callbacks(request: web.Request) -> web.Response:
    query = _query(request, CallbackQuery)
    found = await switch.listing(_services(request).db, query.affiliate or None)
    return web.json_response({"items": found})


def _validated(
    request: web.Request,
    affiliate: str,
    event_type: str,
    method: str,
    url: str,
    secret: str | None,
    remove_secret: bool = False,
    *,
    statuses: list[str] | None,
    delay: str | int | None,
) -> callbacks.CallbackSpec:
    """The callback checked exactly as `postback callbacks set` checks it."""
    try:
        return callbacks.validate(
            affiliate,
            event_type,
            method,
            url,
            secret,
            allowed=_services(request).settings.allowed,
            remove_secret=remove_secret,
            statuses=statuses,
            delay=delay,
        )
    except callbacks.CallbackError as exc:
        raise InputError(exc.field, exc.message) from None


@routes.post("/v1/callbacks/preview")
async def preview_callback(request: web.Request) -> web.Response:
    """The request a callback would send for the sample order, as it is typed: the page's
    live preview. Checked as a PUT checks it; nothing is saved or sent."""
    _no_query(request)
    body = await _body(request, PreviewBody)
    spec = _validated(
        request,
        body.affiliate_id,
        body.event_type,
        body.method,
        body.url,
        None,
        statuses=body.statuses,
        delay=body.delay,
    )
    return web.json_response(testfire.preview(spec).as_json())


@routes.put("/v1/callbacks/{affiliate}/{event_type}")
async def set_callback(request: web.Request) -> web.Response:
    _no_query(request)
    key = _path(request, CallbackPath)
    body = await _body(request, CallbackBody)
    spec = _validated(
        request,
        key.affiliate,
        key.event_type,
        body.method,
        body.url,
        body.secret,
        body.remove_secret,
        statuses=body.statuses,
        delay=body.delay,
    )
    db = _services(request).db
    saved = await callbacks.save(db, spec)
    # A generated secret is answered this once, for the affiliate; never again.
    shown = {"secret": spec.secret} if spec.generated else {}
    listed = await switch.listing(db, saved.affiliate_id, saved.event_type)
    return web.json_response((listed[0] if listed else saved.public()) | shown)


def _no_callback(key: CallbackPath) -> web.Response:
    return error(404, f"no {key.event_type} callback for affiliate {key.affiliate}")


@routes.delete("/v1/callbacks/{affiliate}/{event_type}")
async def remove_callback(request: web.Request) -> web.Response:
    _no_query(request)
    key = _path(request, CallbackPath)
    if not await callbacks.remove(_services(request).db, key.affiliate, key.event_type):
        return _no_callback(key)
    return web.json_response({"removed": True})


async def _switched(
    request: web.Request,
    key: CallbackPath,
    switched: switch.Switched | None,
    replayed: replay.Summary | None = None,
) -> web.Response:
    found = (
        []
        if switched is None
        else await switch.listing(_services(request).db, key.affiliate, key.event_type)
    )
    if switched is None or not found:
        return _no_callback(key)
    summary = None if replayed is None else _summary(replayed)
    return web.json_response(found[0] | {"changed": switched.changed, "replayed": summary})


@routes.post("/v1/callbacks/{affiliate}/{event_type}/enable")
async def enable_callback(request: web.Request) -> web.Response:
    _no_query(request)
    key = _path(request, CallbackPath)
    body = await _body(request, EnableBody)
    services = _services(request)
    switched = await switch.enable(
        services.db, key.affiliate, key.event_type, body.actor, body.note
    )
    replayed = None
    if switched is not None and body.replay:
        replayed = await switch.replay_dead_letters(
            services.db,
            services.redis,
            services.settings.queue_name,
            switched.callback,
            "rerender",
            body.actor,
        )
    return await _switched(request, key, switched, replayed)


@routes.post("/v1/callbacks/{affiliate}/{event_type}/disable")
async def disable_callback(request: web.Request) -> web.Response:
    _no_query(request)
    key = _path(request, CallbackPath)
    body = await _body(request, DisableBody)
    switched = await switch.disable(
        _services(request).db, key.affiliate, key.event_type, body.actor, body.note
    )
    return await _switched(request, key, switched)


@routes.post("/v1/callbacks/{affiliate}/{event_type}/test")
async def test_callback(request: web.Request) -> web.Response:
    _no_query(request)
    key = _path(request, CallbackPath)
    body = await _body(request, TestFireBody)
    services = _services(request)
    callback = await callbacks.get(services.db, key.affiliate, key.event_type)
    if callback is None:
        return _no_callback(key)
    try:
        fired = await testfire.fire(services.db, services.http, callback, body.event, body.actor)
    except testfire.EventMismatch as exc:
        raise InputError("event", str(exc)) from None
    except render.TemplateError as exc:  # only a template edited into the table by hand
        return error(409, f"the stored template is invalid: {exc}; set the callback again")
    return web.json_response(fired)


@routes.get("/v1/notifications")
async def list_notifications(request: web.Request) -> web.Response:
    query = _query(request, NotificationQuery)
    found, more = await notify.recent(_services(request).db, query.limit, query.before)
    return web.json_response({"items": [n.public() for n in found], "next": more})
