"""The scenarios, in the order `python -m bench` runs them; each returns its table rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.context import Bench
from bench.results import Row
from bench.scenarios import ingest, isolation, latency, ledger, memory, prune, scale, throughput

Scenario = Callable[[Bench], Awaitable[list[Row]]]

SCENARIOS: dict[str, Scenario] = {
    throughput.NAME: throughput.run,
    latency.NAME: latency.run,
    isolation.NAME: isolation.run,
    memory.NAME: memory.run,
    scale.NAME: scale.run,
    ingest.NAME: ingest.run,
    ledger.NAME: ledger.run,
    prune.NAME: prune.run,
}
