"""The OpenAPI 3 document of the service, served at /openapi.json.

Written by hand next to the handlers; a test checks that it lists exactly the routes the
application has, and schemathesis checks every answer of the running service against it.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import version
from typing import Any

from ops.actions.lookup import MAX_LIMIT
from ops.actions.replay import MODES
from ops.service.ingest import MAX_BATCH
from producer.event import EVENT_TYPES
from worker.ledger import STATES

_STRING = {"type": "string"}
_NULLABLE_STRING = {"type": "string", "nullable": True}
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": "string", "format": "date-time", "nullable": True}


_MONEY = {
    "type": "string",
    "pattern": r"^-?[0-9]{1,20}(\.[0-9]{1,18})?$",
    "description": "A decimal as a string, kept exact (a JSON number is accepted too).",
}


def _text(longest: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": longest}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_UNAUTHORIZED = _error(
    "No bearer token, or the wrong one: checked before anything else in the request."
)
_UNPROCESSABLE = _error("A parameter or field was refused; `errors` names it.")
_UNAVAILABLE = _error("Postgres or Redis is unreachable; nothing was changed.")


def _filter_parameters(with_state: bool) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": "affiliate", "in": "query", "schema": _STRING, "description": "Affiliate id."},
        {
            "name": "event_type",
            "in": "query",
            "schema": {"type": "string", "enum": list(EVENT_TYPES)},
        },
        {"name": "order", "in": "query", "schema": _STRING, "description": "Order number."},
    ]
    if with_state:
        params.append(
            {"name": "state", "in": "query", "schema": {"type": "string", "enum": list(STATES)}}
        )
    params += [
        {
            "name": "error_class",
            "in": "query",
            "schema": _STRING,
            "description": "Error class of the last failed attempt, e.g. timeout, http_4xx.",
        },
        {
            "name": "since",
            "in": "query",
            "schema": _STRING,
            "description": "Taken at or after: ISO 8601 time, or a duration ago (30m, 2h, 7d).",
        },
        {
            "name": "until",
            "in": "query",
            "schema": _STRING,
            "description": "Taken before: ISO 8601 time, or a duration ago.",
        },
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
        },
        {
            "name": "cursor",
            "in": "query",
            "schema": _STRING,
            "description": "The `next` of the previous page.",
        },
    ]
    return params


def _callback_path() -> list[dict[str, Any]]:
    return [
        {"name": "affiliate", "in": "path", "required": True, "schema": _STRING},
        {
            "name": "event_type",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "enum": list(EVENT_TYPES)},
        },
    ]


_ID = [
    {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
]

_OPS: list[dict[str, list[str]]] = [{"bearerAuth": []}]


def _schemas() -> dict[str, Any]:
    summary_props = {
        "id": {"type": "string", "format": "uuid"},
        "event_id": _STRING,
        "event_type": {"type": "string", "enum": list(EVENT_TYPES)},
        "affiliate_id": _STRING,
        "order_number": _STRING,
        "state": {"type": "string", "enum": list(STATES)},
        "reason": _NULLABLE_STRING,
        "error_class": _NULLABLE_STRING,
        "attempts": {"type": "integer"},
        "last_status": {"type": "integer", "nullable": True},
        "occurred_at": _TIME,
        "created_at": _TIME,
        "updated_at": _TIME,
        "next_attempt_at": _NULLABLE_TIME,
        "blocked_by": {
            "type": "string",
            "format": "uuid",
            "nullable": True,
            "description": "An earlier delivery of the same order that this one waits for.",
        },
        "create_wait_until": {
            **_NULLABLE_TIME,
            "description": "An update waiting for its order's order.created, which the relay "
            "has not received yet: when it goes without it (POSTBACK_CREATE_WAIT).",
        },
        "order_note": {
            **_NULLABLE_STRING,
            "description": "Set when it went out of order: sent without its order.created.",
        },
    }
    request = {
        "type": "object",
        "nullable": True,
        "required": ["method", "url", "headers", "body"],
        "properties": {
            "method": {"type": "string", "enum": ["GET", "POST"]},
            "url": _STRING,
            "headers": {"type": "object", "additionalProperties": _STRING},
            "body": {"type": "object", "nullable": True},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": _STRING,
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["field", "message"],
                        "properties": {
                            "index": {
                                "type": "integer",
                                "nullable": True,
                                "description": "Ingest: the refused event's place in the batch.",
                            },
                            "field": _STRING,
                            "message": _STRING,
                        },
                    },
                },
            },
        },
        "Event": {
            "type": "object",
            "description": "An order event; the README's event format has every rule.",
            "additionalProperties": False,
            "required": ["id", "type", "affiliate_id", "order", "link"],
            "properties": {
                "id": _text(128),
                "type": {"type": "string", "enum": list(EVENT_TYPES)},
                "affiliate_id": _text(64),
                "occurred_at": {
                    "type": "string",
                    "format": "date-time",
                    "description": "RFC 3339 with an offset; default: when enqueued.",
                },
                "order": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["number", "amount", "commission"],
                    "properties": {
                        "number": _text(128),
                        "amount": _MONEY,
                        "commission": _MONEY,
                        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                        "status": _text(64),
                    },
                },
                "link": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["url"],
                    "properties": {
                        "url": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 4096,
                            "description": "The affiliate link the order came through: "
                            "an absolute http(s) URL.",
                        },
                        "sub_id": {"type": "string", "maxLength": 256},
                    },
                },
            },
        },
        "Accepted": {
            "type": "object",
            "required": ["accepted", "already_queued"],
            "properties": {
                "accepted": {"type": "array", "items": _STRING},
                "already_queued": {
                    "type": "array",
                    "items": _STRING,
                    "description": "Ids whose job was already in the queue.",
                },
            },
        },
        "DeliverySummary": {
            "type": "object",
            "required": list(summary_props),
            "properties": summary_props,
        },
        "DeliveryPage": {
            "type": "object",
            "required": ["items", "next"],
            "properties": {
                "items": {"type": "array", "items": _ref("DeliverySummary")},
                "next": _NULLABLE_STRING,
            },
        },
        "Request": request,
        "Delivery": {
            "allOf": [
                _ref("DeliverySummary"),
                {
                    "type": "object",
                    "required": ["callback_id", "event", "request", "attempts", "actions"],
                    "properties": {
                        "callback_id": {"type": "integer", "nullable": True},
                        "event": {"type": "object"},
                        "request": _ref("Request"),
                        "attempts": {"type": "array", "items": _ref("Attempt")},
                        "actions": {"type": "array", "items": _ref("Action")},
                    },
                },
            ]
        },
        "Attempt": {
            "type": "object",
            "required": ["number", "started_at", "duration_ms", "status_code", "error_class"],
            "properties": {
                "number": {"type": "integer"},
                "started_at": _TIME,
                "duration_ms": {"type": "number"},
                "status_code": {"type": "integer", "nullable": True},
                "error_class": _NULLABLE_STRING,
                "error": _NULLABLE_STRING,
                "response_excerpt": _NULLABLE_STRING,
                "request": _ref("Request"),
            },
        },
        "Action": {
            "type": "object",
            "required": ["action", "actor", "attempt", "at"],
            "properties": {
                "action": {"type": "string", "enum": ["replay", "discard"]},
                "mode": {"type": "string", "enum": list(MODES), "nullable": True},
                "actor": _STRING,
                "note": _NULLABLE_STRING,
                "attempt": {"type": "integer"},
                "at": _TIME,
            },
        },
        "ActionResult": {
            "type": "object",
            "required": ["delivery_id", "outcome"],
            "properties": {
                "delivery_id": {"type": "string", "format": "uuid"},
                "outcome": {"type": "string", "enum": ["replayed", "discarded"]},
            },
        },
        "ReplaySummary": {
            "type": "object",
            "required": ["replayed", "skipped", "failed", "problems"],
            "properties": {
                "replayed": {"type": "integer"},
                "skipped": {"type": "integer"},
                "failed": {"type": "integer"},
                "problems": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["delivery_id", "outcome", "reason"],
                        "properties": {
                            "delivery_id": _STRING,
                            "outcome": {"type": "string", "enum": ["skipped", "failed"]},
                            "reason": _STRING,
                        },
                    },
                },
            },
        },
        "Callback": {
            "type": "object",
            "required": [
                "id",
                "affiliate_id",
                "event_type",
                "method",
                "url_template",
                "has_secret",
                "enabled",
                "created_at",
                "updated_at",
            ],
            "properties": {
                "id": {"type": "integer"},
                "affiliate_id": _STRING,
                "event_type": {"type": "string", "enum": list(EVENT_TYPES)},
                "method": {"type": "string", "enum": ["GET", "POST"]},
                "url_template": _STRING,
                "has_secret": {"type": "boolean"},
                "secret": {
                    "type": "string",
                    "description": "Only in the answer to a PUT whose secret was 'generate': "
                    "the new whsec_ secret, shown this once.",
                },
                "enabled": {"type": "boolean"},
                "created_at": _TIME,
                "updated_at": _TIME,
            },
        },
        "TestFire": {
            "type": "object",
            "required": [
                "id",
                "fired_at",
                "duration_ms",
                "request",
                "response",
                "error_class",
                "error",
                "delivered",
            ],
            "properties": {
                "id": {"type": "integer"},
                "fired_at": _TIME,
                "duration_ms": {"type": "number"},
                "request": _ref("Request"),
                "response": {
                    "type": "object",
                    "nullable": True,
                    "required": ["status", "headers", "body_excerpt"],
                    "properties": {
                        "status": {"type": "integer"},
                        "headers": {"type": "object", "additionalProperties": _STRING},
                        "body_excerpt": _STRING,
                    },
                },
                "error_class": _NULLABLE_STRING,
                "error": _NULLABLE_STRING,
                "delivered": {"type": "boolean", "description": "Whether it answered 2xx."},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "down", "checks"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "down"]},
                "down": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["redis", "postgres", "worker"]},
                },
                "checks": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["ok"],
                        "properties": {
                            "ok": {"type": "boolean"},
                            "error": _STRING,
                            "report": _STRING,
                        },
                    },
                },
            },
        },
    }


def _operations() -> dict[str, Any]:
    actor = {"type": "string", "maxLength": 200, "description": "Who is doing this (recorded)."}
    mode = {
        "type": "string",
        "enum": list(MODES),
        "default": "rerender",
        "description": "rerender: build the request again from the callback as it is now; "
        "resend: send the last request again as it was.",
    }
    filter_props = dict.fromkeys(
        ("affiliate", "event_type", "order", "error_class", "since", "until"), _STRING
    )
    callback_404 = _error("No such callback.")
    return {
        "/v1/events": {
            "post": {
                "summary": "Enqueue one event, or a batch of up to 1000",
                "security": [{"bearerAuth": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    _ref("Event"),
                                    {
                                        "type": "array",
                                        "items": _ref("Event"),
                                        "minItems": 1,
                                        "maxItems": MAX_BATCH,
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json(_ref("Accepted"), "All enqueued."),
                    "401": _UNAUTHORIZED,
                    "413": _error("The body is over 1 MiB."),
                    "422": _error("Refused, each as {index, field, message}; nothing enqueued."),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/deliveries": {
            "get": {
                "summary": "List deliveries, newest first",
                "security": _OPS,
                "parameters": _filter_parameters(with_state=True),
                "responses": {
                    "200": _json(_ref("DeliveryPage"), "A page of deliveries."),
                    "401": _UNAUTHORIZED,
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/deliveries/{id}": {
            "get": {
                "summary": "One delivery: its event, request, every attempt, ops actions",
                "security": _OPS,
                "parameters": _ID,
                "responses": {
                    "200": _json(_ref("Delivery"), "The delivery."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No such delivery."),
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/dead-letters": {
            "get": {
                "summary": "List dead letters (dead, not replayed or discarded), newest first",
                "security": _OPS,
                "parameters": _filter_parameters(with_state=False),
                "responses": {
                    "200": _json(_ref("DeliveryPage"), "A page of dead letters."),
                    "401": _UNAUTHORIZED,
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/dead-letters/{id}/replay": {
            "post": {
                "summary": "Replay one dead letter",
                "security": _OPS,
                "parameters": _ID,
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"mode": mode, "actor": actor},
                            }
                        }
                    }
                },
                "responses": {
                    "200": _json(_ref("ActionResult"), "Reopened and queued."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No such delivery."),
                    "409": _error(
                        "Not replayable: not dead or discarded, its callback is gone or off, or its stored event is invalid."
                    ),
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/dead-letters/replay": {
            "post": {
                "summary": "Replay every dead letter matching a filter",
                "security": _OPS,
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "mode": mode,
                                    "actor": actor,
                                    "filter": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": filter_props,
                                    },
                                    "all": {
                                        "type": "boolean",
                                        "default": False,
                                        "description": "Must be true when the filter is empty: "
                                        "replay every dead letter.",
                                    },
                                },
                            }
                        }
                    }
                },
                "responses": {
                    "200": _json(_ref("ReplaySummary"), "What was replayed, skipped, failed."),
                    "401": _UNAUTHORIZED,
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/dead-letters/{id}/discard": {
            "post": {
                "summary": "Discard a dead letter with a note; it stays in the record",
                "security": _OPS,
                "parameters": _ID,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["note"],
                                "properties": {
                                    "note": {"type": "string", "minLength": 1, "maxLength": 2000},
                                    "actor": actor,
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("ActionResult"), "Discarded."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No such delivery."),
                    "409": _error("Not a dead letter."),
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/callbacks": {
            "get": {
                "summary": "List callbacks",
                "security": _OPS,
                "parameters": [{"name": "affiliate", "in": "query", "schema": _STRING}],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["items"],
                            "properties": {"items": {"type": "array", "items": _ref("Callback")}},
                        },
                        "Callbacks.",
                    ),
                    "401": _UNAUTHORIZED,
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/callbacks/{affiliate}/{event_type}": {
            "put": {
                "summary": "Create or replace a callback (validated as by the CLI)",
                "security": _OPS,
                "parameters": _callback_path(),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["url"],
                                "properties": {
                                    "url": {"type": "string", "description": "URL template."},
                                    "method": {
                                        "type": "string",
                                        "enum": ["GET", "POST"],
                                        "default": "GET",
                                    },
                                    "secret": {
                                        "type": "string",
                                        "nullable": True,
                                        "description": "Signing secret, or 'generate' for a new whsec_ one (answered once); omitted: the current one stays.",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("Callback"), "Saved."),
                    "401": _UNAUTHORIZED,
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            },
            "delete": {
                "summary": "Remove a callback (past deliveries stay recorded)",
                "security": _OPS,
                "parameters": _callback_path(),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["removed"],
                            "properties": {"removed": {"type": "boolean"}},
                        },
                        "Removed.",
                    ),
                    "401": _UNAUTHORIZED,
                    "404": callback_404,
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            },
        },
        **{
            f"/v1/callbacks/{{affiliate}}/{{event_type}}/{switch}": {
                "post": {
                    "summary": f"{switch.capitalize()} a callback",
                    "security": _OPS,
                    "parameters": _callback_path(),
                    "responses": {
                        "200": _json(_ref("Callback"), "The callback now."),
                        "401": _UNAUTHORIZED,
                        "404": callback_404,
                        "422": _UNPROCESSABLE,
                        "503": _UNAVAILABLE,
                    },
                }
            }
            for switch in ("enable", "disable")
        },
        "/v1/callbacks/{affiliate}/{event_type}/test": {
            "post": {
                "summary": "Send the callback a sample (or given) event now; recorded as a test",
                "security": _OPS,
                "parameters": _callback_path(),
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"event": _ref("Event"), "actor": actor},
                            }
                        }
                    }
                },
                "responses": {
                    "200": _json(_ref("TestFire"), "The request made and the response got."),
                    "401": _UNAUTHORIZED,
                    "404": callback_404,
                    "422": _UNPROCESSABLE,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Redis, Postgres and a live worker",
                "responses": {
                    "200": _json(_ref("Health"), "All up."),
                    "503": _json(_ref("Health"), "Something is down; `down` names it."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": _STRING}},
                    },
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/": {
            "get": {
                "summary": "The ops page",
                "responses": {
                    "200": {"description": "HTML.", "content": {"text/html": {"schema": _STRING}}}
                },
            }
        },
    }


_COMMON = {
    "403": _error("Cross-site, or without a token from another machine than this one."),
    "415": _error("The body is not JSON (Content-Type: application/json)."),
    "500": _error("A bug; the service's log has the details."),
}
"""Answers every /v1/ operation can give besides its own."""


def _with_common(paths: dict[str, Any]) -> dict[str, Any]:
    for path, operations in paths.items():
        if path.startswith("/v1/"):
            for operation in operations.values():
                operation["responses"] = {**_COMMON, **operation["responses"]}
    return paths


@cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "postback relay",
            "version": version("postback-relay"),
            "description": "Ingest of order events, and the ops API over deliveries, dead "
            "letters and callbacks.",
        },
        "paths": _with_common(_operations()),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
