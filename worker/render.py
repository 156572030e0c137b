r"""Callback URL templates: parsed once when a callback is saved, rendered for every delivery.

Two promises matter here (docs/design.md, "Templates"). A template that would fail
later is refused at save time, with a message the affiliate manager can act on. And no event
value can change where a request goes or how the URL is read: the scheme and host are
literal text, and every substituted value is percent-encoded, so a `/`, `?`, `#` or `&` in
an order number stays data. A value through filters (`{{ order.amount | cents }}`, in
worker/filters.py) is checked the same way when saved and encoded the same way when sent.

Templates are copied from the raw text of markdown docs, so they carry markdown's backslash
escapes (`\{{link.sub\_id\}}`, `?a=1\&b=2`). The parser reads them as a markdown renderer
shows them, and refuses a backslash that is no escape rather than send it as `%5C`.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit

from producer.event import Event
from worker.filters import Filter, FilterError, parse_chain, quoted
from worker.filters import apply as apply_filters

KNOWN_VARIABLES: tuple[str, ...] = (
    "event.id",
    "event.type",
    "event.occurred_at",
    "affiliate.id",
    "order.number",
    "order.amount",
    "order.commission",
    "order.currency",
    "order.status",
    "link.url",
    "link.path",
    "link.hash",
    "link.sub_id",
)
"""Every fixed variable name; `link.query.NAME` (any non-empty NAME) is accepted on top."""

MAX_TEMPLATE_LENGTH = 4096

_KNOWN = frozenset(KNOWN_VARIABLES)
_QUERY_FAMILY = "link.query"
_QUERY_PREFIX = _QUERY_FAMILY + "."
# Docs renderers often show `\{{name\}}`; each brace of a pair may carry its own backslash.
_OPEN = re.compile(r"\\?\{\\?\{")
_CLOSE = re.compile(r"\\?\}\\?\}")
# CommonMark: a backslash before any ASCII punctuation character (string.punctuation, all 32)
# escapes it, and docs written in markdown escape `_` and `&` in URLs. Inside `{{...}}` the
# backslash is dropped, so `{{link.sub\_id}}` is link.sub_id. In the template's own text the
# escaped character is kept, except `\\`: it stands for a backslash, which a URL cannot carry.
_ESCAPE_IN_NAME = re.compile(r"\\([" + re.escape(string.punctuation) + "])")
_ESCAPABLE_IN_TEXT = frozenset(string.punctuation) - {"\\"}
# A backslash and the character after it, if any; matched left to right, so `\\_` is `\\`, `_`.
_BACKSLASH = re.compile(r"\\(.?)", re.DOTALL)
_SCHEME = re.compile(r"(https?)://", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_AUTHORITY_END = re.compile(r"[/?#]")
# RFC 3986 reserved characters and `%`; letters, digits and `-._~` are always kept by quote.
_URI_CHARACTERS = "!#$%&'()*+,/:;=?@[]"
# Characters that are never valid in a URL host and that parsers disagree about.
_BAD_HOST_CHAR = re.compile(r"[\s\\{}<>\"^`|]")
# Brackets only enclose a whole IP-literal host, optionally followed by a port. urlsplit
# reads `[::1]x` or `evil.example[::1]` as the host ::1, where yarl refuses the URL and the
# delivery would fail on every attempt.
_HOST_AND_PORT = re.compile(r"\[[^\[\]]*\](?::[^\[\]]*)?|[^\[\]]*")


class TemplateError(ValueError):
    """A template was refused; the message is one line saying what is wrong and where."""


@dataclass(frozen=True, slots=True)
class Variable:
    """A `{{name}}` placeholder; `name` is already validated and stripped of spaces, and
    `filters` (`{{name | lower}}`) are checked against the kind of value they get."""

    name: str
    filters: tuple[Filter, ...] = ()


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template. Build it with `parse`, which does all validation up front."""

    source: str
    parts: tuple[str | Variable, ...]
    host: str
    """The URL's host as a parser reads it: lower case, IPv6 without brackets."""
    credentials: bool = False
    """A user name (and password) before the host. Refused by `check_new`, not by `parse`:
    a callback saved before that rule must go on being sent."""
    fragment: bool = False
    """A `#...` after the path: never sent, so refused by `check_new` (as `credentials`)."""
    uses_filters: bool = field(init=False)
    """Some variable has filters: a POST then carries the rendered query too (`body`), and
    `render` takes the slower way only then."""

    def __post_init__(self) -> None:
        filtered = any(isinstance(part, Variable) and part.filters for part in self.parts)
        object.__setattr__(self, "uses_filters", filtered)


