"""How the relay reaches Redis: the URL forms it takes (one server, or the primary that
Sentinel names) and the client every part of the relay opens on them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from producer.json_input import read_json
from producer.queue import DEFAULT_QUEUE, serialize

REDIS_TIMEOUT = 5.0
"""Seconds to connect to Redis, or to wait for one answer, before saying it is unreachable."""


SENTINEL_TIMEOUT = 1.0
"""Seconds to connect to a sentinel, or to wait for its answer, before asking the next one."""

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
"""The port of a sentinel given without one."""

URL_FORMS = (
    "redis://HOST:PORT/DB, rediss://HOST:PORT/DB, unix:///PATH or "
    "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
)
"""Every form of Redis URL the relay takes, for error messages."""

_SENTINEL_FORM = "redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
_HOST_PORT = re.compile(
    r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\[\]:/@,]+))(?::(?P<port>\d+))?"
)


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A `redis+sentinel://` URL: the sentinels to ask for the primary of `service`, and what
    to log in to the primary with. The sentinels themselves are asked without a password."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_redis_url(redis_url: str) -> SentinelUrl | None:
    """Check a Redis URL: None for the URL of one server, which redis-py opens itself; the
    parts of a Sentinel URL. A malformed URL raises ValueError saying what was expected
    (never quoting the URL, which may hold a password).

    Neither redis-py nor arq reads a Sentinel URL, so this is where the relay defines one:
    `redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`, the form
    of the Redis-Sentinel-Url package (without its query parameters). A sentinel without
    a port is on 26379; an IPv6 address goes in brackets.
    """
    scheme, _, rest = redis_url.partition("://")
    if scheme != SENTINEL_SCHEME:
        try:
            RedisSettings.from_dsn(redis_url)
        except (RuntimeError, ValueError):
            raise ValueError(f"must be a {URL_FORMS} URL") from None
        return None

    def refuse(why: str) -> ValueError:
        return ValueError(f"must be a {_SENTINEL_FORM} URL: {why}")

    if "?" in rest or "#" in rest:
        raise refuse("it takes no ?query or #fragment")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise refuse("the password is missing")
        username, password = unquote(user) or None, unquote(secret)
    sentinels = []
    for address in hosts.split(","):
        found = _HOST_PORT.fullmatch(address)
        port = int(found["port"] or SENTINEL_PORT) if found else 0
        if found is None or not 0 < port < 65536:
            raise refuse("each sentinel is HOST:PORT, and they are separated by commas")
        sentinels.append((found["ip6"] or found["host"], port))
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise refuse("SERVICE, the name the sentinels know the primary by, is missing")
    if not (db or "0").isdigit():
        raise refuse("DB is not a number")
    return SentinelUrl(tuple(sentinels), unquote(service), int(db or "0"), username, password)


def redis_settings(redis_url: str) -> RedisSettings:
    """arq's description of a Redis URL, for whoever runs arq's own Worker on it."""
    parsed = parse_redis_url(redis_url)
    if parsed is None:
        return RedisSettings.from_dsn(redis_url)
    return RedisSettings(
        host=list(parsed.sentinels),
        sentinel=True,
        sentinel_master=parsed.service,
        database=parsed.db,
        username=parsed.username,
        password=parsed.password,
    )


class _SentinelRedis(ArqRedis):
    """A client of the primary that Sentinel names. Its pool asks the sentinels where the
    primary is whenever it opens a connection, so after a failover the connections it
    opens again go to the new primary; closing it also closes those to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            pool: SentinelConnectionPool = self.connection_pool  # type: ignore[assignment]
            for client in pool.sentinel_manager.sentinels:
                await client.aclose()


def open_redis(
    redis_url: str, queue_name: str = DEFAULT_QUEUE, *, read_timeout: float | None = REDIS_TIMEOUT
) -> ArqRedis:
    """A client for the relay's queue, from any URL `parse_redis_url` takes. It connects on
    first use, so a service can start (and say on its health check that Redis is down)
    while Redis is away.

    Every part of the relay opens Redis here: the worker, the service, the producer and
    the command line. Through Sentinel, a connection lost in a failover fails the command
    that was using it; the next connection goes to whichever server is the primary then.

    `read_timeout` None: no limit on waiting for an answer (connecting still has one).
    redis-py enforces it on writes with asyncio.wait_for, which on Python 3.11 can swallow
    the cancellation of the task that is waiting; the worker, stopped by cancelling its
    main loop, must not have one.
    """
    parsed = parse_redis_url(redis_url)
    redis: ArqRedis
    if parsed is None:
        redis = ArqRedis.from_url(
            redis_url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=read_timeout
        )
    else:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(parsed.sentinels),
            sentinel_kwargs={
                "socket_connect_timeout": SENTINEL_TIMEOUT,
                "socket_timeout": None if read_timeout is None else SENTINEL_TIMEOUT,
            },
            db=parsed.db,
            username=parsed.username,
            password=parsed.password,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=read_timeout,
        )
        redis = sentinel.master_for(parsed.service, redis_class=_SentinelRedis)
    redis.job_serializer = serialize
    redis.job_deserializer = read_json
    redis.default_queue_name = queue_name
    return redis


async def connect_redis(
    redis_url: str, queue_name: str = DEFAULT_QUEUE, *, read_timeout: float | None = REDIS_TIMEOUT
) -> ArqRedis:
    """`open_redis`, and one quick try: whoever calls this should learn at once that Redis
    is down (a producer, a starting worker), not after retries that would hide the cause."""
    redis = open_redis(redis_url, queue_name, read_timeout=read_timeout)
    try:
        await redis.ping()
    except BaseException:
        await redis.aclose()
        raise
    return redis
