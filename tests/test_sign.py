"""Signatures as Standard Webhooks defines them, and as a receiver checks them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import asyncpg

from producer import Producer
from tests.conftest import Receiver, drain, event_data, save_callback
from worker import sign
from worker.config import Settings

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_the_standard_webhooks_test_vector() -> None:
    assert sign.signature(
        SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    ) == ("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")


def test_a_secret_without_the_prefix_is_used_as_its_bytes() -> None:
    digest = hmac.new(b"plain secret", b"id.1.body", hashlib.sha256).digest()
    assert sign.signature("plain secret", "id", 1, b"body") == (
        "v1," + base64.b64encode(digest).decode()
    )


async def test_a_delivery_with_a_secret_is_signed_and_one_without_is_not(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "POST", receiver.url + "/signed", SECRET)
    await save_callback(db, "bob", "order.created", "GET", receiver.url + "/plain")
    await producer.publish(event_data("signed"))
    await producer.publish(event_data("plain", affiliate_id="bob"))
    await drain(settings)

    by_path = {request.path_qs: request for request in receiver.requests}
    signed, plain = by_path["/signed"], by_path["/plain"]
    # Checked the way a receiver checks it, from the headers and the raw body alone.
    message_id = signed.headers["webhook-id"]
    timestamp = int(signed.headers["webhook-timestamp"])
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    content = f"{message_id}.{timestamp}.".encode() + signed.body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    assert signed.headers["webhook-signature"] == f"v1,{expected}"
    assert message_id == signed.headers["Idempotency-Key"]
    assert abs(time.time() - timestamp) < 60
    assert json.loads(signed.body)["affiliate"] == {"id": "ann"}
    assert not {"webhook-id", "webhook-signature"} & {name.lower() for name in plain.headers}
