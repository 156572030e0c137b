"""Where the bench runs (servers, names) and how big each scenario is.

Every name the bench creates carries one random run id, so a run can find and delete
exactly what it made in a Redis and a Postgres that others share.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ALLOW_NETWORKS = "127.0.0.1/32"
"""The receivers listen on loopback, which the SSRF policy refuses: open just that."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """The servers the bench uses, from POSTBACK_BENCH_* variables, and the run's id."""

    admin_url: str
    redis_base: str
    redis_db: int
    peer_redis_db: int = 13
    """The Celery peer's broker: a Redis database number of its own."""
    run: str = field(default_factory=lambda: secrets.token_hex(5))

    def __post_init__(self) -> None:
        if self.peer_redis_db == self.redis_db:
            raise ValueError(
                f"the Celery peer needs a Redis database of its own, not {self.redis_db} too "
                "(POSTBACK_BENCH_PEER_REDIS_DB)"
            )

    @classmethod
    def from_env(cls) -> BenchConfig:
        return cls(
            admin_url=os.environ.get(
                "POSTBACK_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
            ),
            redis_base=os.environ.get("POSTBACK_BENCH_REDIS_URL", "redis://127.0.0.1:6379"),
            redis_db=int(os.environ.get("POSTBACK_BENCH_REDIS_DB", "14")),
            peer_redis_db=int(os.environ.get("POSTBACK_BENCH_PEER_REDIS_DB", "13")),
        )

    @property
    def database_name(self) -> str:
        return f"postback_bench_{self.run}"

    @property
    def database_url(self) -> str:
        return self.admin_url.rsplit("/", 1)[0] + f"/{self.database_name}"

    @property
    def redis_url(self) -> str:
        return f"{self.redis_base.rstrip('/')}/{self.redis_db}"

    @property
    def peer_database_name(self) -> str:
        """The Celery peer's Postgres database, apart from the relay's."""
        return f"postback_bench_{self.run}_peer"

    @property
    def peer_database_url(self) -> str:
        return self.admin_url.rsplit("/", 1)[0] + f"/{self.peer_database_name}"

    @property
    def ledger_database_name(self) -> str:
        """The ledger scenario's database of millions of rows, apart from the relay's."""
        return f"postback_bench_{self.run}_ledger"

    @property
    def ledger_database_url(self) -> str:
        # The host kept as given, a socket folder (?host=) included.
        return urlsplit(self.admin_url)._replace(path=f"/{self.ledger_database_name}").geturl()

    @property
    def peer_redis_url(self) -> str:
        return f"{self.redis_base.rstrip('/')}/{self.peer_redis_db}"

    @property
    def peer_key_prefix(self) -> str:
        """The start of every Redis key of the Celery peer: it holds the run id."""
        return f"postback-bench:{self.run}:peer:"

    def queue_name(self, scenario: str) -> str:
        """A queue per scenario: one scenario's leftovers can never feed the next's worker."""
        return f"postback-bench:{self.run}:{scenario}"

    def event_id(self, scenario: str, n: int) -> str:
        """Event ids carry the run id, so every job key arq derives from them does too."""
        return f"bench-{self.run}-{scenario}-{n}"


@dataclass(frozen=True, slots=True)
class Options:
    """Sizes from the command line; None means the scenario's own default."""

    events: int | None = None
    """The scenario's main count: events per run (throughput, per worker for scale, queued
    for memory, healthy for isolation)."""
    rate: float = 300.0
    """latency: events per second."""
    seconds: float = 30.0
    """latency: how long the steady rate is kept up."""
    memory_window: float = 20.0
    """memory: seconds of draining during which RSS is sampled."""
    plans: str | None = None
    """ledger: the file to write each operation's query plans to."""
