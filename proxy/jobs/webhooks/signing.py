"""Standard Webhooks signatures (https://www.standardwebhooks.com/, "Signature scheme").

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``; the signature is
``v1,`` + base64(HMAC-SHA256(key, content)) where ``key`` is the secret's base64 part after
``whsec_``. The receiver checks it with the secret, and refuses a timestamp too far from its
clock (replays) and an id it already handled (at-least-once delivery sends some twice).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

PREFIX: Final = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret (settings validated its form)."""
    return base64.b64decode(secret.removeprefix(PREFIX), validate=True)


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of one attempt (the timestamp is the attempt's: each retry is signed
    anew, the id stays the message's)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
    }


def new_message_id() -> str:
    return "msg_" + secrets.token_urlsafe(18)


def generate_secret() -> str:
    """A fresh secret in the form the settings take (for docs and ``comfygate`` users)."""
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


__all__ = ["generate_secret", "headers", "new_message_id", "secret_key", "sign"]
