"""Durations as people type them (`30s`, `5m`, `2h`, `250ms`, `1d`), and back.

One home for the units, so the retry schedule, a callback's delay and the ledger filters'
`--since 1h` read the same text the same way.
"""

from __future__ import annotations

import re

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_STEP = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SPELLED = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def parse(text: str) -> float:
    """One duration in seconds; `ValueError` with a message naming the text otherwise."""
    item = text.strip()
    match = _STEP.fullmatch(item)
    if match is None:
        raise ValueError(f"{item!r} is not a duration; write it like 30s, 5m, 2h or 250ms")
    return float(match[1]) * UNITS[match[2]]


def parse_setting(text: str, example: str, zero: str) -> float | None:
    """A duration setting that may be 0 (or empty): its seconds, or None for 0 in any unit.
    `zero` says what 0 means to it, and a refusal says it too: `'soon' is not a duration;
    write it like {example}, or 0 {zero}`."""
    item = text.strip()
    if item in ("", "0"):
        return None
    try:
        seconds = parse(item)
    except ValueError:
        raise ValueError(
            f"{item!r} is not a duration; write it like {example}, or 0 {zero}"
        ) from None
    return seconds or None


def spell(seconds: int) -> str:
    """Whole seconds in the largest unit that spells them exactly: 300 is `5m`, 90 is `90s`,
    0 is `0s`; what `parse` reads back as the same number."""
    for unit, size in _SPELLED:
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
