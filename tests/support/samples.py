"""A realistic event, as the template and filter tests render it, and what a refused
template says."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from producer.event import Event, parse_event
from worker.render import TemplateError, parse

LINK = "https://shop.example/summer?ref=ann&campaign=summer&sub_id=fb1#promo"

BASE: dict[str, Any] = {
    "id": "evt_01HX",
    "type": "order.created",
    "affiliate_id": "aff-42",
    "occurred_at": "2024-05-01T12:30:00+02:00",
    "order": {
        "number": "#1001",
        "amount": "10.50",
        "commission": "1.05",
        "currency": "EUR",
        "status": "pending",
    },
    "link": {"url": LINK},
}


def make_event(
    *, order: dict[str, Any] | None = None, link: dict[str, Any] | None = None, **top: Any
) -> Event:
    """The realistic event, with some fields replaced (a `None` value removes the field)."""
    data = copy.deepcopy(BASE)
    for section, changes in (("order", order), ("link", link), (None, top)):
        target = data if section is None else data[section]
        for key, value in (changes or {}).items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    return parse_event(data)


def refusal(source: str) -> str:
    with pytest.raises(TemplateError) as caught:
        parse(source)
    return str(caught.value)
