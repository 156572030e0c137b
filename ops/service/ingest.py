"""HTTP ingest: the order system posts events, validated exactly as the producer library does.

A request is all or nothing: one refused event means none of the batch is enqueued, so
the order system can fix the batch and send it again without working out which got in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from producer.event import Event, InvalidEvent, parse_event
from producer.json_input import BadJson, read_json

MAX_BATCH = 1000
MAX_BODY = 1024 * 1024
"""Bytes of one ingest request body: 1000 events of about 1 KiB each."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """One thing wrong with a request: which event (None for the body as a whole), which
    field, and why."""

    index: int | None
    field: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message}


class BatchRefused(Exception):
    def __init__(self, refusals: list[Refusal]) -> None:
        self.refusals = refusals
        super().__init__("; ".join(f"{r.index}: {r.field}: {r.message}" for r in refusals))


def parse_batch(body: bytes) -> list[Event]:
    """Every event of an ingest body (one JSON event, or an array of them), or `BatchRefused`
    naming each bad one by its index (0 for a single event) and field."""
    try:
        document = read_json(body)
    except BadJson as exc:
        raise BatchRefused([Refusal(None, "event", str(exc))]) from None
    items = document if isinstance(document, list) else [document]
    if not items:
        raise BatchRefused([Refusal(None, "events", "the array holds no event")])
    if len(items) > MAX_BATCH:
        raise BatchRefused(
            [Refusal(None, "events", f"at most {MAX_BATCH} events per request, got {len(items)}")]
        )
    events: list[Event] = []
    refusals: list[Refusal] = []
    for index, item in enumerate(items):
        try:
            events.append(parse_event(item))
        except InvalidEvent as exc:
            refusals.extend(Refusal(index, e.field, e.message) for e in exc.errors)
    if refusals:
        raise BatchRefused(refusals)
    return events
