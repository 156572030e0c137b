"""Reading JSON that comes from outside the process: the one reader every edge uses.

Ingest, the ops API's bodies, `postback send` and `postback preview`, and the worker's job
deserializer all read with `read_json`, so a body means the same thing wherever it enters:

- numbers stay exact: `10.50` is `Decimal("10.50")`, never the float 10.5;
- a number no Decimal (or int) can hold, nesting deeper than Python can follow, and a key
  given twice in one object are each a `BadJson` saying so, never a crash. A duplicate key
  is refused because which of its values the sender meant is not ours to guess.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

_QUOTED_KEY = 60
"""Characters of a duplicate key quoted in the message: enough to find it, bounded."""


class BadJson(ValueError):
    """Input refused as JSON. The message, one line, says why."""


class NotJson(BadJson):
    """Not JSON text at all (a syntax error, or bytes that are not UTF-8), as opposed to
    JSON whose content is refused."""


def read_json(text: str | bytes) -> Any:
    """Decode JSON text with exact decimals and unique keys; `BadJson` when refused."""
    try:
        return json.loads(
            text, parse_float=_decimal, parse_int=_int, object_pairs_hook=_unique_keys
        )
    except BadJson:
        raise
    except RecursionError:
        raise BadJson("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise NotJson(f"not valid JSON ({exc})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Building the dict first and comparing sizes keeps the common case at C speed; only a
    # refused object pays for finding which key came twice.
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # Quoted as ASCII JSON: one printable line whatever the key holds (a line
                # break, a lone surrogate that stderr could not encode).
                raise BadJson(f"duplicate key {json.dumps(key[:_QUOTED_KEY])}")
            seen.add(key)
    return found


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # an exponent beyond what a Decimal holds: 0e1000000000000000000
        raise _out_of_range(text) from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        raise _out_of_range(text) from None


def _out_of_range(text: str) -> BadJson:
    shown = text if len(text) <= 40 else text[:40] + "…"
    return BadJson(f"the number {shown} is out of range")
