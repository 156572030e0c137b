"""What people pick deliveries by: the filters, a listing's limit and cursor, an id.

One pydantic model each, used by the CLI's options, the API's query parameters, bulk
replay and (through the OpenAPI document) the page, so a filter means the same thing
wherever it is typed, and a bad one is refused with the same words, the known values
listed: a misspelt `http_500` must not list nothing.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainValidator,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, ErrorDetails, core_schema

from producer.event import EVENT_TYPES, EventType, FieldError, error_message
from worker import duration
from worker.exchange import FAILURE_CLASSES, FailureClass
from worker.ledger import STATES, State

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_TEXT = 4096
"""Characters of a filter's text: far more than any affiliate id or order number."""


class InputError(ValueError):
    """Values a person or a script gave were refused: `errors` names each field and says
    why; `field` and `message` are the first's."""

    def __init__(self, field: str, message: str, *more: FieldError) -> None:
        self.field = field
        self.message = message
        self.errors = [FieldError(field, message), *more]
        super().__init__("; ".join(map(str, self.errors)))


Model = TypeVar("Model", bound=BaseModel)


def read(model: type[Model], data: Mapping[str, Any], noun: str = "field") -> Model:
    """`data` as a `model`, or an `InputError` naming each refused field; `noun` is what
    the caller calls a key (a query's are parameters)."""
    try:
        # One "now" for the whole filter: `since=2h&until=2h` is empty, not a microsecond.
        return model.model_validate(data, context={"now": datetime.now(UTC)})
    except ValidationError as exc:
        first, *more = (
            FieldError(".".join(map(str, err["loc"])) or "body", _message(err, model, noun))
            for err in exc.errors(include_url=False)
        )
        raise InputError(first.field, first.message, *more) from None


def _message(err: ErrorDetails, model: type[BaseModel], noun: str) -> str:
    if err["type"] == "extra_forbidden":
        known = ", ".join(_fields_at(model, [str(part) for part in err["loc"][:-1]]))
        return f"unknown {noun}; known: {known or 'none'}"
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a JSON object"  # not pydantic's "... or instance of Filter"
    return error_message(err)


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """The fields of the model found at `path` inside `model` (its own for an empty path)."""
    for name in path:
        field = model.model_fields.get(name)
        inner = None if field is None else next(_models_in(field.annotation), None)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


@dataclass(frozen=True, slots=True)
class OneOf:
    """In `Annotated[...]`: refuses a value outside `values`, listing them all (pydantic's
    own words for a Literal quote each value and end in "or"). The CLI offers them as
    choices, the document as an enum."""

    values: tuple[str, ...]

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        schema = handler(source)
        allowed = (*self.values, None) if schema["type"] == "nullable" else self.values

        def check(value: object) -> object:
            if value not in allowed:
                raise ValueError(f"must be one of {', '.join(self.values)}")
            return value

        return core_schema.no_info_before_validator_function(check, schema)


def choices(model: type[BaseModel], name: str) -> tuple[str, ...] | None:
    """The values a field of `model` is one of, or None for free text."""
    found = (m.values for m in model.model_fields[name].metadata if isinstance(m, OneOf))
    return next(found, None)


def plain_text(value: object) -> object:
    """Text that Postgres can hold: no NUL, and valid UTF-8 (a percent-encoded query can
    carry a lone surrogate)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("must not contain the NUL character")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text") from None
    return value


Text = Annotated[str, BeforeValidator(plain_text), StringConstraints(max_length=MAX_TEXT)]


_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
_LATEST = datetime(9999, 12, 30, tzinfo=UTC)


def _when(value: object, info: ValidationInfo) -> datetime | None:
    """An ISO 8601 time (UTC without an offset), or a duration meaning that long ago."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string")
    plain_text(value)
    now: datetime = (info.context or {}).get("now") or datetime.now(UTC)
    try:
        ago = duration.parse(value)
    except ValueError:
        pass
    else:
        try:
            return _in_range(now - timedelta(seconds=ago))
        except OverflowError:
            raise ValueError("is further back than any time Postgres holds") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            "must be an ISO 8601 time (2026-11-21T09:00:00Z) or a duration (30m, 2h, 7d)"
        ) from None
    # A time without a zone is read as UTC: the relay records and shows UTC.
    return _in_range(parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC))


def _in_range(at: datetime) -> datetime:
    # Year 1 and 9999 with an offset fall outside what Postgres (and Python) can hold.
    if not _EARLIEST <= at <= _LATEST:
        raise ValueError("must be between the years 1 and 9999")
    return at


When = Annotated[datetime | None, PlainValidator(_when, json_schema_input_type=str | None)]


