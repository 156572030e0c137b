"""The producer library: build, validate and enqueue order events for the relay.

Example::

    async with await Producer.connect("redis://localhost:6379") as producer:
        await producer.publish(order_created(id="evt-1", affiliate_id="ann", ...))
"""

from producer.event import (
    EVENT_TYPES,
    Event,
    FieldError,
    InvalidEvent,
    loads_event,
    order_created,
    order_updated,
    parse_event,
)
from producer.publish import Producer

__all__ = [
    "EVENT_TYPES",
    "Event",
    "FieldError",
    "InvalidEvent",
    "Producer",
    "loads_event",
    "order_created",
    "order_updated",
    "parse_event",
]
