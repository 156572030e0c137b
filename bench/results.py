"""A scenario's findings: one row per figure, with its target and verdict when it has one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["PASS", "FAIL", "INFO", "INVALID", "ERROR"]
"""INFO: a figure with no target. INVALID: the run lost deliveries or could not be checked,
so its figures mean nothing. ERROR: the scenario crashed."""


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    metric: str
    value: str
    target: str = ""
    status: Status = "INFO"
    note: str = ""


def judged(scenario: str, metric: str, value: str, target: str, ok: bool, note: str = "") -> Row:
    return Row(scenario, metric, value, target, "PASS" if ok else "FAIL", note)


class InvalidMeasurement(Exception):
    """The run finished but its count does not add up (lost, duplicated or undelivered
    events): reporting its rate would be a lie."""
