"""Standard Webhooks signatures, so a receiver can prove a postback came from the store.

https://www.standardwebhooks.com: `webhook-signature: v1,<base64 HMAC-SHA256>` over
`<webhook-id>.<webhook-timestamp>.<body>`, keyed with the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"  # noqa: S105 -- the format's marker, not a secret
HEADER_NAMES = ("webhook-id", "webhook-timestamp", "webhook-signature")


def _key(secret: str) -> bytes:
    # `whsec_` secrets carry base64 key bytes; any other secret is used as its UTF-8 bytes.
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
        except binascii.Error:
            pass
    return secret.encode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    values = (message_id, str(timestamp), signature(secret, message_id, timestamp, body))
    return dict(zip(HEADER_NAMES, values, strict=True))
