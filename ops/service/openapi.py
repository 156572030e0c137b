"""The OpenAPI 3.1 document of the service, served at /openapi.json, generated from the
models the handlers validate with.

`ROUTES` says what each route takes and answers, by model; every schema is the model's own
JSON Schema, so no limit, enum or field list is written twice. OpenAPI 3.1 takes JSON
Schema as pydantic writes it (a nullable field is `anyOf: [..., {"type": "null"}]`). A test
checks that `ROUTES` are exactly the application's routes, and schemathesis every answer
of the running service against the document.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from pydantic_core import CoreSchema

from ops.actions.erase import AFFILIATE_ACTIONS
from ops.actions.filters import DeadLetterQuery, DeliveryQuery
from ops.service import models
from ops.service.ingest import MAX_BODY

VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class Reply:
    description: str
    model: type[BaseModel] | None = None
    """The JSON it answers; None for a body that is not described by a model."""
    media_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    summary: str
    replies: Mapping[int, Reply]
    auth: Literal["ingestToken", "opsToken"] | None = "opsToken"
    """The bearer token it needs (one of `_TOKENS`); None for the open routes."""
    path_model: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    """Required when it has a required field; otherwise an empty body reads as `{}`."""


_NO_DELIVERY = Reply("No such delivery.", models.Error)
_NO_CALLBACK = Reply("No such callback.", models.Error)
_SWITCHED = Reply("The callback now.", models.Switched)

ROUTES: tuple[Route, ...] = (
    Route(
        "post",
        "/v1/events",
        "Record one event, or a batch of them, in the ledger, then enqueue them",
        {
            202: Reply(
                "All recorded in Postgres, and enqueued unless Redis is down.", models.Accepted
            ),
            413: Reply(f"The body is over {MAX_BODY} bytes.", models.Error),
            422: Reply("Refused, each as {index, field, message}; nothing enqueued.", models.Error),
            503: Reply("Postgres is unreachable; nothing recorded or enqueued.", models.Error),
        },
        auth="ingestToken",
        body=models.Events,
    ),
    Route(
        "get",
        "/v1/overview",
        "The last 24 hours of deliveries by hour and state, the affiliates failing most, "
        "attempt durations, and what waits now",
        {200: Reply("The overview.", models.Overview)},
    ),
    Route(
        "get",
        "/v1/deliveries",
        "List deliveries, newest first",
        {200: Reply("A page of deliveries.", models.DeliveryPage)},
        query=DeliveryQuery,
    ),
    Route(
        "get",
        "/v1/deliveries/{id}",
        "One delivery: its event, request, every attempt, ops actions",
        {200: Reply("The delivery.", models.Delivery), 404: _NO_DELIVERY},
        path_model=models.DeliveryPath,
    ),
    Route(
        "get",
        "/v1/dead-letters",
        "List dead letters (dead, not replayed or discarded), newest first",
        {200: Reply("A page of dead letters.", models.DeliveryPage)},
        query=DeadLetterQuery,
    ),
    Route(
        "post",
        "/v1/dead-letters/{id}/replay",
        "Replay one dead letter",
        {
            200: Reply("Reopened, and queued unless Redis is down.", models.ReplayResult),
            404: _NO_DELIVERY,
            409: Reply(
                "Not replayable: not dead or discarded, its callback is gone or off, its "
                "stored event is invalid, or (resend) it was never sent.",
                models.Error,
            ),
        },
        path_model=models.DeliveryPath,
        body=models.ReplayBody,
    ),
    Route(
        "post",
        "/v1/dead-letters/replay",
        "Replay every dead letter matching a filter",
        {
            200: Reply(
                "What matched, and was replayed, skipped, failed (with dry_run: what matches).",
                models.ReplaySummary,
            )
        },
        body=models.BulkReplayBody,
    ),
    Route(
        "post",
        "/v1/dead-letters/{id}/discard",
        "Discard a dead letter with a note; it stays in the record",
        {
            200: Reply("Discarded.", models.ActionResult),
            404: _NO_DELIVERY,
            409: Reply("Not a dead letter.", models.Error),
        },
        path_model=models.DeliveryPath,
        body=models.DiscardBody,
    ),
    Route(
        "post",
        "/v1/affiliates/{affiliate}/erase",
        "Erase an affiliate's settled deliveries and test fires (its stored events and "
        "requests), recorded as one action; open deliveries are kept",
        {
            200: Reply("What went and was kept (with dry_run: would).", models.Erased),
            404: Reply("Nothing is stored for the affiliate.", models.Error),
        },
        path_model=models.ErasePath,
        body=models.EraseBody,
    ),
    Route(
        "get",
        "/v1/affiliates/{affiliate}/actions",
        "What was done to an affiliate's callbacks and records (disables, enables, erases), "
        "newest first",
        {200: Reply(f"The newest {AFFILIATE_ACTIONS}.", models.AffiliateActions)},
        path_model=models.AffiliatePath,
    ),
    Route(
        "get",
        "/v1/callbacks",
        "List callbacks",
        {200: Reply("Callbacks.", models.Callbacks)},
        query=models.CallbackQuery,
    ),
    Route(
        "post",
        "/v1/callbacks/preview",
        "Render a callback's request for a sample order, as `PUT` would check it; "
        "nothing saved or sent",
        {200: Reply("The request, unsigned.", models.SentRequest)},
        body=models.PreviewBody,
    ),
    Route(
        "put",
        "/v1/callbacks/{affiliate}/{event_type}",
        "Create or replace a callback (validated as by the CLI)",
        {200: Reply("Saved.", models.Callback)},
        path_model=models.CallbackPath,
        body=models.CallbackBody,
    ),
    Route(
        "delete",
        "/v1/callbacks/{affiliate}/{event_type}",
        "Remove a callback (past deliveries stay recorded)",
        {200: Reply("Removed.", models.Removed), 404: _NO_CALLBACK},
        path_model=models.CallbackPath,
    ),
    Route(
        "post",
        "/v1/callbacks/{affiliate}/{event_type}/enable",
        "Enable a callback (recorded with who and why), and with `replay` replay its dead letters",
        {200: _SWITCHED, 404: _NO_CALLBACK},
        path_model=models.CallbackPath,
        body=models.EnableBody,
    ),
    Route(
        "post",
        "/v1/callbacks/{affiliate}/{event_type}/disable",
        "Disable a callback (recorded with who and why)",
        {200: _SWITCHED, 404: _NO_CALLBACK},
        path_model=models.CallbackPath,
        body=models.DisableBody,
    ),
    Route(
        "post",
        "/v1/callbacks/{affiliate}/{event_type}/test",
        "Send the callback a sample (or given) event now; recorded as a test",
        {
            200: Reply("The request made and the response got.", models.TestFire),
            404: _NO_CALLBACK,
            409: Reply("The stored template is invalid; set the callback again.", models.Error),
        },
        path_model=models.CallbackPath,
        body=models.TestFireBody,
    ),
    Route(
        "get",
        "/v1/notifications",
        "List what the relay told ops (POSTBACK_OPS_WEBHOOK), newest first",
        {200: Reply("A page of notifications.", models.NotificationPage)},
        query=models.NotificationQuery,
    ),
    Route(
        "get",
        "/healthz",
        "Redis, Postgres and a live worker",
        {
            200: Reply("All up.", models.Health),
            503: Reply("Something is down; `down` names it.", models.Health),
        },
        auth=None,
    ),
    Route(
        "get",
        "/metrics",
        "Prometheus metrics",
        {
            200: Reply(
                "Prometheus text format. Answered while Postgres or Redis is down too: the "
                "metrics of a source that could not be read are left out, and its "
                "`postback_source_up` is 0.",
                media_type="text/plain",
            ),
        },
        auth=None,
    ),
    Route(
        "get",
        "/openapi.json",
        "This document",
        {200: Reply("OpenAPI 3.1.")},
        auth=None,
    ),
    Route("get", "/", "The ops page", {200: Reply("HTML.", media_type="text/html")}, auth=None),
)

_GUARDED = {
    401: Reply("No bearer token, or the wrong one: checked before anything else.", models.Error),
    403: Reply("Cross-site, or without a token from another machine than this.", models.Error),
    415: Reply("The body is not JSON (Content-Type: application/json).", models.Error),
    422: Reply("A parameter or field was refused; `errors` names it.", models.Error),
    500: Reply("A bug; the service's log has the details.", models.Error),
    503: Reply("Postgres or Redis is unreachable; nothing was changed.", models.Error),
}
"""What every route behind a token can answer besides its own."""

_TOKENS = {
    "ingestToken": "POSTBACK_INGEST_TOKEN, for the order system",
    "opsToken": "POSTBACK_OPS_TOKEN, for ops",
}


class _Schema(GenerateJsonSchema):
    """pydantic's JSON Schema without a title made of each field's name, which says it
    already."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


