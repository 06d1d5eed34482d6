"""Guest tokens: signed, scoped to one guest of one event, with an expiry.

The platform enrols a guest with its API key and hands the returned token to
the guest's app, which can then manage only that guest: its selfies, its match,
its notifications, "forget me". `<payload>.<signature>`, both base64url; the
payload is JSON {"e": event_id, "g": guest_id, "x": expiry epoch seconds}, the
signature HMAC-SHA256 of the payload under FACEMATCH_GUEST_TOKEN_SECRET. Every
bridge process must share the secret (a token is checked wherever it lands).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

TOKEN_PREFIX = "fmg1."  # noqa: S105  # not a secret: tells a guest token from an API key at a glance


@dataclass(frozen=True)
class GuestGrant:
    """What a valid token allows: one guest of one event."""

    event_id: str
    guest_id: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GuestTokens:
    """Issues and checks guest tokens with one secret."""

    def __init__(self, secret: bytes, ttl_s: int) -> None:
        if len(secret) < 16:
            raise ValueError("FACEMATCH_GUEST_TOKEN_SECRET must be at least 16 bytes")
        self._secret, self.ttl_s = secret, ttl_s

    def issue(self, event_id: str, guest_id: str, now_s: float | None = None) -> str:
        """A token for this guest, valid for ttl_s."""
        expiry = int((time.time() if now_s is None else now_s) + self.ttl_s)
        payload = _b64(json.dumps({"e": event_id, "g": guest_id, "x": expiry}, separators=(",", ":")).encode())
        return f"{TOKEN_PREFIX}{payload}.{self._sign(payload)}"

    def check(self, token: str, now_s: float | None = None) -> GuestGrant | None:
        """The grant of a valid, unexpired token; None for anything else (never raises)."""
        if not token.isascii() or not token.startswith(TOKEN_PREFIX):  # real tokens are base64url
            return None
        payload, _, signature = token[len(TOKEN_PREFIX):].partition(".")
        if not hmac.compare_digest(self._sign(payload).encode(), signature.encode("utf-8", "replace")):
            return None
        try:
            claims = json.loads(_unb64(payload))
            event_id, guest_id, expiry = str(claims["e"]), str(claims["g"]), int(claims["x"])
        except (ValueError, KeyError, TypeError):
            return None
        if expiry < (time.time() if now_s is None else now_s):
            return None
        return GuestGrant(event_id, guest_id)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())