class _Typed(BaseModel):
    """What a person types: an empty value (`?state=`, an unset option) is no value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {key: value for key, value in data.items() if value not in ("", None)}
        return data


class Filter(_Typed):
    """Which deliveries to pick by what they hold: every field is optional, and the ones
    given must all match."""

    affiliate: Annotated[Text | None, Field(description="affiliate id")] = None
    event_type: Annotated[EventType | None, OneOf(EVENT_TYPES), Field(description="event type")] = (
        None
    )
    order: Annotated[Text | None, Field(description="order number")] = None
    error_class: Annotated[
        FailureClass | None,
        OneOf(FAILURE_CLASSES),
        Field(description="error class of the last failed attempt"),
    ] = None
    since: Annotated[
        When,
        Field(description="taken at or after: an ISO 8601 time, or a duration ago (30m, 2h, 7d)"),
    ] = None
    until: Annotated[
        When, Field(description="taken before: an ISO 8601 time, or a duration ago")
    ] = None

    @field_validator("until")
    @classmethod
    def _after_since(cls, until: datetime | None, info: ValidationInfo) -> datetime | None:
        since = info.data.get("since")
        if since is not None and until is not None and since >= until:
            raise ValueError("must be later than since")
        return until

    def dead_letters(self) -> DeliveryFilter:
        """This filter over dead letters only: dead, neither replayed nor discarded."""
        return DeliveryFilter(
            **{name: getattr(self, name) for name in Filter.model_fields}, state="dead"
        )


class DeliveryFilter(Filter):
    """A filter and the state: dead letters, whose state is dead, have no use for it."""

    state: Annotated[State | None, OneOf(STATES), Field(description="the delivery's state")] = None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts: after this (created_at, id), newest first."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, value: object) -> Cursor | None:
        """A cursor as `encode` gave it out; None is the first page."""
        if value is None or isinstance(value, Cursor):
            return value
        try:
            if not isinstance(value, str):
                raise ValueError
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            created, did = raw.split("|")
            at = datetime.fromisoformat(created)
            if at.tzinfo is None or not _EARLIEST <= at <= _LATEST:
                raise ValueError
            return cls(at, uuid.UUID(did))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ValueError("is not one this service gave out") from None


def _limit(value: object) -> object:
    # Digits only: "+5", " 5" and "5.0" are refused as they always were.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"must be a whole number from 1 to {MAX_LIMIT}")
    return value


class Paging(_Typed):
    """A listing's page: newest first, `limit` at a time."""

    limit: Annotated[
        int,
        Field(ge=1, le=MAX_LIMIT, description=f"at most this many (1 to {MAX_LIMIT})"),
        BeforeValidator(_limit),
    ] = DEFAULT_LIMIT
    cursor: Annotated[
        Cursor | None,
        PlainValidator(Cursor.decode, json_schema_input_type=str | None),
        Field(description="where the previous listing said to go on: its `next`"),
    ] = None


class DeliveryQuery(Paging, DeliveryFilter):
    """A page of deliveries."""


class DeadLetterQuery(Paging, Filter):
    """A page of dead letters."""


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ValueError("must be a delivery id (a UUID)") from None


DeliveryId = Annotated[
    uuid.UUID, BeforeValidator(lambda value: _uuid(value) if isinstance(value, str) else value)
]


MIN_PREFIX = 8
"""Characters of a delivery id that pick it out, as a commit's first ones do in git: fewer
would match several ids too often to be worth typing."""

_CANONICAL = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
"""Where the hyphens are in a delivery id as the relay prints it."""

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class IdPrefix:
    """A delivery id as a person types it: in full, or its first characters (at least
    `MIN_PREFIX`, hyphens where the printed id has them, or none). The ids it can stand for
    run from `low` to `high`, so finding them is a range on the primary key, not a scan."""

    low: uuid.UUID
    high: uuid.UUID

    @property
    def full(self) -> uuid.UUID | None:
        """The id itself, when all of it was given."""
        return self.low if self.low == self.high else None

    @classmethod
    def parse(cls, text: str) -> IdPrefix:
        """Raises ValueError saying what a delivery id looks like."""
        try:
            whole = uuid.UUID(text)
        except ValueError:
            pass
        else:
            return cls(whole, whole)
        digits = _hex_digits(text.lower())
        if digits is None:
            raise ValueError(
                f"must be a delivery id (a UUID) or its first {MIN_PREFIX} or more characters"
            )
        if len(digits) < MIN_PREFIX:
            raise ValueError(
                f"give at least {MIN_PREFIX} characters of a delivery id, got {len(digits)}"
            )
        return cls(uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f")))


def _hex_digits(text: str) -> str | None:
    """The hex digits of the start of an id: all hex, or the printed form cut short."""
    if len(text) <= 32 and set(text) <= _HEX:
        return text
    if len(text) <= len(_CANONICAL) and all(
        ch == "-" if at == "-" else ch in _HEX for ch, at in zip(text, _CANONICAL, strict=False)
    ):
        return text.replace("-", "")
    return None
