"""API keys scoped by role and event, stored as SHA-256 hashes.

FACEMATCH_API_KEYS="sha256:<hex>:ingest:evt1,evt2;sha256:<hex>:match:*". Roles:
ingest (publish and delete photos), match (match and analyze selfies), admin
(all). `facematch keys hash` prints the `sha256:<hex>` of a key. Plain-text
entries ("key:role:events", the old format) are still accepted and hashed at
start; main() logs a warning for them. An empty setting disables auth, for
local development only (logged loudly).

Keys are compared as bytes: a header arrives as latin-1 text (one character
per byte on the wire), so its bytes are recovered exactly; a configured key is
UTF-8. A key with any other bytes simply matches nothing (401, never 500).
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import re
import sys
from dataclasses import dataclass, field

ROLES = {"ingest", "match", "admin"}
HASH_PREFIX = "sha256"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str | bytes) -> str:
    """`sha256:<hex>` of a key (UTF-8), the form FACEMATCH_API_KEYS stores."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    return f"{HASH_PREFIX}:{hashlib.sha256(data).hexdigest()}"


@dataclass(frozen=True)
class ApiKey:
    """One key's grants; only the SHA-256 digest of the key is kept."""

    digest: bytes = field(repr=False)
    role: str
    events: frozenset[str]  # {"*"} means every event
    plain_text: bool = False  # configured in the old, unhashed form

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
    """Parse FACEMATCH_API_KEYS; raises ValueError naming the bad entry (never the key)."""
    keys = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        parts = entry.split(":")
        if len(parts) == 4 and parts[0] == HASH_PREFIX:
            hex_digest, role, events_text, plain = parts[1].lower(), parts[2], parts[3], False
            if not _HEX64.match(hex_digest):
                raise ValueError(f"bad API key entry {HASH_PREFIX}:{parts[1][:8]}...: want "
                                 f"{HASH_PREFIX}:<64 hex digits>:role:events (facematch keys hash)")
            digest = bytes.fromhex(hex_digest)
        elif len(parts) == 3 and parts[0]:
            digest, role, events_text, plain = hashlib.sha256(parts[0].encode()).digest(), parts[1], parts[2], True
        else:
            raise ValueError(f"bad API key entry {entry[:4]}...: want {HASH_PREFIX}:<hex>:role:events "
                             f"(or the old key:role:events) with role in {sorted(ROLES)}")
        if role not in ROLES:
            raise ValueError(f"bad API key entry {entry[:4]}...: role {role!r} is not one of {sorted(ROLES)}; "
                             f"want key:role:events")
        events = frozenset(e.strip() for e in events_text.split(",") if e.strip())
        keys.append(ApiKey(digest, role, events or frozenset({"*"}), plain_text=plain))
    return keys


def presented_bytes(presented: str) -> bytes:
    """The key's bytes: a header's latin-1 text maps back to its wire bytes; other text is UTF-8."""
    try:
        return presented.encode("latin-1")
    except UnicodeEncodeError:
        return presented.encode("utf-8", "surrogatepass")


class Authorizer:
    """Checks a presented key against the configured ones."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        """False when no keys are configured (development mode)."""
        return bool(self.keys)

    @property
    def plain_text_keys(self) -> int:
        """How many keys were configured unhashed (main() warns about them)."""
        return sum(1 for k in self.keys if k.plain_text)

    def check(self, presented: str | None, role: str, event_id: str | None) -> None:
        """Raise AuthError unless the key grants `role` on `event_id`."""
        if not self.enabled:
            return
        if not presented:
            raise AuthError(401, "missing API key: send it as X-API-Key or Authorization: Bearer")
        digest = hashlib.sha256(presented_bytes(presented)).digest()
        # Digests of equal length, compared in constant time, every key (no early exit).
        found = [k for k in self.keys if hmac.compare_digest(k.digest, digest)]
        if not found:
            raise AuthError(401, "unknown API key")
        if not any(k.allows(role, event_id) for k in found):
            raise AuthError(403, f"this API key may not {role} on event {event_id!r}")


def keys_main(argv: list[str] | None = None) -> int:
    """`facematch keys hash [KEY] [--role R --events E1,E2]`: print a FACEMATCH_API_KEYS entry."""
    parser = argparse.ArgumentParser(prog="facematch keys",
                                     description="Print the sha256:<hex> form of an API key for "
                                                 "FACEMATCH_API_KEYS. Without KEY it is read from stdin "
                                                 "(keeps it out of shell history and ps).")
    parser.add_argument("action", choices=["hash"])
    parser.add_argument("key", nargs="?", help="the key (default: read one line from stdin)")
    parser.add_argument("--role", choices=sorted(ROLES), help="print a whole entry: hash:role:events")
    parser.add_argument("--events", default="*", help="comma-separated event ids, or * (with --role)")
    args = parser.parse_args(argv)
    key = args.key
    if key is None:
        key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("no key given", file=sys.stderr)
        return 2
    if ";" in args.events or ":" in args.events:
        print("--events must not contain ':' or ';'", file=sys.stderr)
        return 2
    line = hash_key(key)
    print(f"{line}:{args.role}:{args.events}" if args.role else line)
    return 0
