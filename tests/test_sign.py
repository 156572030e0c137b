"""Signatures as Standard Webhooks defines them, and as a receiver checks them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

import asyncpg
import pytest
import standardwebhooks
from aiohttp import web
from standardwebhooks.webhooks import WebhookVerificationError

from ops.cli.demo import serve
from producer import Producer
from tests.support.events import event_data, save_callback
from tests.support.receivers import Received, Receiver
from tests.support.service import Api
from tests.support.workers import drain
from worker import callbacks, sign
from worker.config import Settings

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.mark.unit
def test_the_standard_webhooks_test_vector() -> None:
    assert sign.signature(
        SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    ) == ("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")


@pytest.mark.unit
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


@pytest.mark.unit
def test_generated_secrets_are_whsec_keys_of_32_random_bytes() -> None:
    made = {sign.generate() for _ in range(20)}
    assert len(made) == 20
    for secret in made:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32


@pytest.mark.unit
@pytest.mark.parametrize("secret", ["whsec_", "whsec_not base64!", "whsec_====", "whsec_a"])
def test_a_whsec_secret_that_is_not_base64_is_refused_when_saved(secret: str) -> None:
    # Signed with its text as key, it would verify nowhere: receivers decode the base64.
    with pytest.raises(callbacks.CallbackError) as caught:
        callbacks.validate(
            "ann", "order.created", "POST", "https://t.example/pb", secret, allowed=()
        )
    assert caught.value.field == "secret"
    assert "base64" in caught.value.message


@pytest.mark.unit
def test_an_unpadded_whsec_secret_is_read_as_receivers_read_it() -> None:
    padded = "whsec_" + base64.b64encode(b"sixteen byte key").decode()
    assert padded.endswith("=")
    unpadded = padded.rstrip("=")
    assert sign.key(unpadded) == sign.key(padded) == b"sixteen byte key"
    assert standardwebhooks.Webhook(unpadded).sign(
        "msg_1", datetime.fromtimestamp(1614265330, UTC), "{}"
    ) == sign.signature(unpadded, "msg_1", 1614265330, b"{}")


async def test_a_delivery_verifies_with_the_standardwebhooks_package(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    """What an affiliate's receiver does: the standard's own library, the secret it was
    given, the raw body and the headers."""
    spec = callbacks.validate(
        "ann",
        "order.created",
        "POST",
        receiver.url + "/signed",
        callbacks.GENERATE,
        allowed=settings.allowed,
    )
    assert spec.generated
    assert spec.secret is not None
    await callbacks.save(db, spec)
    await producer.publish(
        event_data("verified", order={"number": "#7", "amount": "12.30", "commission": "1.23"})
    )
    await drain(settings)

    [request] = receiver.requests
    verifier = standardwebhooks.Webhook(spec.secret)
    payload = verifier.verify(request.body, request.headers)
    assert payload["order"] == {
        "number": "#7",
        "amount": "12.30",
        "commission": "1.23",
        "currency": "",
        "status": "",
    }
    # The same check refuses a body changed on the way, and another affiliate's secret.
    tampered = request.body.replace(b"12.30", b"99.30")
    with pytest.raises(WebhookVerificationError):
        verifier.verify(tampered, request.headers)
    with pytest.raises(WebhookVerificationError):
        standardwebhooks.Webhook(sign.generate()).verify(request.body, request.headers)


GET_TEMPLATES = [
    "/pb?order={{order.number}}&amount={{order.amount}}",
    # No path: the request line says /.
    "?order={{order.number}}&amount={{order.amount}}",
    # An encoded slash, which the request line keeps as it is.
    "/a%2Fb/{{order.number}}?amount={{order.amount}}",
]


@pytest.mark.parametrize("template", GET_TEMPLATES)
async def test_a_signed_get_verifies_with_the_standardwebhooks_package_on_its_target(
    db: asyncpg.Connection,
    producer: Producer,
    receiver: Receiver,
    settings: Settings,
    template: str,
) -> None:
    """What an affiliate's receiver does with a GET: the standard's own library, with the
    request target as it arrived (path and query) as the payload."""
    await save_callback(db, "ann", "order.created", "GET", receiver.url + template, SECRET)
    await producer.publish(
        event_data("get", order={"number": "#7", "amount": "12.30", "commission": "1.23"})
    )
    await drain(settings)

    [request] = receiver.requests
    assert "amount=12.30" in request.path_qs
    assert request.body == b""
    verifier = standardwebhooks.Webhook(SECRET)
    verifier.verify(request.path_qs, request.headers, json_parse=False)
    # One query parameter changed on the way, and the signature no longer holds.
    tampered = request.path_qs.replace("amount=12.30", "amount=99.30")
    with pytest.raises(WebhookVerificationError):
        verifier.verify(tampered, request.headers, json_parse=False)
    # Nor does it hold over an empty body, as it did when a GET signed nothing but its id.
    with pytest.raises(WebhookVerificationError):
        verifier.verify(b"", request.headers, json_parse=False)


async def test_a_redirected_get_carries_the_signature_of_the_first_target(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    arrived: list[Received] = []

    async def moved(request: web.Request) -> web.Response:
        arrived.append(Received(request.method, request.raw_path, dict(request.headers), b""))
        if request.path == "/old":
            return web.Response(status=302, headers={"Location": "/new?moved=1"})
        return web.Response(text="thanks")

    async with serve(moved) as url:
        await save_callback(
            db, "ann", "order.created", "GET", url + "/old?o={{order.number}}", SECRET
        )
        await producer.publish(event_data("moved"))
        await drain(settings)

    first, redirected = arrived
    assert (first.path_qs, redirected.path_qs) == ("/old?o=%231001", "/new?moved=1")
    verifier = standardwebhooks.Webhook(SECRET)
    # The redirected-to receiver gets the same signature, which covers the first target.
    assert redirected.headers["webhook-signature"] == first.headers["webhook-signature"]
    verifier.verify(first.path_qs, redirected.headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        verifier.verify(redirected.path_qs, redirected.headers, json_parse=False)


async def test_a_test_fire_of_a_signed_get_verifies_on_its_target(
    api: Api, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await save_callback(
        db, "ann", "order.created", "GET", receiver.url + "/pb?o={{order.number}}", SECRET
    )
    status, fired = await api.call("POST", "/v1/callbacks/ann/order.created/test")
    assert status == 200, fired
    [request] = receiver.requests
    assert request.path_qs == "/pb?o=TEST-1001"
    standardwebhooks.Webhook(SECRET).verify(request.path_qs, request.headers, json_parse=False)


async def test_the_api_answers_a_generated_secret_once_and_never_lists_it(
    api: Api, db: asyncpg.Connection
) -> None:
    status, saved = await api.call(
        "PUT",
        "/v1/callbacks/ann/order.created",
        json={"url": "https://t.example/pb", "method": "POST", "secret": "generate"},
    )
    assert status == 200, saved
    secret = saved["secret"]
    assert secret.startswith("whsec_")
    assert await db.fetchval("SELECT secret FROM callbacks") == secret
    status, listed = await api.call("GET", "/v1/callbacks")
    assert status == 200
    assert secret not in json.dumps(listed)
    assert listed["items"][0]["has_secret"] is True
    # Re-pointing the URL keeps the secret and does not show it again.
    status, again = await api.call(
        "PUT", "/v1/callbacks/ann/order.created", json={"url": "https://t.example/v2"}
    )
    assert status == 200
    assert "secret" not in again
    assert await db.fetchval("SELECT secret FROM callbacks") == secret