def parse(source: str) -> Template:
    r"""Validate a template when the callback is saved, so mistakes surface to a person.

    Raises `TemplateError` for an unknown variable (suggesting the closest known name) or
    filter, a filter that cannot take the value it is given, an empty or unclosed `{{`, a
    stray `}}`, control characters, a backslash in the text that is no markdown escape, a
    template over 4096 characters, and any template whose scheme and host are not literal
    `http(s)://host`. Markdown escapes are read as the docs show them
    (`\&` is `&`), so the host check and the parts see the unescaped text; `source` is kept
    as typed, and positions in messages count it as typed.
    """
    if len(source) > MAX_TEMPLATE_LENGTH:
        raise TemplateError(
            f"template is {len(source)} characters long; the limit is {MAX_TEMPLATE_LENGTH}"
        )
    if not source:
        raise TemplateError("template is empty; expected a URL such as https://host/path")
    parts = _tokenize(source)
    authority = _scheme_and_host(source, parts)
    return Template(
        source=source,
        parts=tuple(_uri_text(part) if isinstance(part, str) else part for part in parts),
        host=authority.hostname or "",
        credentials="@" in authority.netloc,
        fragment=any(isinstance(part, str) and "#" in part for part in parts),
    )


def check_new(template: Template) -> None:
    """What a template being saved must not have, on top of what `parse` refuses.

    Credentials would be shown wherever the template is (listings, the page, logs of a
    failed delivery), and a fragment never reaches the affiliate: both are mistakes to
    point out before the first postback goes, not something to send.
    """
    if template.credentials:
        raise TemplateError(
            f"template has credentials (user:password@) before the host {template.host}; "
            "they would be shown in listings and on the page: remove them (a secret signs "
            "the requests instead)"
        )
    if template.fragment:
        raise TemplateError(
            "template has a fragment ('#' and what follows), which is never sent to the "
            "affiliate: remove it, or write %23 for a literal '#'"
        )


def variables(event: Event) -> dict[str, str]:
    """Every variable's value for one event, as the strings that get percent-encoded.

    Decimals are written exactly and without exponent (`10.50`, `1000`), so the affiliate
    sees the amount the store recorded. Missing optional fields become "".
    """
    url = event.link.url
    split = urlsplit(url)
    query = _query_values(split.query)
    values = {
        "event.id": event.id,
        "event.type": event.type,
        "event.occurred_at": event.occurred_at.isoformat() if event.occurred_at else "",
        "affiliate.id": event.affiliate_id,
        "order.number": event.order.number,
        "order.amount": format(event.order.amount, "f"),
        "order.commission": format(event.order.commission, "f"),
        "order.currency": event.order.currency or "",
        "order.status": event.order.status or "",
        "link.url": url,
        "link.path": split.path,
        "link.hash": split.fragment,
        # An empty override is treated as absent: producers often send "" for "none".
        "link.sub_id": event.link.sub_id or query.get("sub_id", ""),
    }
    for name, value in query.items():
        values[_QUERY_PREFIX + name] = value
    return values


def render(template: Template, values: Mapping[str, str]) -> str:
    """Fill a parsed template; each value is percent-encoded, the template text is not.

    Only RFC 3986 unreserved characters survive unencoded, so no value can add a path
    segment, a query parameter or a fragment; a value through filters is encoded the same
    way. A variable without a value renders as "" (or as its `default`).
    """
    if template.uses_filters:
        return "".join(
            part
            if isinstance(part, str)
            else quote(apply_filters(part.filters, values.get(part.name, "")), safe="")
            for part in template.parts
        )
    return "".join(
        part if isinstance(part, str) else quote(values.get(part.name, ""), safe="")
        for part in template.parts
    )


def body(values: Mapping[str, str], rendered: str | None = None) -> dict[str, Any]:
    """The JSON body of a POST: the flat variables nested on their dots.

    `link.query.NAME` nests as one key NAME under `link.query`, even when NAME has dots,
    because it is a query parameter name and not a path. `link.query` is always present
    (possibly empty), so receivers can rely on the shape. `rendered`: the URL rendered from
    a template with filters, whose decoded query goes along as `rendered_query`, so a
    receiver reading the body gets the filtered values too (the first of a repeated
    name, as `link.query`).
    """
    out: dict[str, Any] = {"link": {"query": {}}}
    for key, value in values.items():
        if key.startswith(_QUERY_PREFIX):
            out["link"]["query"][key.removeprefix(_QUERY_PREFIX)] = value
        else:
            group, name = key.split(".", 1)
            out.setdefault(group, {})[name] = value
    if rendered is not None:
        out["rendered_query"] = _query_values(urlsplit(rendered).query)
    return out


