"""The order event: the contract between the order system and the relay.

Validation happens here, at the edge, so that nothing invalid ever reaches the queue and
every refusal names the field that is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, Required, TypedDict, Unpack
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails

from producer.json_input import BadJson, read_json

EventType = Literal["order.created", "order.updated"]
EVENT_TYPES: tuple[EventType, ...] = ("order.created", "order.updated")


def _absolute_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http or https URL with a host")
    return value


def _currency_code(value: str) -> str:
    if len(value) != 3 or not value.isascii() or not value.isalpha() or not value.isupper():
        raise ValueError("must be a three-letter ISO 4217 code such as EUR")
    return value


def _whole_minute_offset(value: datetime) -> datetime:
    # RFC 3339 writes offsets in whole minutes. Python allows seconds (zoneinfo's local mean
    # time before about 1900, e.g. -00:16:08), which the JSON form would cut to -00:16 and so
    # silently move the event in time between the producer and the worker.
    offset = value.utcoffset()
    if offset is not None and offset % timedelta(minutes=1):
        raise ValueError("the UTC offset must be whole minutes, as RFC 3339 writes it")
    return value


# Bounded so that no amount can make rendering it without an exponent explode in size.
Money = Annotated[Decimal, Field(allow_inf_nan=False, max_digits=38, decimal_places=18)]


class _Strict(BaseModel):
    # Unknown keys are refused: a misspelled `affiliateId` must fail loudly, not vanish.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # Postgres text cannot hold U+0000; refuse it here, naming the field, not in a worker.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain the NUL character")
        return value


class Order(_Strict):
    number: Annotated[str, Field(min_length=1, max_length=128)]
    amount: Money
    commission: Money
    currency: Annotated[str, AfterValidator(_currency_code)] | None = None
    status: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class Link(_Strict):
    url: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_absolute_url)]
    sub_id: Annotated[str, Field(max_length=256)] | None = None


STORE_WIDE = "*"
"""The affiliate id of a store-wide callback, so never an event's affiliate."""


def _an_affiliate(value: str) -> str:
    if value == STORE_WIDE:
        raise ValueError(f"'{STORE_WIDE}' names the store-wide callback, not an affiliate")
    return value


class Event(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=128)]
    type: EventType
    affiliate_id: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_an_affiliate)]
    occurred_at: Annotated[AwareDatetime, AfterValidator(_whole_minute_offset)] | None = None
    order: Order
    link: Link

    def to_json(self) -> dict[str, Any]:
        """The event as plain JSON values; decimals become strings so they stay exact."""
        return self.model_dump(mode="json", exclude_none=True)


WHOLE_EVENT = "event"
"""The field an error names when it is about the event as a whole (not JSON, not an object)."""


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidEvent(ValueError):
    """An event was refused. `errors` names every field that is wrong."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__(f"invalid event: {self.details}")

    @property
    def details(self) -> str:
        """What is wrong, each field named once: for a whole-event error its message alone,
        since whoever quotes this has said "event" already (not `event: ... event: ...`)."""
        return "; ".join(e.message if e.field == WHOLE_EVENT else str(e) for e in self.errors)


def error_message(error: ErrorDetails) -> str:
    """What a refusal says of one field, whichever model refused it: pydantic's words, but
    a validator's own message without pydantic's "Value error, " before it."""
    if error["type"] == "extra_forbidden":
        return "unknown field"
    return error["msg"].removeprefix("Value error, ")


def _field_errors(exc: ValidationError) -> list[FieldError]:
    return [
        FieldError(".".join(str(part) for part in err["loc"]) or WHOLE_EVENT, error_message(err))
        for err in exc.errors(include_url=False)
    ]


def parse_event(data: Any) -> Event:
    """Validate a decoded JSON object (or a dict built in Python) into an `Event`."""
    if isinstance(data, Event):
        return data
    if not isinstance(data, Mapping):
        raise InvalidEvent([FieldError(WHOLE_EVENT, "must be a JSON object")])
    try:
        return Event.model_validate(dict(data))
    except ValidationError as exc:
        raise InvalidEvent(_field_errors(exc)) from None


def loads_event(text: str | bytes) -> Event:
    """Decode and validate one JSON event, keeping decimals exact (`10.50` stays `10.50`)."""
    try:
        data = read_json(text)
    except BadJson as exc:
        raise InvalidEvent([FieldError(WHOLE_EVENT, str(exc))]) from None
    return parse_event(data)


class OrderFields(TypedDict, total=False):
    """Keyword arguments of `order_created` / `order_updated`, flat for convenience."""

    id: Required[str]
    affiliate_id: Required[str]
    number: Required[str]
    amount: Required[Decimal | str | int]
    commission: Required[Decimal | str | int]
    link_url: Required[str]
    sub_id: str
    currency: str
    status: str
    occurred_at: datetime


def order_created(**fields: Unpack[OrderFields]) -> Event:
    """Build a validated `order.created` event; `InvalidEvent` names any bad argument."""
    return _order_event("order.created", fields)


def order_updated(**fields: Unpack[OrderFields]) -> Event:
    """Build a validated `order.updated` event; `InvalidEvent` names any bad argument."""
    return _order_event("order.updated", fields)


def _order_event(type: EventType, fields: OrderFields) -> Event:
    flat: dict[str, Any] = dict(fields)
    order = {key: flat.pop(key) for key in _ORDER_KEYS if key in flat}
    link = {"url": flat.pop("link_url", None)}
    if "sub_id" in flat:
        link["sub_id"] = flat.pop("sub_id")
    return parse_event({**flat, "type": type, "order": order, "link": link})


_ORDER_KEYS = ("number", "amount", "commission", "currency", "status")
