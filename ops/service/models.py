"""The shapes of the HTTP service: what each route takes in its path and body, and what it
answers. (Query parameters are the filters of `ops.actions.filters`, which the CLI shares.)

The handlers validate with these models and /openapi.json is generated from them
(ops/service/openapi.py), so the document describes the checks the service makes. The
answers are built as plain JSON by the actions; schemathesis checks them against the
answer models.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from ops.actions.filters import DeliveryId, Filter, OneOf, Text, plain_text
from ops.actions.replay import MODES, Mode
from ops.service.ingest import MAX_BATCH
from producer.event import EVENT_TYPES, Event, EventType
from worker.callbacks import METHODS, Method
from worker.exchange import ErrorClass, FailureClass
from worker.ledger import State

DEFAULT_ACTOR = "api"
MAX_ACTOR = 200
MAX_NOTE = 2000
MAX_URL = 8192


class _Input(BaseModel):
    # A misspelt key is refused, naming the known ones, rather than silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- paths and queries ---------------------------------------------------------------------


class NoQuery(_Input):
    """A route that takes no query parameter refuses any."""


class DeliveryPath(_Input):
    id: Annotated[DeliveryId, Field(description="a delivery id")]


class CallbackPath(_Input):
    affiliate: Annotated[Text, Field(description="affiliate id")]
    event_type: Annotated[EventType, OneOf(EVENT_TYPES)]


class CallbackQuery(_Input):
    affiliate: Annotated[Text | None, Field(description="only this affiliate's callbacks")] = None


# --- bodies --------------------------------------------------------------------------------


def _someone(actor: str) -> str:
    if not actor.strip():
        raise ValueError("must not be empty")
    return actor.strip()


Actor = Annotated[
    str,
    BeforeValidator(plain_text),
    StringConstraints(max_length=MAX_ACTOR),
    AfterValidator(_someone),
    Field(description="who is doing this, recorded with it"),
]

ReplayMode = Annotated[
    Mode,
    OneOf(MODES),
    Field(
        description="rerender: build the request again from the callback as it is now; "
        "resend: send the last request again as it was"
    ),
]


class ReplayBody(_Input):
    mode: ReplayMode = "rerender"
    actor: Actor = DEFAULT_ACTOR


class BulkReplayBody(_Input):
    mode: ReplayMode = "rerender"
    actor: Actor = DEFAULT_ACTOR
    all: Annotated[
        StrictBool, Field(description="must be true when the filter is empty: replay them all")
    ] = False
    filter: Filter = Field(default_factory=Filter, validate_default=True)

    @field_validator("filter")
    @classmethod
    def _chosen(cls, where: Filter, info: ValidationInfo) -> Filter:
        # One stray request must not replay every dead letter there is.
        if where == Filter() and info.data.get("all") is not True:
            raise ValueError('give at least one filter, or "all": true')
        return where


def _said_why(note: str) -> str:
    if not note.strip():
        raise ValueError("is required: say why it is discarded")
    return note


class DiscardBody(_Input):
    note: Annotated[
        str,
        BeforeValidator(plain_text),
        StringConstraints(max_length=MAX_NOTE),
        AfterValidator(_said_why),
        Field(description="why, kept in the record"),
    ]
    actor: Actor = DEFAULT_ACTOR


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


class CallbackBody(_Input):
    """Checked further exactly as `postback callbacks set` checks it (worker.callbacks)."""

    url: Annotated[
        str,
        BeforeValidator(plain_text),
        StringConstraints(max_length=MAX_URL),
        Field(description="the URL template"),
    ]
    method: Annotated[Method, OneOf(METHODS), BeforeValidator(_upper)] = "GET"
    secret: Annotated[
        Annotated[str, BeforeValidator(plain_text), StringConstraints(max_length=MAX_ACTOR)] | None,
        Field(
            description="signing secret, or 'generate' for a new whsec_ one, answered this "
            "once; omitted: the current one stays"
        ),
    ] = None


class TestFireBody(_Input):
    event: Annotated[
        Event | None, Field(description="the event to send; omitted: a sample order")
    ] = None
    actor: Actor = DEFAULT_ACTOR


class Events(RootModel[Event | Annotated[list[Event], Field(min_length=1, max_length=MAX_BATCH)]]):
    """One order event, or an array of them; the README's event format has every rule."""