def _query_values(query: str) -> dict[str, str]:
    """A query string's parameters, decoded; the first value wins, a nameless one is none."""
    values: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name:
            values.setdefault(name, value)
    return values


def _tokenize(source: str) -> tuple[str | Variable, ...]:
    """The template's text (unescaped, not yet URI-encoded) and variables, in order."""
    parts: list[str | Variable] = []
    pos = 0
    while True:
        opening = _OPEN.search(source, pos)
        literal = source[pos : opening.start() if opening else len(source)]
        _check_literal(literal, pos)
        if literal:
            parts.append(_unescape_text(source, pos, literal))
        if opening is None:
            return tuple(parts)
        closing = _CLOSE.search(source, opening.end())
        following = _OPEN.search(source, opening.end())
        if closing is None or (following is not None and following.start() < closing.start()):
            raise TemplateError(
                f"unclosed '{{{{' at character {opening.start() + 1} of the template; "
                "close it with '}}'"
            )
        inner = source[opening.end() : closing.start()]
        parts.append(_variable(inner, opening.end(), opening.start() + 1))
        pos = closing.end()


def _variable(inner: str, offset: int, position: int) -> Variable:
    r"""The variable typed as `inner` between braces, which starts at `offset` of the source
    (whose `{{` is at character `position`).

    A `|` starts its filters, `\|` too: markdown shows it as `|` (a table cell must write it
    so), and the name is read as markdown shows it.
    """
    if "|" not in inner:
        typed = inner.strip()
        name = _ESCAPE_IN_NAME.sub(r"\1", typed)
        _check_name(name, typed, position)
        return Variable(name)
    text, where = _unescape_in_braces(inner)
    bar = text.index("|")
    typed = inner[: where[bar]].strip()
    name = _ESCAPE_IN_NAME.sub(r"\1", typed)
    _check_name(name, typed, position)
    try:
        chain = parse_chain(text, bar, name)
    except FilterError as exc:
        at = offset + (where[exc.index] if exc.index < len(where) else len(inner)) + 1
        raise TemplateError(f"{exc.before} at character {at} of the template{exc.after}") from None
    return Variable(name, chain)


def _unescape_in_braces(inner: str) -> tuple[str, list[int]]:
    """`inner` with its markdown escapes undone, and where in `inner` each of its characters
    was typed, so a message can point at the filter as typed."""
    text: list[str] = []
    where: list[int] = []
    pos = 0
    for escape in _ESCAPE_IN_NAME.finditer(inner):
        text.append(inner[pos : escape.start()])
        where.extend(range(pos, escape.start()))
        text.append(escape.group(1))
        where.append(escape.start())
        pos = escape.end()
    text.append(inner[pos:])
    where.extend(range(pos, len(inner)))
    return "".join(text), where


def _uri_text(literal: str) -> str:
    """The template's own text as it goes on the wire.

    Valid URL characters, `%XX` escapes included, stay exactly as written; a space or a
    non-ASCII letter typed into the template is percent-encoded, since an HTTP request line
    cannot carry it raw.
    """
    return quote(literal, safe=_URI_CHARACTERS)


def _check_literal(literal: str, offset: int) -> None:
    stray = _CLOSE.search(literal)
    if stray:
        raise TemplateError(
            f"unmatched '}}}}' at character {offset + stray.start() + 1} of the template; "
            "variables are written {{name}}"
        )
    control = _CONTROL.search(literal)
    if control:
        raise TemplateError(
            f"template contains control character U+{ord(control.group()):04X} at character "
            f"{offset + control.start() + 1}; a URL cannot contain it"
        )


def _unescape_text(source: str, offset: int, literal: str) -> str:
    """`literal` (which starts at `offset` of `source`) as a markdown renderer shows it.

    A backslash that is not an escape is refused rather than kept: it would go out as `%5C`,
    and the affiliate would silently get a URL that neither the docs nor the user showed.
    """
    text: list[str] = []
    pos = 0
    for escape in _BACKSLASH.finditer(literal):
        if escape.group(1) not in _ESCAPABLE_IN_TEXT:
            raise TemplateError(_backslash_error(source, offset + escape.start()))
        text.extend((literal[pos : escape.start()], escape.group(1)))
        pos = escape.end()
    text.append(literal[pos:])
    return "".join(text)


