"""Template filters, Liquid style: `{{ order.amount | cents }}`, `{{ order.status | map: ... }}`.

Everything that can be wrong with a filter is found when its template is parsed, that is
when the callback is saved (docs/design.md, "Templates"): an unknown name, a missing or
malformed argument, and a filter given a kind of value it cannot read (`cents` on a sub id).
What is left for a delivery cannot fail: each filter is a total function from string to
string, an empty value stays empty (but for `default`), and a value a filter cannot read as
its kind renders as "". The chain's result is percent-encoded by `render.render` like any
value, so no filter can change where a request goes.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, ROUND_HALF_UP, Context, Decimal
from typing import ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

Kind = Literal["decimal", "time", "text"]
"""What a value is, fixed when the template is parsed: it decides which filters may follow."""

DECIMAL_VARIABLES: tuple[str, ...] = ("order.amount", "order.commission")
TIME_VARIABLES: tuple[str, ...] = ("event.occurred_at",)


@dataclass(frozen=True, slots=True)
class _Spec:
    """What a filter takes, checked by `parse_chain` before the filter is built."""

    argument: Literal["none", "text", "places"]
    works_on: Kind | None
    """The one kind it takes; None: any."""
    example: str


_SPECS: dict[str, _Spec] = {
    "default": _Spec("text", None, 'default: "none"'),
    "map": _Spec("text", None, 'map: "approved=1, rejected=2, *=0"'),
    "cents": _Spec("none", "decimal", "cents"),
    "decimals": _Spec("places", "decimal", "decimals: 2"),
    "date": _Spec("text", "time", 'date: "%Y-%m-%d %H:%M:%S"'),
    "tz": _Spec("text", "time", 'tz: "Europe/Berlin"'),
    "unix": _Spec("none", "time", "unix"),
    "lower": _Spec("none", None, "lower"),
    "upper": _Spec("none", None, "upper"),
}
KNOWN_FILTERS: tuple[str, ...] = tuple(_SPECS)
"""Every filter a template may use, in the order the README's table shows them."""

MAX_PLACES = 18
"""The most places `decimals` rounds to: as many as an amount can have."""

DATE_DIRECTIVES = "aAbBdHIjmMpSfyYzZ%"
"""The strftime directives `date` takes: ones every platform's strftime has (C99), and
Python's own %f. Others, such as glibc's %-d, would render differently, or not at all, on
another host."""

# Every operation here is exact (a product by 100, a rounding to a given exponent), so the
# precision only has to be large enough never to round: amounts have up to 38 digits, and a
# `default` may give a longer number, which must not raise either.
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, rounding=ROUND_HALF_UP)
_QUANTUM = tuple(Decimal(1).scaleb(-places) for places in range(MAX_PLACES + 1))
# How `format(d, "f")` writes a decimal (render.variables): ASCII digits, no exponent.
_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
_QUOTES = "\"'"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Where a filter's name ends: `cents|`, `decimals:`, `default"x"` (a forgotten colon).
_NAME = re.compile(r"[^\s|:\"']*")
_BARE_ARGUMENT = re.compile(r"[^\s|]*")


class FilterError(ValueError):
    """A filter refused at parse time. `index` is where, in the text `parse_chain` was given;
    the parser of the template turns it into the position in the template as typed, which
    goes between `before` and `after`."""

    def __init__(self, before: str, index: int, after: str = "") -> None:
        super().__init__(f"{before} at index {index}{after}")
        self.before = before
        self.index = index
        self.after = after


class Filter:
    """One filter of a chain with its argument parsed; `apply` never raises."""

    __slots__ = ()
    name: ClassVar[str]
    makes: ClassVar[Kind | None] = "text"
    """The kind of value it makes; None: the kind it was given."""

    def apply(self, value: str) -> str:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Default(Filter):
    text: str
    name: ClassVar[str] = "default"
    makes: ClassVar[Kind | None] = None  # or text, when `text` is no value of the kind

    def apply(self, value: str) -> str:
        return value or self.text


@dataclass(frozen=True, slots=True)
class Map(Filter):
    pairs: tuple[tuple[str, str], ...]
    fallback: str | None
    """The value of the `*` key, if given; without it a value no key matches stays as is."""
    name: ClassVar[str] = "map"

    def apply(self, value: str) -> str:
        if not value:
            return value
        for key, mapped in self.pairs:
            if key == value:
                return mapped
        return value if self.fallback is None else self.fallback


