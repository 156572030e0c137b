"""Every setting of the relay, read from `POSTBACK_*` environment variables in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.connection import parse_redis_url
from producer.queue import DEFAULT_QUEUE
from worker import duration, notify, sign
from worker.address import Network, parse_networks
from worker.deliver import QUICK_RETRY_SECONDS
from worker.ledger import AutoDisable, parse_span
from worker.prune import Retention, parse_keep
from worker.retry import DEFAULT_SCHEDULE, parse_schedule

MIN_TOKEN_LENGTH = 16


class Settings(BaseSettings):
    """Defaults suit one machine; the README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(env_prefix="POSTBACK_", extra="ignore", frozen=True)

    database_url: str | None = Field(
        default=None,
        description="Postgres DSN. Unset: an embedded Postgres in the data folder.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://, rediss:// or unix://), or redis+sentinel:// to find "
        "the primary through Sentinel. Unset: an embedded Redis.",
    )
    data_dir: Path = Field(
        default=Path(".postback"),
        description="Where the embedded Postgres and Redis keep their data.",
    )
    queue_name: str = Field(
        default=DEFAULT_QUEUE,
        min_length=1,
        description="Redis key of the event queue; relays sharing a Redis use different ones.",
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to open a connection to a receiver."
    )
    request_timeout: float = Field(
        default=10.0, gt=0, description="Seconds for a whole request, body included."
    )
    retry_schedule: str = Field(
        default=DEFAULT_SCHEDULE,
        description="Waits before each retry of a failed delivery (units ms, s, m, h, d); "
        "empty for no retries.",
    )
    job_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds one delivery may take before it is cancelled and tried again.",
    )
    create_wait: float = Field(
        default=600.0,
        ge=0,
        description="Seconds an order's updates wait for its order.created when the ledger "
        "has none yet and the affiliate has an order.created callback; then they go without "
        "it. 0: never wait.",
    )
    shutdown_wait: int = Field(
        default=20,
        ge=0,
        description="Seconds a stopping worker lets in-flight deliveries finish.",
    )
    max_jobs: int = Field(default=50, ge=1, description="Deliveries one worker runs at once.")
    poll_delay: float = Field(
        default=0.05,
        gt=0,
        description="Seconds a worker waits between reads of the queue (each takes up to "
        "5 x max_jobs due jobs, and at least 100); arq's own 0.5 s adds up to that much "
        "latency and caps a worker near 500 deliveries a second.",
    )
    destination_max_in_flight: int = Field(
        default=10,
        ge=1,
        description="Requests one worker process sends to one destination (scheme, host, "
        "port) at once; more wait their turn outside the worker's job slots.",
    )
    circuit_failures: int = Field(
        default=5,
        ge=1,
        description="Requests without an answer that open a destination's circuit, when "
        "they are at least half of its last 4 x this many in the last minute: its "
        "deliveries wait, without spending attempts, until a probe gets one.",
    )
    circuit_open_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long an opened circuit waits before its probe; doubled after each "
        "failed probe, up to 10 minutes.",
    )
    auto_disable_after: int = Field(
        default=10,
        ge=0,
        description="Deliveries of one callback that die in a row, the first at least "
        "POSTBACK_AUTO_DISABLE_SPAN ago, which disable it as a 410 does (recorded as the "
        "relay's doing, and notified); a delivered one starts the count again. 0: never.",
    )
    auto_disable_span: str = Field(
        default="1h",
        description="How long ago the first of those deaths must be at least, so a burst of "
        "them during a short outage disables nothing (units s, m, h, d); 0: no wait.",
    )
    db_pool_size: int = Field(
        default=10, ge=1, description="Postgres connections one worker process keeps."
    )
    api_host: str = Field(
        default="127.0.0.1", min_length=1, description="Address `postback serve` listens on."
    )
    api_port: int = Field(
        default=8080, ge=0, le=65535, description="Port `postback serve` listens on."
    )
    ingest_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the order system sends to POST /v1/events.",
    )
    ops_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for the ops API (deliveries, dead letters, callbacks).",
    )
    allow_networks: str | None = Field(
        default=None,
        description="Networks (CIDRs, comma-separated) receivers may be in although the SSRF "
        "policy refuses them, e.g. 10.20.0.0/16 for an affiliate on a private link.",
    )
    ops_webhook: SecretStr | None = Field(
        default=None,
        description="URL the relay posts ops notifications to (a callback disabled, an "
        "affiliate's dead letters over the threshold, a circuit open too long): JSON whose "
        "`text` Slack-compatible incoming webhooks show. Unset: they are only recorded.",
    )
    ops_webhook_secret: SecretStr | None = Field(
        default=None,
        description="Signs the notifications as a callback's secret signs its postbacks "
        "(Standard Webhooks); unset: unsigned.",
    )
    notify_dead_letters: int = Field(
        default=100,
        ge=0,
        description="Deliveries of one affiliate that died within "
        "POSTBACK_NOTIFY_DEAD_LETTERS_WINDOW which make a notification; 0: never.",
    )
    notify_dead_letters_window: str = Field(
        default="1h",
        description="The window those deaths are counted in (units s, m, h, d).",
    )
    notify_circuit_open: str = Field(
        default="15m",
        description="How long a destination's circuit stays open before a notification "
        "says so; 0: never.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe log level written."
    )
    keep_settled: str = Field(
        default="30d",
        description="How long delivered and skipped deliveries are kept after they settled, "
        "with their attempts (units s, m, h, d); 0 or empty: forever.",
    )
    keep_dead: str = Field(
        default="90d",
        description="How long dead and discarded deliveries are kept after they settled; "
        "0 or empty: forever.",
    )
    keep_excerpts: str = Field(
        default="30d",
        description="How long an attempt keeps the request it sent and the response "
        "headers and excerpt it got; 0 or empty: forever.",
    )

    @property
    def schedule(self) -> tuple[float, ...]:
        """`retry_schedule` in seconds."""
        return parse_schedule(self.retry_schedule)

    @property
    def allowed(self) -> tuple[Network, ...]:
        """`allow_networks` parsed."""
        return parse_networks(self.allow_networks or "")

    @property
    def auto_disable(self) -> AutoDisable:
        """The `auto_disable_*` settings parsed."""
        return AutoDisable.parse(self.auto_disable_after, self.auto_disable_span)

    @field_validator("auto_disable_span")
    @classmethod
    def _span(cls, value: str) -> str:
        parse_span(value)
        return value

    @property
    def dead_letters_window(self) -> float:
        """`notify_dead_letters_window` in seconds."""
        return duration.parse(self.notify_dead_letters_window)

    @property
    def circuit_open_after(self) -> float | None:
        """`notify_circuit_open` in seconds; None: never."""
        return notify.parse_after(self.notify_circuit_open)

    @field_validator("ops_webhook", "ops_webhook_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `POSTBACK_OPS_WEBHOOK=` in an env file (.env.example has it) means "not set".
        return None if value == "" else value

    @field_validator("ops_webhook")
    @classmethod
    def _webhook(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None:
            allowed = parse_networks(info.data.get("allow_networks") or "")
            notify.check_url(value.get_secret_value(), allowed)
        return value

    @field_validator("ops_webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            sign.key(value.get_secret_value())  # its ValueError says what a whsec_ one needs
        return value

    @field_validator("notify_dead_letters_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if not duration.parse(value):
            raise ValueError("must be longer than 0s")
        return value

    @field_validator("notify_circuit_open")
    @classmethod
    def _circuit_open(cls, value: str) -> str:
        notify.parse_after(value)
        return value

    @property
    def retention(self) -> Retention:
        """The `keep_*` settings parsed."""
        return Retention.parse(self.keep_settled, self.keep_dead, self.keep_excerpts)

    @field_validator("keep_settled", "keep_dead", "keep_excerpts")
    @classmethod
    def _keep(cls, value: str) -> str:
        parse_keep(value)
        return value

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, value: str | None) -> str | None:
        parse_networks(value or "")
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @model_validator(mode="after")
    def _job_outlasts_its_request(self) -> Settings:
        # A job cancelled while its request can still succeed would send it twice.
        least = self.connect_timeout + QUICK_RETRY_SECONDS + self.request_timeout
        if self.job_timeout <= least:
            raise ValueError(
                f"POSTBACK_JOB_TIMEOUT must be more than {least:g} s: the connect timeout, "
                "a quick retry and the request timeout"
            )
        return self

    @field_validator("ingest_token", "ops_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        # `POSTBACK_OPS_TOKEN=` in an env file (.env.example has both) means "not set".
        return None if value == "" else value

    @field_validator("ingest_token", "ops_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"must be at least {MIN_TOKEN_LENGTH} characters; "
                "`openssl rand -hex 32` makes a good one"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        message = "must be a postgresql://USER@HOST:PORT/DATABASE URL"
        if not value.startswith(("postgres://", "postgresql://")):
            raise ValueError(message)
        try:
            urlsplit(value).port  # noqa: B018 -- raises for a port that is not a number
        except ValueError:
            raise ValueError(message) from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_redis_url(value)  # its ValueError says which form was expected
        return value
