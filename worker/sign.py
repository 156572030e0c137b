"""Standard Webhooks signatures, so a receiver can prove a postback came from the store.

https://www.standardwebhooks.com: `webhook-signature: v1,<base64 HMAC-SHA256>` over
`<webhook-id>.<webhook-timestamp>.<body>`, keyed with the secret. A GET has no body: the
relay signs its request target (path and query as sent) in the body's place, so a receiver
verifies it with the standard's libraries by passing the target as the payload.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"  # noqa: S105 -- the format's marker, not a secret
HEADER_NAMES = ("webhook-id", "webhook-timestamp", "webhook-signature")
KEY_BYTES = 32
"""Size of a generated key: the standard asks for 24 to 64 random bytes."""


def generate() -> str:
    """A new random secret in the standard's `whsec_<base64 key>` form."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def key(secret: str) -> bytes:
    """The HMAC key: the bytes a `whsec_` secret encodes, else the secret's UTF-8 bytes.

    Raises ValueError for a `whsec_` secret that is not base64: the receiver's library
    would decode it to a different key, and every signature would fail to verify.
    """
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode()
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        # Unpadded is accepted, as the standard's libraries accept it.
        decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        decoded = b""
    if not decoded:
        raise ValueError(
            f"a secret starting with {SECRET_PREFIX!r} must be followed by base64 key bytes; "
            "use 'generate' to have one made"
        )
    return decoded


class Signer:
    """A secret ready to sign with: its key decoded and its HMAC keyed once, so that a
    worker sets a callback's secret up when it loads the callback, not for every request.

    Raises ValueError for a secret `key` refuses.
    """

    __slots__ = ("_keyed",)

    def __init__(self, secret: str) -> None:
        self._keyed = hmac.new(key(secret), digestmod=hashlib.sha256)

    def signature(self, message_id: str, timestamp: int, content: bytes) -> str:
        """`content`: the body, or a GET's request target (see the module's docstring)."""
        mac = self._keyed.copy()
        mac.update(f"{message_id}.{timestamp}.".encode() + content)
        return "v1," + base64.b64encode(mac.digest()).decode()

    def headers(self, message_id: str, timestamp: int, content: bytes) -> dict[str, str]:
        values = (message_id, str(timestamp), self.signature(message_id, timestamp, content))
        return dict(zip(HEADER_NAMES, values, strict=True))


def signature(secret: str, message_id: str, timestamp: int, content: bytes) -> str:
    """`content`: the body, or a GET's request target (see the module's docstring)."""
    return Signer(secret).signature(message_id, timestamp, content)