def _backslash_error(source: str, index: int) -> str:
    # Read the next character from the whole source: a literal cut short by `\{{` ends in
    # the first backslash of `\\{{`, which markdown reads as an escaped backslash.
    following = source[index + 1 : index + 2]
    where = f"at character {index + 1} of the template"
    if following == "\\":
        typed = quoted(source[index : index + 2])
        return (
            f"escaped backslash {typed} {where} stands for a backslash, which a URL cannot "
            "carry; write %5C for a literal backslash"
        )
    fix = "remove it, or write %5C for a literal backslash"
    if not following:
        return f"backslash {where} is its last character and escapes nothing; {fix}"
    return (
        f"backslash before {quoted(following)} {where} escapes nothing "
        f"(only ASCII punctuation can be escaped); {fix}"
    )


def _check_name(name: str, typed: str, position: int) -> None:
    """Check an unescaped variable `name`; messages quote it as `typed`, escapes and all."""
    if not name:
        raise TemplateError(
            f"empty variable '{{{{}}}}' at character {position} of the template; "
            "put a name inside, e.g. {{order.number}}"
        )
    if name in _KNOWN or (name.startswith(_QUERY_PREFIX) and len(name) > len(_QUERY_PREFIX)):
        return
    if name in (_QUERY_FAMILY, _QUERY_PREFIX):
        raise TemplateError(
            f"variable {quoted(typed)} needs a query parameter name after 'link.query.', "
            "e.g. 'link.query.ref' for ?ref=..."
        )
    suggestion = _suggest(name)
    if suggestion:
        raise TemplateError(
            f"unknown variable {quoted(typed)} in template; did you mean {quoted(suggestion)}?"
        )
    raise TemplateError(
        f"unknown variable {quoted(typed)} in template; known variables are "
        + ", ".join((*KNOWN_VARIABLES, "link.query.NAME"))
    )


def _suggest(name: str) -> str | None:
    if name.lower() in _KNOWN:
        return name.lower()
    # `link.qeury.ref` should suggest `link.query.ref`, keeping the parameter name as typed.
    segments = name.split(".", 2)
    if len(segments) == 3 and segments[2]:
        family = f"{segments[0]}.{segments[1]}".lower()
        if difflib.SequenceMatcher(None, family, _QUERY_FAMILY).ratio() >= 0.8:
            return _QUERY_PREFIX + segments[2]
    matches = difflib.get_close_matches(name, KNOWN_VARIABLES, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _scheme_and_host(source: str, parts: tuple[str | Variable, ...]) -> SplitResult:
    """The template's scheme and authority, read as a URL parser reads them."""
    # Scheme and host must be literal: a variable there would let event data pick the target.
    first = parts[0] if parts and isinstance(parts[0], str) else ""
    scheme = _SCHEME.match(first)
    if scheme is None:
        raise TemplateError(_host_error(source))
    rest = first[scheme.end() :]
    end = _AUTHORITY_END.search(rest)
    if end is None and len(parts) > 1:
        raise TemplateError(_host_error(source, "a variable cannot be part of the host"))
    authority = rest[: end.start()] if end else rest
    if not authority.isascii():
        raise TemplateError(_host_error(source, _ascii_hint(authority)))
    bad = _BAD_HOST_CHAR.search(authority)
    if bad:
        raise TemplateError(_host_error(source, f"the host contains {quoted(bad.group())}"))
    userinfo, _, host_and_port = authority.rpartition("@")
    if "[" in userinfo or "]" in userinfo or not _HOST_AND_PORT.fullmatch(host_and_port):
        raise TemplateError(
            _host_error(source, "brackets may only enclose an IPv6 host, e.g. [2001:db8::1]:8080")
        )
    try:
        split = urlsplit(f"{scheme.group(1)}://{authority}")
        hostname = split.hostname
        split.port  # noqa: B018 -- raises ValueError for a port that is not a number 0-65535
    except ValueError as exc:
        raise TemplateError(_host_error(source, f"the host is not valid ({exc})")) from None
    if not hostname:
        raise TemplateError(_host_error(source, "the host is empty"))
    return split


def _ascii_hint(authority: str) -> str:
    """How to write a non-ASCII authority: its host's own punycode (IDNA), when it has one."""
    host = authority.rpartition("@")[2].partition(":")[0]
    if host.isascii():
        return "the text before '@' has non-ASCII characters; percent-encode them"
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:  # not a name IDNA can spell: an empty or too long label, ...
        return "write the host in its ASCII (punycode) form"
    return f"write the host in its ASCII form, {ascii_host}"


def _host_error(source: str, reason: str = "") -> str:
    excerpt = source if len(source) <= 80 else source[:77] + "..."
    detail = f"; {reason}" if reason else ""
    return (
        "template must start with http:// or https:// and a literal host"
        f"{detail}, got {quoted(excerpt)}"
    )
