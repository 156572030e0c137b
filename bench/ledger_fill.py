"""A ledger of millions of rows, generated in SQL: what years of running leave behind.

Every value is a function of the row's number, so two fills of the same size are the same
ledger. The mix is that of a relay in production: most deliveries delivered at the first
or a later try, some skipped (no callback), about 2% dead (a few discarded by ops), the
newest few thousand still pending or retrying; several hundred affiliates, a few of them
sending most of the orders; two thirds of the orders with a create and an update; every
attempt with the request it sent and the start of what came back; arrivals spread over 90
days.

Indexes other than the constraints' are dropped while the rows go in and built again
after (in two connections, as the rows are written), and the foreign key from attempts is
not checked row by row (its trigger is off while they go in): the rows are consistent by
construction, and loading them with every index kept up to date would take many times
longer. The tables are vacuumed and analysed at the end, as autovacuum would have done on
a ledger that grew over months.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta

import asyncpg

from bench.progress import say

AFFILIATES = 500
DAYS = 90
ATTEMPTS_PER_DELIVERY = 2
"""About: a fill of N deliveries holds about 2N attempts (the mix below gives 2.02)."""

MAX_OPEN = 5000


def open_count(deliveries: int) -> int:
    """The newest deliveries still pending or retrying: a few thousand on a big ledger."""
    return min(MAX_OPEN, max(10, deliveries // 1000))


# Per row n: o, the order (n*2/3: two thirds of the orders get a create and an update); a
# spread r in 0..9999 and a small one r2 in 0..99 (multiplicative hashes, so neighbouring
# rows differ); the affiliate, skewed so a few send most of the orders.
_ROWS = """
SELECT n, o, kind, r, r2, aff, at, st,
       CASE WHEN st = 'delivered' THEN CASE WHEN r2 < 45 THEN 1 WHEN r2 < 70 THEN 2
                                            WHEN r2 < 88 THEN 3 ELSE 4 END
            WHEN st IN ('dead', 'discarded') THEN CASE WHEN r2 < 70 THEN 8 ELSE 1 END
            WHEN st = 'retrying' THEN 1 + n % 3
            ELSE 0 END::int AS tries
FROM (
    SELECT n, o, kind, r, r2, aff, at,
           CASE WHEN n >= $2 - $3 THEN CASE WHEN n % 2 = 0 THEN 'retrying' ELSE 'pending' END
                WHEN r < 9600 THEN 'delivered' WHEN r < 9780 THEN 'skipped'
                WHEN r < 9980 THEN 'dead' ELSE 'discarded' END AS st
    FROM (
        SELECT n, (n * 2) / 3 AS o,
               CASE WHEN n = 0 OR (n * 2) / 3 <> ((n - 1) * 2) / 3
                    THEN 'order.created' ELSE 'order.updated' END AS kind,
               (n * 40503 + 977) % 10000 AS r, (n * 7919 + 13) % 100 AS r2,
               'aff' || lpad(floor($4 * power(((((n * 2) / 3) * 2654435761) % 4294967296)
                                    / 4294967296.0, 2))::int::text, 3, '0') AS aff,
               now() - make_interval(days => $5::int + $8::int)
                   + make_interval(days => $5) * (n::float8 / $2) AS at
        FROM generate_series($1::bigint, $6::bigint - 1) AS n
    ) a
) b
"""

_DELIVERIES = f"""
INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number, occurred_at,
                        callback_id, event, state, reason, error_class, request, attempts,
                        next_attempt_at, created_at, updated_at)
