"""One HTTP exchange of a delivery, as plain values: the `Request` an attempt sends and the
`Outcome` it got. The retry policy, the per-destination fairness and the ledger decide
and record from these alone, without the HTTP client that produces them (worker.deliver).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

ErrorClass = Literal[
    "timeout",
    "connect_error",
    "http_error",
    "too_many_redirects",
    "invalid_url",
    "blocked_address",
]
ERROR_CLASSES: tuple[ErrorClass, ...] = get_args(ErrorClass)
"""What an attempt that got no usable answer failed of (README, "The ledger")."""

NO_ANSWER: frozenset[ErrorClass] = frozenset({"connect_error", "timeout", "http_error"})
"""Failures before any answer: the destination is down or stuck, rather than refusing.
The retry policy tries these again; fairness counts them towards opening the circuit."""

StatusClass = Literal[
    "http_0xx", "http_1xx", "http_3xx", "http_4xx", "http_5xx",
    "http_6xx", "http_7xx", "http_8xx", "http_9xx",
]  # fmt: skip
STATUS_CLASSES: tuple[StatusClass, ...] = get_args(StatusClass)
"""An unwanted answer, by the first digit of its status: the HTTP client takes any three
digits from a receiver, not only 100 to 599."""

FailureClass = Literal[ErrorClass, StatusClass]
FAILURE_CLASSES: tuple[FailureClass, ...] = (*ERROR_CLASSES, *STATUS_CLASSES)
"""Every value of a delivery's `error_class`: what workers record and ops filter by, so a
filter can refuse a misspelt one (`http_500`) instead of matching nothing."""

_STATUS_CLASS: dict[int, StatusClass] = {int(name[5]): name for name in STATUS_CLASSES}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None

    def as_json(self) -> dict[str, Any]:
        """The request as recorded in the ledger and shown by `preview --json`."""
        return {
            "method": self.method,
            "url": self.url,
            "headers": self.headers,
            "body": None if self.body is None else json.loads(self.body),
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt got: a status code, or an error class and message."""

    status: int | None
    duration_ms: float
    error_class: ErrorClass | None = None
    error: str | None = None
    excerpt: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    """The response's headers, as sent (a test fire shows them)."""

    @property
    def retry_after(self) -> str | None:
        """The response's Retry-After header, as sent; the retry policy reads it."""
        return next((v for k, v in self.headers if k.lower() == "retry-after"), None)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def failure_class(self) -> FailureClass | None:
        """What ops filter dead letters by: the error class, or `http_4xx` / `http_5xx`
        (`http_3xx` for a redirect without a usable Location) for an unwanted answer."""
        if self.error_class is not None or self.status is None:
            return self.error_class
        return None if self.ok else _STATUS_CLASS[self.status // 100]
