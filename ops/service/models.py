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
    model_validator,
)

from ops.actions.erase import check_affiliate
from ops.actions.filters import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    DeliveryId,
    Filter,
    OneOf,
    Text,
    plain_text,
)
from ops.actions.replay import MODES, Mode
from ops.actions.testfire import SAMPLE_AFFILIATE
from ops.service.ingest import MAX_BATCH
from producer.event import EVENT_TYPES, STORE_WIDE, Event, EventType
from worker import notify
from worker.callbacks import MAX_STATUS_LENGTH, MAX_STATUSES, METHODS, Method
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
    affiliate: Annotated[
        Text,
        Field(
            description=f"affiliate id, or '{STORE_WIDE}' (%2A) for the store-wide callback: "
            "used for every affiliate without a callback of its own for the event type"
        ),
    ]
    event_type: Annotated[EventType, OneOf(EVENT_TYPES)]


class AffiliatePath(_Input):
    affiliate: Annotated[
        Text,
        Field(description=f"an affiliate id, or '{STORE_WIDE}' (%2A): the store-wide callback's"),
    ]


class ErasePath(_Input):
    affiliate: Annotated[
        Text,
        AfterValidator(check_affiliate),
        Field(
            description=f"an affiliate id; not '{STORE_WIDE}', which names the store-wide "
            "callback: deliveries are stored under the affiliate each event was for"
        ),
    ]


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
    dry_run: Annotated[
        StrictBool,
        Field(description="only count the dead letters that would be replayed (`matching`)"),
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


class EraseBody(_Input):
    note: Annotated[
        Annotated[str, BeforeValidator(plain_text), StringConstraints(max_length=MAX_NOTE)] | None,
        Field(description="why, kept in the record"),
    ] = None
    actor: Actor = DEFAULT_ACTOR
    dry_run: Annotated[
        StrictBool, Field(description="only count what would go and be kept; change nothing")
    ] = False


Note = Annotated[
    Annotated[str, BeforeValidator(plain_text), StringConstraints(max_length=MAX_NOTE)] | None,
    Field(description="why, kept in the record with who did it"),
]


class DisableBody(_Input):
    actor: Actor = DEFAULT_ACTOR
    note: Note = None


class EnableBody(_Input):
    actor: Actor = DEFAULT_ACTOR
    note: Note = None
    replay: Annotated[
        StrictBool,
        Field(
            description="then replay the callback's dead letters (rerendered with it), as a "
            "bulk replay does: `replayed` in the answer says what it did"
        ),
    ] = False


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


UrlTemplate = Annotated[
    str,
    BeforeValidator(plain_text),
    StringConstraints(max_length=MAX_URL),
    Field(description="the URL template"),
]
CallbackMethod = Annotated[Method, OneOf(METHODS), BeforeValidator(_upper)]


Statuses = Annotated[
    list[Annotated[str, BeforeValidator(plain_text)]] | None,
    Field(
        description=f"the order statuses it fires for (at most {MAX_STATUSES}, each at most "
        f"{MAX_STATUS_LENGTH} characters, none twice); an event whose order.status is none "
        "of them is recorded skipped. null or omitted: every status"
    ),
]


def _duration_or_seconds(value: object) -> object:
    # One message for anything else, rather than one per member of the union; whether it
    # is a duration, and in range, `callbacks.parse_delay` says, as for the CLI.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("must be a duration such as 90s, 5m or 2h, or whole seconds")


Delay = Annotated[
    int | str | None,
    BeforeValidator(_duration_or_seconds),
    Field(
        description="how long after the event was accepted its delivery is sent: a duration "
        "such as 90s, 5m, 2h, or whole seconds, 0 to 24h (86400). null or omitted: at once"
    ),
]


class CallbackBody(_Input):
    """Checked further exactly as `postback callbacks set` checks it (worker.callbacks)."""

    url: UrlTemplate
    method: CallbackMethod = "GET"
    statuses: Statuses = None
    delay: Delay = None
    secret: Annotated[
        Annotated[str, BeforeValidator(plain_text), StringConstraints(max_length=MAX_ACTOR)] | None,
        Field(
            description="signing secret, or 'generate' for a new whsec_ one, answered this "
            "once; null: the secret is removed and requests go unsigned; omitted: the "
            "current one stays"
        ),
    ] = None

    @property
    def remove_secret(self) -> bool:
        """`"secret": null`, as opposed to no `secret` at all."""
        return "secret" in self.model_fields_set and self.secret is None


class PreviewBody(_Input):
    """A callback as it would be set, checked as a PUT checks it; saved nowhere."""

    affiliate_id: Annotated[
        Text,
        Field(
            description=f"affiliate id, whose the sample order is ({SAMPLE_AFFILIATE}'s for "
            f"the store-wide callback, '{STORE_WIDE}')"
        ),
    ]
    event_type: Annotated[EventType, OneOf(EVENT_TYPES)]
    url: UrlTemplate
    method: CallbackMethod = "GET"
    statuses: Statuses = None
    delay: Delay = None


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
    accepted: Annotated[
        list[str], Field(description="ids of the events now in the relay's ledger (Postgres)")
    ]
    already_queued: Annotated[list[str], Field(description="ids whose job was already queued")]
    queued: Annotated[
        bool,
        Field(
            description="their jobs are in Redis; false: Redis is unreachable, the events are "
            "recorded and the sweep queues them within a minute"
        ),
    ]


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
    callback_id: Annotated[
        int | None,
        Field(description="the callback it went to; null when there was none (skipped)"),
    ]
    callback_store_wide: Annotated[
        bool | None,
        Field(
            description="whether that callback is the store-wide one (affiliate '*'); null "
            "without a callback, or when it was removed since"
        ),
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
    response_headers: Annotated[
        dict[str, str] | None,
        Field(
            description="the answer's headers; null without an answer, and for attempts "
            "recorded before the relay kept them"
        ),
    ]
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

    event: dict[str, Any]
    request: SentRequest | None
    attempts: list[Attempt]
    actions: list[Action]


class ActionResult(BaseModel):
    delivery_id: uuid.UUID
    outcome: Literal["replayed", "discarded"]


class ReplayResult(BaseModel):
    delivery_id: uuid.UUID
    outcome: Literal["replayed"]
    queued: Annotated[
        bool,
        Field(
            description="its job is in Redis; false: Redis is unreachable, the delivery is "
            "reopened and the sweep queues it within a minute"
        ),
    ]


class Problem(BaseModel):
    delivery_id: str
    outcome: Literal["skipped", "failed"]
    reason: str


class ReplaySummary(BaseModel):
    matching: Annotated[int, Field(description="dead letters the filter matched")]
    replayed: int
    skipped: int
    failed: int
    problems: list[Problem]


class Erased(BaseModel):
    deliveries: Annotated[
        int, Field(description="settled deliveries removed, with the ops actions on them")
    ]
    attempts: Annotated[int, Field(description="their attempts, removed with them")]
    test_fires: int
    kept_open: Annotated[
        int,
        Field(
            description="open deliveries (accepted, pending, retrying) kept, as their jobs "
            "would write them again: erase again once they settle"
        ),
    ]
    action_id: Annotated[
        int | None, Field(description="the `actions` row that records it; null for a dry run")
    ]
    dry_run: bool


class AffiliateAction(BaseModel):
    id: int
    action: Literal["disable", "enable", "erase"]
    actor: str
    note: str | None
    at: datetime
    event_type: Annotated[EventType | None, Field(description="a disable's or enable's")]
    callback_id: Annotated[int | None, Field(description="a disable's or enable's")]
    detail: Annotated[
        dict[str, Any] | None,
        Field(description="an erase's counts; the dead streak that disabled a callback"),
    ]


class AffiliateActions(BaseModel):
    items: Annotated[list[AffiliateAction], Field(description="newest first")]


class Disabled(BaseModel):
    actor: Annotated[str, Field(description="'relay' when the relay disabled it itself")]
    at: datetime
    note: Annotated[str | None, Field(description="why")]


class Callback(BaseModel):
    id: int
    affiliate_id: str
    store_wide: Annotated[
        bool,
        Field(
            description=f"affiliate '{STORE_WIDE}': used for every affiliate without a "
            "callback of its own for the event type"
        ),
    ]
    event_type: EventType
    method: Method
    url_template: str
    statuses: Annotated[
        list[str] | None,
        Field(description="the order statuses it fires for; null: every status"),
    ]
    delay: Annotated[
        str, Field(description="how long after an event was accepted it is sent: 5m; 0s: at once")
    ]
    delay_seconds: Annotated[int, Field(description="the delay in seconds")]
    has_secret: bool
    enabled: bool
    created_at: datetime
    updated_at: datetime
    dead_streak: Annotated[
        int,
        Field(
            description="its deliveries that died in a row since the last one delivered; "
            "POSTBACK_AUTO_DISABLE_AFTER of them disable it"
        ),
    ]
    dead_since: Annotated[
        datetime | None, Field(description="when the first of that streak died; null: none")
    ]
    disabled: Annotated[
        Disabled | None,
        Field(
            description="for a disabled callback, who disabled it, when and why; null when "
            "it is enabled, or was disabled before disables were recorded"
        ),
    ]
    dead_letters: Annotated[
        int | None,
        Field(
            description="for a disabled callback, its dead letters: what an enable with "
            "replay would replay; null when it is enabled"
        ),
    ]
    secret: Annotated[
        str | None,
        Field(
            description="only in the answer to a PUT whose secret was 'generate': the new "
            "whsec_ secret, shown this once"
        ),
    ] = None


class Callbacks(BaseModel):
    items: list[Callback]


class Switched(Callback):
    """The callback after an enable or a disable."""

    changed: Annotated[
        bool, Field(description="false: it already was so, and nothing was recorded")
    ]
    replayed: Annotated[
        ReplaySummary | None,
        Field(description="what replaying its dead letters did; null unless asked to"),
    ] = None


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
    enabled: Annotated[
        bool,
        Field(
            description="whether the callback is enabled: a disabled one is test fired all "
            "the same, to check a fix before enabling it, but its real events are skipped"
        ),
    ]


class OverviewHour(BaseModel):
    start: Annotated[datetime, Field(description="the hour's start; it ends an hour later")]
    states: Annotated[
        dict[State, int], Field(description="deliveries taken in this hour, by their state now")
    ]


class AffiliateFailures(BaseModel):
    affiliate_id: str
    dead: Annotated[int, Field(description="dead letters among its deliveries of the window")]
    retrying: Annotated[int, Field(description="deliveries of the window waiting for a retry")]


class Durations(BaseModel):
    """Of the attempts made for the deliveries of the window."""

    attempts: Annotated[int, Field(description="how many the percentiles are of")]
    of_newest: Annotated[
        int,
        Field(description="they are the attempts of the window's newest this many deliveries"),
    ]
    p50_ms: Annotated[float | None, Field(description="the median; null without attempts")]
    p95_ms: float | None


class QueueNow(BaseModel):
    due: Annotated[int, Field(description="jobs due now: waiting for a worker, or running")]
    later: Annotated[int, Field(description="jobs due later: retries, deferred deliveries")]


class CircuitCounts(BaseModel):
    """The workers' counts since Redis's counters started: which circuits are open now is
    known only inside each worker."""

    opened: int
    closed: int
    put_off: Annotated[int, Field(description="times a delivery was put off for an open one")]


class Overview(BaseModel):
    """The deliveries the relay took from `since` to `until` (the 24 hours to the end of
    this one), and what is waiting now."""

    since: datetime
    until: datetime
    hours: Annotated[list[OverviewHour], Field(min_length=24, max_length=24)]
    states: Annotated[dict[State, int], Field(description="the window's deliveries by state")]
    affiliates: Annotated[
        list[AffiliateFailures],
        Field(description="the (at most 5) affiliates with the most dead or retrying"),
    ]
    durations: Durations
    retries_waiting: Annotated[int, Field(description="deliveries in state retrying, all time")]
    dead_letters: Annotated[int, Field(description="dead letters not replayed or discarded")]
    queue: Annotated[QueueNow | None, Field(description="null when Redis did not answer")]
    circuits: Annotated[CircuitCounts | None, Field(description="null when Redis did not answer")]
    redis_error: Annotated[str | None, Field(description="why Redis did not answer")]


class Check(BaseModel):
    ok: bool
    error: str | None = None
    report: str | None = None


class Health(BaseModel):
    status: Literal["ok", "down"]
    down: list[Literal["redis", "postgres", "worker"]]
    checks: dict[str, Check]


# --- notifications -------------------------------------------------------------------------


class NotificationQuery(_Input):
    """A page of notifications, newest first."""

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        # As the filters read it: `?before=`, or an option not given, is no value.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value not in ("", None)}
        return data

    limit: Annotated[
        int, Field(ge=1, le=MAX_LIMIT, description=f"at most this many (1 to {MAX_LIMIT})")
    ] = DEFAULT_LIMIT
    before: Annotated[
        int | None,
        # A notification's id is a bigint: a larger one names none.
        Field(ge=1, le=2**63 - 1, description="only older ones: the previous listing's `next`"),
    ] = None


class Notification(BaseModel):
    """What the relay told ops (POSTBACK_OPS_WEBHOOK), and how sending it went."""

    id: int
    cause: Annotated[
        str,
        Field(
            description="what it is about, at most one an hour each: callback_disabled:<id>, "
            "dead_letters:<affiliate>, circuit_open:<scheme://host:port>"
        ),
    ]
    kind: notify.Kind
    text: Annotated[str, Field(description="what a person reads; Slack shows it")]
    fields: Annotated[dict[str, Any], Field(description="the same, for machines")]
    created_at: datetime
    state: Annotated[
        notify.State,
        Field(
            description="pending: to be sent (again); sent; failed: every try failed; "
            "unsent: no webhook was set when it was due"
        ),
    ]
    attempts: int
    next_attempt_at: Annotated[datetime | None, Field(description="while pending")]
    status_code: Annotated[int | None, Field(description="the webhook's, at the last try")]
    error: Annotated[str | None, Field(description="why the last try failed")]
    sent_at: datetime | None


class NotificationPage(BaseModel):
    items: list[Notification]
    next: Annotated[int | None, Field(description="`before` of the next page; null on the last")]
