"""API keys scoped by role and event, stored hashed."""

from __future__ import annotations

import hashlib
import io

import pytest

from pipeline.matcher.auth import AuthError, Authorizer, hash_key, keys_main, parse_api_keys


def test_roles_and_events_are_enforced() -> None:
    auth = Authorizer(parse_api_keys(f"{hash_key('ing')}:ingest:E1,E2; {hash_key('mat')}:match:*; "
                                     f"{hash_key('adm')}:admin:*"))
    auth.check("ing", "ingest", "E1")
    auth.check("mat", "match", "anything")
    auth.check("adm", "ingest", "E9")
    for key, role, event, status in [(None, "match", "E1", 401), ("nope", "match", "E1", 401),
                                     ("ing", "ingest", "E3", 403), ("ing", "match", "E1", 403),
                                     ("mat", "ingest", "E1", 403), ("mat", "admin", "E1", 403)]:
        with pytest.raises(AuthError) as info:
            auth.check(key, role, event)
        assert info.value.status == status


def test_only_hashes_are_kept_and_plain_keys_still_work_but_are_counted() -> None:
    keys = parse_api_keys(f"{hash_key('new')}:match:*;old-key:ingest:E1")
    assert "old-key" not in repr(keys) and all(len(k.digest) == 32 for k in keys)
    auth = Authorizer(keys)
    assert auth.plain_text_keys == 1
    auth.check("old-key", "ingest", "E1")
    auth.check("new", "match", "E1")
    assert hash_key("new") == "sha256:" + hashlib.sha256(b"new").hexdigest()
    upper = hash_key("new").upper().replace("SHA256", "sha256")  # hex case does not matter
    Authorizer(parse_api_keys(f"{upper}:match:*")).check("new", "match", None)


@pytest.mark.parametrize("presented", ["clé", "ключ", "\x00\xff", "🙂" * 100, "x" * 100_000])
def test_non_ascii_and_garbage_keys_are_401_not_a_crash(presented: str) -> None:
    auth = Authorizer(parse_api_keys(f"{hash_key('k')}:admin:*;plain:admin:*"))
    with pytest.raises(AuthError) as info:
        auth.check(presented, "match", "E")
    assert info.value.status == 401


def test_non_ascii_keys_are_compared_as_the_utf8_bytes_on_the_wire() -> None:
    auth = Authorizer(parse_api_keys(f"{hash_key('clé')}:match:*"))
    auth.check("clé".encode().decode("latin-1"), "match", "E")  # how Starlette hands over header bytes
    with pytest.raises(AuthError):
        auth.check("clé".encode("latin-1").decode("latin-1"), "match", "E")  # other bytes, other key


def test_empty_config_disables_auth_and_bad_entries_are_refused() -> None:
    Authorizer(parse_api_keys("")).check(None, "admin", "E")
    with pytest.raises(ValueError, match="key:role:events"):
        parse_api_keys("k:superuser:*")
    with pytest.raises(ValueError, match="64 hex digits") as info:
        parse_api_keys("sha256:not-hex:match:*")
    assert "not-hex" not in str(info.value).split("...")[1]
    with pytest.raises(ValueError, match="role"):
        parse_api_keys(f"{hash_key('k')}:root:*")


def test_keys_hash_cli_prints_the_entry(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import main

    assert main(["keys", "hash", "s3cret"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("s3cret")
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert keys_main(["hash", "--role", "ingest", "--events", "E1,E2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{hash_key('s3cret')}:ingest:E1,E2"
    Authorizer(parse_api_keys(line)).check("s3cret", "ingest", "E2")