@dataclass(frozen=True, slots=True)
class Cents(Filter):
    name: ClassVar[str] = "cents"
    makes: ClassVar[Kind | None] = "decimal"

    def apply(self, value: str) -> str:
        amount = _decimal(value)
        if amount is None:
            return ""
        return _plain(amount.scaleb(2, _EXACT).quantize(_QUANTUM[0], context=_EXACT))


@dataclass(frozen=True, slots=True)
class Decimals(Filter):
    places: int
    name: ClassVar[str] = "decimals"
    makes: ClassVar[Kind | None] = "decimal"

    def apply(self, value: str) -> str:
        amount = _decimal(value)
        if amount is None:
            return ""
        return _plain(amount.quantize(_QUANTUM[self.places], context=_EXACT))


@dataclass(frozen=True, slots=True)
class Date(Filter):
    format: str
    zone: tzinfo = UTC
    """The zone of the `tz` before it in the chain, else UTC."""
    name: ClassVar[str] = "date"

    def apply(self, value: str) -> str:
        moment = _time(value)
        if moment is None:
            return ""
        try:
            return moment.astimezone(self.zone).strftime(self.format)
        except (OverflowError, ValueError):  # past year 1 or 9999 in that zone
            return ""


@dataclass(frozen=True, slots=True)
class Tz(Filter):
    zone: ZoneInfo
    name: ClassVar[str] = "tz"
    makes: ClassVar[Kind | None] = "time"

    def apply(self, value: str) -> str:
        moment = _time(value)
        if moment is None:
            return ""
        try:
            return moment.astimezone(self.zone).isoformat()
        except (OverflowError, ValueError):
            return ""