SELECT md5('d' || n)::uuid, $7::text || n, kind, aff, 'ORD-' || o, at - interval '2 seconds',
       1,
       jsonb_build_object(
           'id', $7::text || n, 'type', kind, 'affiliate_id', aff,
           'occurred_at', to_char(at - interval '2 seconds', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
           'order', jsonb_build_object(
               'number', 'ORD-' || o, 'amount', ((o % 9000) / 100.0 + 10)::text,
               'commission', ((o % 900) / 100.0 + 1)::text, 'currency', 'EUR',
               'status', CASE WHEN kind = 'order.created' THEN 'pending' ELSE 'paid' END),
           'link', jsonb_build_object(
               'url', 'https://shop.example/landing?ref=' || aff || '&sub_id=s' || o
                      || '&utm_source=partner&utm_campaign=autumn-sale',
               'sub_id', 's' || o)),
       st,
       CASE st WHEN 'skipped' THEN 'no enabled ' || kind || ' callback for ' || aff
               WHEN 'dead' THEN CASE WHEN tries = 1 THEN 'permanent failure: HTTP 404'
                                     ELSE 'gave up after 8 attempts: HTTP 503' END
               WHEN 'discarded' THEN 'gave up after 8 attempts: timeout'
               WHEN 'retrying' THEN 'HTTP 503, retrying' END,
       CASE WHEN st IN ('dead', 'discarded', 'retrying') THEN
           CASE WHEN tries = 1 AND st <> 'retrying' THEN 'http_4xx'
                WHEN r2 < 40 THEN 'http_5xx' WHEN r2 < 65 THEN 'timeout'
                WHEN r2 < 80 THEN 'connect_error' WHEN r2 < 95 THEN 'http_4xx'
                ELSE 'http_error' END END,
       CASE WHEN tries > 0 THEN jsonb_build_object(
           'method', 'GET',
           'url', 'https://track.' || aff || '.example/pb?order=ORD-' || o || '&amount='
                  || ((o % 9000) / 100.0 + 10) || '&commission=' || ((o % 900) / 100.0 + 1)
                  || '&currency=EUR&event=' || $7::text || n || '&sub=s' || o,
           'headers', jsonb_build_object(
               'User-Agent', 'postback-relay/1.0',
               'Idempotency-Key', md5('d' || n)::uuid::text,
               'X-Postback-Timestamp', extract(epoch FROM at)::bigint::text,
               'X-Postback-Signature', 'sha256=' || md5('s' || n) || md5('t' || n)),
           'body', NULL) END,
       tries,
       CASE st WHEN 'pending' THEN at
               WHEN 'retrying' THEN now() + make_interval(secs => (n % 3600 - 1800)::float8)
               ELSE at + make_interval(mins => tries) END,
       at, at + make_interval(mins => tries)
FROM ({_ROWS}) c
"""  # noqa: S608 -- constant SQL text

_ATTEMPTS = """
INSERT INTO attempts (delivery_id, number, started_at, duration_ms, status_code, error_class,
                      error, response_excerpt, request, response_headers)
SELECT d.id, k, d.created_at + make_interval(mins => k - 1),
       20 + (k * 37 + length(d.order_number) * 11) % 400,
       CASE WHEN ok THEN 200 WHEN cls IN ('timeout', 'connect_error', 'http_error') THEN NULL
            WHEN cls = 'http_4xx' THEN 404 ELSE 503 END,
       CASE WHEN NOT ok AND cls IN ('timeout', 'connect_error', 'http_error') THEN cls END,
       CASE WHEN ok THEN NULL
            WHEN cls = 'timeout' THEN 'no answer within 10 s'
            WHEN cls = 'connect_error' THEN 'Cannot connect to host track.'
                 || d.affiliate_id || '.example:443 ssl:default [Connection refused]'
            WHEN cls = 'http_error' THEN 'Server disconnected' END,
       CASE WHEN ok THEN '{"status":"ok","conversion_id":"' || md5(d.id::text) || '"}'
            WHEN cls = 'http_4xx' THEN '<html><head><title>404 Not Found</title></head><body>'
                 || '<center><h1>404 Not Found</h1></center><hr><center>nginx</center>'
                 || '</body></html>'
            WHEN cls IN ('timeout', 'connect_error', 'http_error') THEN ''
            ELSE '<html><head><title>503 Service Temporarily Unavailable</title></head><body>'
                 || '<center><h1>503 Service Temporarily Unavailable</h1></center><hr>'
                 || '<center>nginx</center></body></html>' END,
       d.request,
       CASE WHEN ok OR cls NOT IN ('timeout', 'connect_error', 'http_error') THEN
           jsonb_build_object('Server', 'nginx', 'Date', to_char(d.created_at,
                              'Dy, DD Mon YYYY HH24:MI:SS "GMT"'),
                              'Content-Type', CASE WHEN ok THEN 'application/json'
                                                   ELSE 'text/html' END,
                              'Connection', 'keep-alive') END
FROM (
    SELECT d.*, k, (d.state = 'delivered' AND k = d.attempts) AS ok,
           coalesce(d.error_class, 'http_5xx') AS cls
    FROM deliveries d, generate_series(1, d.attempts) AS k
    WHERE d.created_at >= $1 AND d.created_at < $2
) d
"""

_CALLBACKS = """
INSERT INTO callbacks (affiliate_id, event_type, method, url_template)
SELECT 'aff' || lpad(a::text, 3, '0'), t, 'GET',
       'https://track.aff' || lpad(a::text, 3, '0') || '.example/pb?order={{order.number}}'
       || '&amount={{order.amount}}&event={{event.id}}'
FROM generate_series(0, $1 - 1) AS a, unnest(ARRAY['order.created', 'order.updated']) AS t
"""

_SECONDARY_INDEXES = """
SELECT i.indexname, i.indexdef FROM pg_indexes i
WHERE i.schemaname = 'public' AND i.tablename IN ('deliveries', 'attempts')
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)
ORDER BY i.indexname
"""


async def _in_two(url: str, statements: list[tuple[str, tuple[object, ...]]]) -> None:
    """Run the statements on two connections at once (the machine's cores, at least)."""
    queue = list(statements)

    async def drain() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SET maintenance_work_mem = '256MB'")
            while queue:
                sql, args = queue.pop(0)
                await conn.execute(sql, *args)
        finally:
            await conn.close()

    await asyncio.gather(drain(), drain())


async def fill(
    url: str,
    deliveries: int,
    events: str,
    *,
    days: int = DAYS,
    ago: int = 0,
    settled_only: bool = False,
) -> dict[str, int]:
    """Fill an empty ledger with `deliveries` deliveries and about twice as many attempts;
    returns the row count of each table. Event ids start with `events`: the run's id, so
    the jobs a bulk replay of them enqueues are found and deleted with the run's keys.

    Arrivals span `days` days up to `ago` days before now: a ledger older than a retention
    setting, for pruning. `settled_only` leaves out the newest open deliveries, which a
    running worker's sweep would send to the fill's made-up hosts."""
    conn = await asyncpg.connect(url)
    try:
        started = time.monotonic()
        await conn.execute(_CALLBACKS, AFFILIATES)
        indexes = await conn.fetch(_SECONDARY_INDEXES)
        for row in indexes:
            await conn.execute(f'DROP INDEX "{row["indexname"]}"')
        chunk = max(1, -(-deliveries // 8))
        opened = 0 if settled_only else open_count(deliveries)
        say(f"ledger: writing {deliveries:,} deliveries")
        await _in_two(
            url,
            [
                (_DELIVERIES, (lo, deliveries, opened, AFFILIATES, days,
                               min(lo + chunk, deliveries), events, ago))
                for lo in range(0, deliveries, chunk)
            ],
        )  # fmt: skip
        say(f"  {time.monotonic() - started:.0f} s; writing their attempts")
        bounds = await conn.fetchrow("SELECT min(created_at), max(created_at) FROM deliveries")
        assert bounds is not None
        low, high = bounds[0], bounds[1]
        step = (high - low) / 8
        edges = [low + step * k for k in range(8)] + [high + timedelta(seconds=1)]
        await conn.execute("ALTER TABLE attempts DISABLE TRIGGER ALL")
        await _in_two(url, [(_ATTEMPTS, (a, b)) for a, b in itertools.pairwise(edges)])
        await conn.execute("ALTER TABLE attempts ENABLE TRIGGER ALL")
        say(f"  {time.monotonic() - started:.0f} s; building {len(indexes)} indexes")
        await _in_two(url, [(row["indexdef"], ()) for row in indexes])
        say(f"  {time.monotonic() - started:.0f} s; vacuum and analyse")
        await conn.execute("VACUUM (ANALYZE) deliveries, attempts, callbacks")
        say(f"  filled in {time.monotonic() - started:.0f} s")
        counts = {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
            for table in ("deliveries", "attempts")
        }
    finally:
        await conn.close()
    return counts