@cache
def document() -> dict[str, Any]:
    replied = [reply.model for route in ROUTES for reply in _replies(route).values()]
    bodies = [route.body for route in ROUTES]
    named = list(dict.fromkeys(m for m in (*bodies, *replied) if m is not None))
    refs, definitions = models_json_schema(
        [(model, "validation") for model in named], ref_template=_REF, schema_generator=_Schema
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route, refs)
    return {
        "openapi": VERSION,
        "info": {
            "title": "postback relay",
            "version": version("postback-relay"),
            "description": "Ingest of order events, and the ops API over deliveries, dead "
            "letters and callbacks.",
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                name: {"type": "http", "scheme": "bearer", "description": description}
                for name, description in _TOKENS.items()
            },
        },
    }


def _replies(route: Route) -> dict[int, Reply]:
    common = _GUARDED if route.auth is not None else {}
    return dict(sorted({**common, **route.replies}.items()))


def _operation(route: Route, refs: Mapping[Any, dict[str, str]]) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": route.summary}
    if route.auth is not None:
        operation["security"] = [{route.auth: []}]
    parameters = [
        *([] if route.path_model is None else _parameters(route.path_model, "path")),
        *([] if route.query is None else _parameters(route.query, "query")),
    ]
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": any(f.is_required() for f in route.body.model_fields.values()),
            "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
        }
    operation["responses"] = {
        str(status): {
            "description": reply.description,
            "content": {reply.media_type: {"schema": _content(reply, refs)}},
        }
        for status, reply in _replies(route).items()
    }
    return operation


def _content(reply: Reply, refs: Mapping[Any, dict[str, str]]) -> dict[str, Any]:
    if reply.model is not None:
        return refs[(reply.model, "validation")]
    return {"type": "object"} if reply.media_type == "application/json" else {"type": "string"}


def _parameters(model: type[BaseModel], where: str) -> list[dict[str, Any]]:
    """A model's fields as parameters `in` the path or the query, each with its schema."""
    schema = model.model_json_schema(ref_template=_REF, schema_generator=_Schema)
    required = set(schema.get("required", ()))
    parameters = []
    for name, given in schema.get("properties", {}).items():
        value = dict(given)
        description = value.pop("description", None)
        parameter: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": _present(value),
        }
        if description is not None:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _present(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without the null that a model's optional field allows: a
    parameter is given, or it is not."""
    rest = {
        key: value
        for key, value in schema.items()
        if key != "anyOf" and not (key == "default" and value is None)
    }
    if "anyOf" not in schema:
        return rest
    options = [option for option in schema["anyOf"] if option != {"type": "null"}]
    return {**options[0], **rest} if len(options) == 1 else {**rest, "anyOf": options}
