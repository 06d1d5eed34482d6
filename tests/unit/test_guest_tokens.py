"""Guest tokens: one guest of one event, signed, expiring; anything else is refused without raising."""

from __future__ import annotations

import base64
import json

import pytest

from pipeline.matcher.guest_tokens import TOKEN_PREFIX, GuestGrant, GuestTokens

SECRET = b"0123456789abcdef-test-secret"
NOW = 1_700_000_000.0
TTL = 3600


@pytest.fixture
def tokens() -> GuestTokens:
    return GuestTokens(SECRET, ttl_s=TTL)


def parts(token: str) -> tuple[str, str]:
    payload, _, signature = token[len(TOKEN_PREFIX):].partition(".")
    return payload, signature


def encode(claims: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()


def test_round_trip_grants_that_guest_of_that_event(tokens: GuestTokens) -> None:
    token = tokens.issue("E1", "guest-7", now_s=NOW)
    assert token.startswith(TOKEN_PREFIX)
    assert tokens.check(token, now_s=NOW) == GuestGrant("E1", "guest-7")
    assert tokens.check(token, now_s=NOW + TTL) == GuestGrant("E1", "guest-7")  # valid up to its expiry
    assert tokens.check(token) is None  # NOW is long past: the real clock says expired


def test_names_with_odd_characters_round_trip(tokens: GuestTokens) -> None:
    token = tokens.issue("évènement/1", "guest.with.dots", now_s=NOW)
    assert tokens.check(token, now_s=NOW) == GuestGrant("évènement/1", "guest.with.dots")


def test_another_guest_or_event_is_not_granted(tokens: GuestTokens) -> None:
    grant = tokens.check(tokens.issue("E1", "anna", now_s=NOW), now_s=NOW)
    assert grant is not None
    assert (grant.event_id, grant.guest_id) != ("E1", "ben")
    assert (grant.event_id, grant.guest_id) != ("E2", "anna")
    assert tokens.issue("E1", "anna", now_s=NOW) != tokens.issue("E1", "ben", now_s=NOW)
    assert tokens.issue("E1", "anna", now_s=NOW) != tokens.issue("E2", "anna", now_s=NOW)


def test_expired_token_is_refused(tokens: GuestTokens) -> None:
    token = tokens.issue("E1", "anna", now_s=NOW)
    assert tokens.check(token, now_s=NOW + TTL + 1) is None
    assert tokens.check(token, now_s=NOW + 10 * TTL) is None


def test_a_rewritten_payload_is_refused(tokens: GuestTokens) -> None:
    payload, signature = parts(tokens.issue("E1", "anna", now_s=NOW))
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims == {"e": "E1", "g": "anna", "x": int(NOW) + TTL}
    for changed in ({**claims, "g": "ben"}, {**claims, "e": "E2"}, {**claims, "x": claims["x"] + 10 * TTL}):
        assert tokens.check(f"{TOKEN_PREFIX}{encode(changed)}.{signature}", now_s=NOW) is None


def test_a_tampered_signature_is_refused(tokens: GuestTokens) -> None:
    token = tokens.issue("E1", "anna", now_s=NOW)
    payload, signature = parts(token)
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert tokens.check(f"{TOKEN_PREFIX}{payload}.{flipped}", now_s=NOW) is None
    assert tokens.check(f"{TOKEN_PREFIX}{payload}.", now_s=NOW) is None
    assert tokens.check(f"{TOKEN_PREFIX}{payload}", now_s=NOW) is None
    assert tokens.check(token[:-1], now_s=NOW) is None


def test_a_token_from_another_secret_is_refused(tokens: GuestTokens) -> None:
    other = GuestTokens(b"another-secret-of-16+bytes", ttl_s=TTL)
    assert tokens.check(other.issue("E1", "anna", now_s=NOW), now_s=NOW) is None


def test_a_secret_shorter_than_16_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        GuestTokens(b"x" * 15, ttl_s=TTL)
    GuestTokens(b"x" * 16, ttl_s=TTL)  # 16 is enough


def _signed(tokens: GuestTokens, payload: str) -> str:
    return f"{TOKEN_PREFIX}{payload}.{tokens._sign(payload)}"  # noqa: SLF001  # a valid signature on bad claims


@pytest.mark.parametrize("garbage", [
    "", ".", TOKEN_PREFIX, f"{TOKEN_PREFIX}.", f"{TOKEN_PREFIX}...", "fmg1", "Bearer abc",
    "api-key-1234567890", f"{TOKEN_PREFIX}%%%.###", f"{TOKEN_PREFIX}\u00e9\u00e9.\u00e9", f"{TOKEN_PREFIX}a.b.c",
    "\x00" * 40,
])
def test_garbage_returns_none(tokens: GuestTokens, garbage: str) -> None:
    assert tokens.check(garbage, now_s=NOW) is None


def test_a_lone_surrogate_returns_none(tokens: GuestTokens) -> None:
    assert tokens.check(f"{TOKEN_PREFIX}\udcff.x", now_s=NOW) is None


@pytest.mark.parametrize("payload", [
    "not base64!", "%%%", "a", encode({"e": "E1", "g": "anna"}), encode({"e": "E1", "x": NOW + TTL}),
    encode({"e": "E1", "g": "anna", "x": "soon"}), encode({"e": "E1", "g": "anna", "x": None}),
    base64.urlsafe_b64encode(b"[1, 2, 3]").decode(), base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    base64.urlsafe_b64encode(b"null").decode(),
])
def test_signed_but_malformed_claims_return_none(tokens: GuestTokens, payload: str) -> None:
    assert tokens.check(_signed(tokens, payload), now_s=NOW) is None
