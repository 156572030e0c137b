"""Affiliates' callbacks: validated when saved, loaded by the worker for each event."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from producer.event import EVENT_TYPES, EventType
from worker import address, render, sign
from worker.database import Executor

Method = Literal["GET", "POST"]
METHODS: tuple[Method, ...] = ("GET", "POST")
GENERATE = "generate"
"""Given as the secret, has a new random one made (`sign.generate`)."""


class CallbackError(ValueError):
    """A callback was refused; `field` names what is wrong, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Callback:
    id: int
    affiliate_id: str
    event_type: EventType
    method: Method
    url_template: str
    secret: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        """What listings show: everything but the secret, which is only said to exist."""
        return {
            "id": self.id,
            "affiliate_id": self.affiliate_id,
            "event_type": self.event_type,
            "method": self.method,
            "url_template": self.url_template,
            "has_secret": self.secret is not None,
            "enabled": self.enabled,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class CallbackSpec:
    """A callback as given by a person, validated: what `save` writes."""

    affiliate_id: str
    event_type: EventType
    method: Method
    template: render.Template
    secret: str | None
    generated: bool = False
    """The secret was made here, so the person saving it must be shown it, once."""
    remove_secret: bool = False
    """Saved without a secret, its requests unsigned; else a spec without one keeps the
    stored secret."""


def validate(
    affiliate_id: str,
    event_type: str,
    method: str,
    url_template: str,
    secret: str | None = None,
    *,
    allowed: Sequence[address.Network],
    remove_secret: bool = False,
) -> CallbackSpec:
    """`allowed` are the networks the SSRF policy opens (`Settings.allowed`): a host that is
    a refused address outside them is refused here, before any event is sent there.
    `secret=None` keeps the stored secret, unless `remove_secret`."""
    if not 1 <= len(affiliate_id) <= 64:
        raise CallbackError("affiliate_id", "affiliate id must be 1 to 64 characters")
    if event_type not in EVENT_TYPES:
        raise CallbackError(
            "event_type", f"event must be one of {', '.join(EVENT_TYPES)}, got {event_type!r}"
        )
    method = method.upper()
    if method not in METHODS:
        raise CallbackError("method", f"method must be GET or POST, got {method!r}")
    if secret is not None and not secret:
        raise CallbackError("secret", "secret must not be empty")
    if secret is not None and remove_secret:
        raise CallbackError("secret", "give a secret or remove it, not both")
    generated = secret == GENERATE
    if generated:
        secret = sign.generate()
    elif secret is not None:
        try:
            sign.key(secret)
        except ValueError as exc:
            raise CallbackError("secret", str(exc)) from None
    try:
        template = render.parse(url_template)
        render.check_new(template)
    except render.TemplateError as exc:
        raise CallbackError("url", str(exc)) from None
    _check_host(template.host, allowed)
    return CallbackSpec(
        affiliate_id, event_type, method, template, secret, generated, remove_secret
    )


def _check_host(host: str, allowed: Sequence[address.Network]) -> None:
    refused = address.host_refusal(host, allowed)
    if refused is not None:
        raise CallbackError("url", refused)
    legacy = address.legacy_spelling(host)
    if legacy is not None:
        # HTTP clients refuse such spellings: every delivery would fail.
        raise CallbackError(
            "url", f"the URL's host {host} means {legacy}; write the address as {legacy}"
        )


def _from_row(row: asyncpg.Record) -> Callback:
    # The dataclass mirrors the table's columns, so SELECT * maps one to one.
    return Callback(**dict(row))


async def save(conn: Executor, spec: CallbackSpec) -> Callback:
    """Create or replace the callback for the affiliate and event type.

    A spec without a secret keeps the stored one, unless it says to remove it: re-pointing
    a URL must not silently stop the signatures the affiliate checks.
    """
    row = await conn.fetchrow(
        """
        INSERT INTO callbacks (affiliate_id, event_type, method, url_template, secret)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (affiliate_id, event_type) DO UPDATE
        SET method = EXCLUDED.method, url_template = EXCLUDED.url_template,
            secret = CASE WHEN $6 THEN NULL ELSE COALESCE(EXCLUDED.secret, callbacks.secret) END,
            enabled = true, updated_at = now()
        RETURNING *
        """,
        spec.affiliate_id,
        spec.event_type,
        spec.method,
        spec.template.source,
        spec.secret,
        spec.remove_secret,
    )
    assert row is not None
    return _from_row(row)


async def get(conn: Executor, affiliate_id: str, event_type: str) -> Callback | None:
    row = await conn.fetchrow(
        "SELECT * FROM callbacks WHERE affiliate_id = $1 AND event_type = $2",
        affiliate_id,
        event_type,
    )
    return None if row is None else _from_row(row)


async def list_all(conn: Executor, affiliate_id: str | None = None) -> list[Callback]:
    rows = await conn.fetch(
        """
        SELECT * FROM callbacks
        WHERE $1::text IS NULL OR affiliate_id = $1
        ORDER BY affiliate_id, event_type
        """,
        affiliate_id,
    )
    return [_from_row(row) for row in rows]


async def remove(conn: Executor, affiliate_id: str, event_type: str) -> bool:
    """Remove the callback; False when there was none. Past deliveries stay recorded."""
    status: str = await conn.execute(
        "DELETE FROM callbacks WHERE affiliate_id = $1 AND event_type = $2",
        affiliate_id,
        event_type,
    )
    return status != "DELETE 0"


async def set_enabled(conn: Executor, affiliate_id: str, event_type: str, enabled: bool) -> bool:
    """Enable or disable the callback; False when there is none.

    A disabled callback keeps its URL and secret: new events for it are skipped, and a
    dead letter cannot be replayed to it until it is enabled again.
    """
    status: str = await conn.execute(
        """
        UPDATE callbacks SET enabled = $3, updated_at = now()
        WHERE affiliate_id = $1 AND event_type = $2
        """,
        affiliate_id,
        event_type,
        enabled,
    )
    return status != "UPDATE 0"
