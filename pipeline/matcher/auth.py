"""API keys scoped by role and event.

FACEMATCH_API_KEYS="k1:ingest:evt1,evt2;k2:match:*;k3:admin:*". Roles: ingest
(publish and delete photos), match (match and analyze selfies), admin (all).
An empty setting disables auth, for local development only (logged loudly).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

ROLES = {"ingest", "match", "admin"}


@dataclass(frozen=True)
class ApiKey:
    """One key's grants."""

    key: str
    role: str
    events: frozenset[str]  # {"*"} means every event

    def allows(self, role: str, event_id: str | None) -> bool:
        """True if this key may act as `role` on `event_id`."""
        if self.role not in (role, "admin"):
            return False
        return event_id is None or "*" in self.events or event_id in self.events


class AuthError(Exception):
    """401 (no/unknown key) or 403 (key lacks the role or the event)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_api_keys(text: str) -> list[ApiKey]:
    """Parse the FACEMATCH_API_KEYS format; raises ValueError naming the bad entry."""
    keys = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        parts = entry.split(":")
        if len(parts) != 3 or parts[1] not in ROLES or not parts[0]:
            raise ValueError(f"bad API key entry {entry.split(':')[0][:4]}...: want key:role:events "
                             f"with role in {sorted(ROLES)}")
        events = frozenset(e.strip() for e in parts[2].split(",") if e.strip())
        keys.append(ApiKey(parts[0], parts[1], events or frozenset({"*"})))
    return keys


class Authorizer:
    """Checks a presented key against the configured ones."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        """False when no keys are configured (development mode)."""
        return bool(self.keys)

    def check(self, presented: str | None, role: str, event_id: str | None) -> None:
        """Raise AuthError unless the key grants `role` on `event_id`."""
        if not self.enabled:
            return
        if not presented:
            raise AuthError(401, "missing API key: send it as X-API-Key or Authorization: Bearer")
        key = next((k for k in self.keys if hmac.compare_digest(k.key, presented)), None)
        if key is None:
            raise AuthError(401, "unknown API key")
        if not key.allows(role, event_id):
            raise AuthError(403, f"this API key may not {role} on event {event_id!r}")
