"""What tracing costs a delivery when it is off: `python -m bench.tracing_off`.

Times, with `timeit`, the tracing calls worker/job.py makes for one delivered event (the
run's span, the take's and the record's, the request's, their attributes) while no tracer
is enabled, as when OTEL_* ask for no traces. Each returns the one shared no-op span.
"""

from __future__ import annotations

import sys
import timeit
import uuid
from datetime import UTC, datetime

from producer.event import parse_event
from worker import tracing
from worker.exchange import Outcome

EVENT = parse_event(
    {
        "id": "bench-1",
        "type": "order.created",
        "affiliate_id": "ann",
        "order": {"number": "#1001", "amount": "10.50", "commission": "1.05"},
        "link": {"url": "https://shop.example/"},
    }
)
DELIVERY = uuid.uuid4()
NOW = datetime.now(UTC)
OUTCOME = Outcome(200, 12.5)


def one_delivery() -> None:
    """The tracing calls of one delivered event, in worker/job.py's order."""
    run = tracing.run(EVENT, DELIVERY, "job", 1, NOW)
    with run:
        with run.statement("postback_take") as statement:
            assert statement.noted is None  # what group commit is handed
        run.set("postback.take.action", "claimed")
        run.set("postback.delivery.state", "pending")
        with run.request("GET", "https://t.example/pb") as sent:
            sent.answered(OUTCOME)
        with run.statement("postback_record") as statement:
            assert statement.noted is None
        run.set("postback.delivery.state", "delivered")
        run.set("postback.attempt", 1)


def main() -> int:
    if tracing.enabled():
        print("tracing is on in this process: nothing to measure", file=sys.stderr)
        return 1
    number = 200_000
    best = min(timeit.repeat(one_delivery, number=number, repeat=5)) / number
    print(f"tracing off: {best * 1e9:.0f} ns per delivered event (best of 5 x {number:,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