@dataclass(frozen=True, slots=True)
class Unix(Filter):
    name: ClassVar[str] = "unix"
    makes: ClassVar[Kind | None] = "decimal"

    def apply(self, value: str) -> str:
        moment = _time(value)
        # Floor division of timedeltas: exact, and a moment before 1970 rounds down too.
        return "" if moment is None else str((moment - _EPOCH) // _SECOND)


@dataclass(frozen=True, slots=True)
class Lower(Filter):
    name: ClassVar[str] = "lower"

    def apply(self, value: str) -> str:
        return value.lower()


@dataclass(frozen=True, slots=True)
class Upper(Filter):
    name: ClassVar[str] = "upper"

    def apply(self, value: str) -> str:
        return value.upper()


def apply(chain: tuple[Filter, ...], value: str) -> str:
    """A variable's value through its filters, in order."""
    for step in chain:
        value = step.apply(value)
    return value


def kind_of(variable: str) -> Kind:
    if variable in DECIMAL_VARIABLES:
        return "decimal"
    if variable in TIME_VARIABLES:
        return "time"
    return "text"


_WORKS_ON = {
    "decimal": f"amounts ({', '.join(DECIMAL_VARIABLES)})",
    "time": f"times ({', '.join(TIME_VARIABLES)})",
}
_NOUN: dict[Kind, str] = {"decimal": "number", "time": "time", "text": "text"}


def parse_chain(text: str, start: int, variable: str) -> tuple[Filter, ...]:
    """The filters of `text[start:]`, which begins with the `|` after the variable's name.

    `text` is what is between the braces, markdown escapes undone. Raises `FilterError`.
    """
    chain: list[Filter] = []
    kind = kind_of(variable)
    made_by: str | None = None
    zone: tzinfo = UTC
    pos = start
    while pos < len(text):  # text[pos] is a `|`
        bar = pos
        pos = _skip_spaces(text, pos + 1)
        name = _run(_NAME, text, pos)
        if not name:
            raise FilterError(
                "empty filter after '|'",
                bar,
                "; write a filter's name after it (e.g. | lower) or remove the '|'",
            )
        spec = _spec(name, pos)
        at, pos = pos, _skip_spaces(text, pos + len(name))
        argument: str | int | None = None
        argument_at = pos
        if pos < len(text) and text[pos] == ":":
            if spec.argument == "none":
                raise FilterError(
                    f"unexpected ':' after filter {quoted(name)}",
                    pos,
                    "; it takes no argument: remove ':' and what follows",
                )
            argument_at = _skip_spaces(text, pos + 1)
            argument, pos = _argument(text, argument_at, name, spec)
            pos = _skip_spaces(text, pos)
        elif spec.argument != "none":
            if pos < len(text) and text[pos] != "|":
                raise FilterError(
                    f"missing ':' before the argument of filter {quoted(name)}",
                    pos,
                    f"; write e.g. {spec.example}",
                )
            raise FilterError(
                f"filter {quoted(name)} needs an argument", at, f"; write e.g. {spec.example}"
            )
        if pos < len(text) and text[pos] != "|":
            junk = text[pos:].split("|", 1)[0].rstrip()
            raise FilterError(
                f"unexpected {quoted(junk)} after filter {quoted(name)}",
                pos,
                "; separate filters with '|'",
            )
        if spec.works_on is not None and kind != spec.works_on:
            raise FilterError(
                f"filter {quoted(name)}", at, _wrong_kind(name, spec, variable, kind, made_by)
            )
        step = _build(name, argument, argument_at, zone)
        if isinstance(step, Tz):
            zone = step.zone
        if step.makes is not None:
            kind = step.makes
        elif isinstance(step, Default) and not _is_of_kind(step.text, kind):
            kind = "text"
        chain.append(step)
        made_by = name
    return tuple(chain)


def _spec(name: str, at: int) -> _Spec:
    spec = _SPECS.get(name)
    if spec is not None:
        return spec
    matches = difflib.get_close_matches(name.lower(), KNOWN_FILTERS, n=1, cutoff=0.6)
    fix = (
        f"; did you mean {quoted(matches[0])}?"
        if matches
        else "; known filters are " + ", ".join(KNOWN_FILTERS)
    )
    raise FilterError(f"unknown filter {quoted(name)}", at, fix)


def _argument(text: str, at: int, name: str, spec: _Spec) -> tuple[str | int, int]:
    """The argument that starts at `at`, and where it ends."""
    if at == len(text) or text[at] == "|":
        raise FilterError(
            f"filter {quoted(name)} needs an argument after ':'", at, f"; write e.g. {spec.example}"
        )
    quote_char = text[at]
    if quote_char in _QUOTES:
        end = text.find(quote_char, at + 1)
        if end < 0:
            raise FilterError(
                f"unclosed quote {quoted(quote_char)} in the argument of filter {quoted(name)}",
                at,
                f"; close it with {quote_char} (an argument cannot contain '}}}}' or its own "
                "quote character)",
            )
        if spec.argument == "places":
            raise FilterError(*_places_error(text[at : end + 1], at))
        argument = text[at + 1 : end]
        _check_text(argument, at + 1, name)
        return argument, end + 1
    bare = _run(_BARE_ARGUMENT, text, at)
    if spec.argument == "text":
        raise FilterError(
            f"unquoted argument {quoted(bare)} of filter {quoted(name)}",
            at,
            f"; put it in quotes, e.g. {spec.example}",
        )
    if not (bare.isascii() and bare.isdigit() and len(bare) <= 2 and int(bare) <= MAX_PLACES):
        raise FilterError(*_places_error(bare, at))
    return int(bare), at + len(bare)


def _check_text(argument: str, at: int, name: str) -> None:
    """Refuse what no value could carry: a control character (which strftime would cut a
    format at, for one), or a lone surrogate, which cannot be percent-encoded."""
    control = _CONTROL.search(argument)
    if control:
        raise FilterError(
            f"control character U+{ord(control.group()):04X} in the argument of filter "
            + quoted(name),
            at + control.start(),
            "; remove it",
        )
    try:
        argument.encode()
    except UnicodeEncodeError as exc:
        raise FilterError(
            f"lone surrogate U+{ord(argument[exc.start]):04X} in the argument of filter "
            + quoted(name),
            at + exc.start,
            "; remove it",
        ) from None


def _places_error(typed: str, at: int) -> tuple[str, int, str]:
    return (
        f"argument {quoted(typed)} of filter 'decimals'",
        at,
        f" is not a number of places; write 0 to {MAX_PLACES} without quotes, e.g. decimals: 2",
    )


def _wrong_kind(name: str, spec: _Spec, variable: str, kind: Kind, made_by: str | None) -> str:
    assert spec.works_on is not None
    works_on = f" works on {_WORKS_ON[spec.works_on]}"
    if made_by is None:
        return f"{works_on}, not on {variable}"
    said = f"{works_on}, not on the {_NOUN[kind]} that {quoted(made_by)} makes"
    if kind_of(variable) == spec.works_on and made_by != name:
        return f"{said}; put {quoted(name)} before {quoted(made_by)}"
    return said


def _build(name: str, argument: str | int | None, at: int, zone: tzinfo) -> Filter:
    """The filter, its argument checked; `at` is where the argument starts (its quote)."""
    if isinstance(argument, int):
        return Decimals(argument)
    if argument is None:
        return {"cents": Cents, "unix": Unix, "lower": Lower, "upper": Upper}[name]()
    if name == "default":
        return Default(argument)
    if name == "map":
        return _map(argument, at + 1)
    if name == "date":
        _check_format(argument, at + 1)
        return Date(argument, zone)
    return Tz(_zone(argument, at + 1))


def _map(argument: str, at: int) -> Map:
    """`at`: where the argument's text starts."""
    if not argument.strip():
        raise FilterError(
            "no pairs in filter 'map'",
            at,
            '; write key=value pairs separated by commas, e.g. map: "approved=1, *=0"',
        )
    pairs: dict[str, str] = {}
    offset = 0
    for piece in argument.split(","):
        where = at + offset + len(piece) - len(piece.lstrip())
        offset += len(piece) + 1
        if not piece.strip():
            raise FilterError("empty pair in filter 'map'", where, "; remove the extra comma")
        key, equals, value = piece.partition("=")
        if not equals:
            raise FilterError(
                f"pair {quoted(piece.strip())} without '=' in filter 'map'",
                where,
                "; write key=value, and separate pairs with commas",
            )
        key = key.strip()
        if not key:
            raise FilterError(
                f"pair {quoted(piece.strip())} without a key in filter 'map'",
                where,
                "; write key=value, or *=value for every other value",
            )
        if key in pairs:
            raise FilterError(
                f"key {quoted(key)} given twice in filter 'map'", where, "; keep one of them"
            )
        pairs[key] = value.strip()
    fallback = pairs.pop("*", None)
    return Map(tuple(pairs.items()), fallback)


def _check_format(argument: str, at: int) -> None:
    if not argument:
        raise FilterError(
            "empty format in filter 'date'", at, '; write e.g. date: "%Y-%m-%d %H:%M:%S"'
        )
    pos = argument.find("%")
    while pos >= 0:
        directive = argument[pos : pos + 2]
        if len(directive) < 2:
            raise FilterError(
                "lone '%' at the end of the format of filter 'date'",
                at + pos,
                "; write %% for a percent sign",
            )
        if directive[1] not in DATE_DIRECTIVES:
            known = " ".join("%" + c for c in DATE_DIRECTIVES)
            raise FilterError(
                f"unknown directive {quoted(directive)} in filter 'date'",
                at + pos,
                f"; use {known} (%% for a percent sign)",
            )
        pos = argument.find("%", pos + 2)


def _zone(argument: str, at: int) -> ZoneInfo:
    try:
        return ZoneInfo(argument)
    except (ZoneInfoNotFoundError, ValueError):
        pass
    # Only on a refusal: listing the zones reads the whole time zone database.
    zones = sorted(available_timezones())
    by_case = {zone.lower(): zone for zone in zones}
    match = by_case.get(argument.lower()) or next(
        iter(difflib.get_close_matches(argument, zones, n=1, cutoff=0.6)), None
    )
    fix = (
        f"; did you mean {quoted(match)}?"
        if match
        else "; use an IANA time zone name such as 'Europe/Berlin' or 'UTC'"
    )
    raise FilterError(f"unknown time zone {quoted(argument)} in filter 'tz'", at, fix)


def _is_of_kind(text: str, kind: Kind) -> bool:
    """Whether `default`'s text is a value of `kind`, so later filters read it as one."""
    if kind == "decimal":
        return _PLAIN_DECIMAL.fullmatch(text) is not None
    if kind == "time":
        return _time(text) is not None
    return True


def _run(pattern: re.Pattern[str], text: str, pos: int) -> str:
    """What `pattern`, which matches the empty string too, matches at `pos`."""
    found = pattern.match(text, pos)
    return found.group() if found else ""


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _decimal(value: str) -> Decimal | None:
    return Decimal(value) if _PLAIN_DECIMAL.fullmatch(value) else None


def _plain(amount: Decimal) -> str:
    """Without exponent, and `0` for a negative amount that rounds to zero, not `-0`."""
    return format(amount.copy_abs() if amount.is_zero() else amount, "f")


def _time(value: str) -> datetime | None:
    """An ISO 8601 time with its offset, as `render.variables` writes `event.occurred_at`."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def quoted(text: str) -> str:
    r"""User text for a message, in single quotes and exactly as typed.

    Not `repr`: it doubles every backslash, so a markdown escape such as `\_` would be quoted
    as `\\_`, which is not what the user wrote, and it switches quote styles. Only characters
    that would break the one-line message or hide in it (newline, NBSP, ...) are spelled out.
    """
    return "'" + "".join(c if c.isprintable() else f"<U+{ord(c):04X}>" for c in text) + "'"
