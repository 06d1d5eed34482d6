"""API keys scoped by role and event."""

from __future__ import annotations

import pytest

from pipeline.matcher.auth import AuthError, Authorizer, parse_api_keys


def test_roles_and_events_are_enforced() -> None:
    auth = Authorizer(parse_api_keys("ing:ingest:E1,E2; mat:match:*; adm:admin:*"))
    auth.check("ing", "ingest", "E1")
    auth.check("mat", "match", "anything")
    auth.check("adm", "ingest", "E9")
    for key, role, event, status in [(None, "match", "E1", 401), ("nope", "match", "E1", 401),
                                     ("ing", "ingest", "E3", 403), ("ing", "match", "E1", 403),
                                     ("mat", "ingest", "E1", 403), ("mat", "admin", "E1", 403)]:
        with pytest.raises(AuthError) as info:
            auth.check(key, role, event)
        assert info.value.status == status


def test_empty_config_disables_auth_and_bad_entries_are_refused() -> None:
    Authorizer(parse_api_keys("")).check(None, "admin", "E")
    with pytest.raises(ValueError, match="key:role:events"):
        parse_api_keys("k:superuser:*")