# --- answers -------------------------------------------------------------------------------


class FieldRefusal(BaseModel):
    index: Annotated[
        int | None, Field(description="ingest: the refused event's place in the batch")
    ] = None
    field: str
    message: str


class Error(BaseModel):
    """Every refusal: what went wrong and, where a field is to blame, which."""

    error: str
    errors: list[FieldRefusal] | None = None


class Accepted(BaseModel):
    accepted: list[str]
    already_queued: Annotated[list[str], Field(description="ids whose job was already queued")]


class SentRequest(BaseModel):
    """A request as the relay put it on the wire."""

    method: Method
    url: str
    headers: dict[str, str]
    body: dict[str, Any] | None


class _Delivery(BaseModel):
    id: uuid.UUID
    event_id: str
    event_type: EventType
    affiliate_id: str
    order_number: str
    state: State
    reason: str | None
    error_class: FailureClass | None
    last_status: int | None
    occurred_at: datetime
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    blocked_by: Annotated[
        uuid.UUID | None,
        Field(description="an earlier delivery of the same order that this one waits for"),
    ]
    create_wait_until: Annotated[
        datetime | None,
        Field(
            description="an update waiting for its order's order.created, which the relay "
            "has not received yet: when it goes without it (POSTBACK_CREATE_WAIT)"
        ),
    ]
    order_note: Annotated[
        str | None, Field(description="set when it went out of order: without its create")
    ]


class DeliverySummary(_Delivery):
    attempts: Annotated[int, Field(description="how many were made")]


class DeliveryPage(BaseModel):
    items: list[DeliverySummary]
    next: Annotated[str | None, Field(description="the cursor of the next page; null on the last")]


class Attempt(BaseModel):
    number: int
    started_at: datetime
    duration_ms: float
    status_code: int | None
    error_class: ErrorClass | None
    error: str | None
    response_excerpt: str | None
    request: SentRequest | None


class Action(BaseModel):
    action: Literal["replay", "discard"]
    mode: Mode | None
    actor: str
    note: str | None
    attempt: int
    at: datetime


class Delivery(_Delivery):
    """One delivery in full: its event, last request, every attempt and what ops did."""

    callback_id: int | None
    event: dict[str, Any]
    request: SentRequest | None
    attempts: list[Attempt]
    actions: list[Action]


class ActionResult(BaseModel):
    delivery_id: uuid.UUID
    outcome: Literal["replayed", "discarded"]


class Problem(BaseModel):
    delivery_id: str
    outcome: Literal["skipped", "failed"]
    reason: str


class ReplaySummary(BaseModel):
    replayed: int
    skipped: int
    failed: int
    problems: list[Problem]


class Callback(BaseModel):
    id: int
    affiliate_id: str
    event_type: EventType
    method: Method
    url_template: str
    has_secret: bool
    enabled: bool
    created_at: datetime
    updated_at: datetime
    secret: Annotated[
        str | None,
        Field(
            description="only in the answer to a PUT whose secret was 'generate': the new "
            "whsec_ secret, shown this once"
        ),
    ] = None


class Callbacks(BaseModel):
    items: list[Callback]


class Removed(BaseModel):
    removed: bool


class Answer(BaseModel):
    """What the receiver answered."""

    status: int
    headers: dict[str, str]
    body_excerpt: str


class TestFire(BaseModel):
    id: int
    fired_at: datetime
    duration_ms: float
    request: SentRequest
    response: Answer | None
    error_class: ErrorClass | None
    error: str | None
    delivered: Annotated[bool, Field(description="whether it answered 2xx")]


class Check(BaseModel):
    ok: bool
    error: str | None = None
    report: str | None = None


class Health(BaseModel):
    status: Literal["ok", "down"]
    down: list[Literal["redis", "postgres", "worker"]]
    checks: dict[str, Check]
