"""API keys: pure decisions (table-driven) and the key store on the registry's real local store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters_registry.local import LocalStore
from gateway.keys import (
    ApiKey,
    AuthOutcome,
    KeyStore,
    KeyStoreError,
    check_key,
    hash_key,
    key_id_of,
    may_use,
    parse_bearer,
    parse_expiry,
    parse_patterns,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SECRET = "lg-0123456789ab-" + "x" * 43


def record(**kw: object) -> ApiKey:
    fields: dict[str, object] = {"key_id": "0123456789ab", "name": "acme", "key_hash": hash_key(SECRET)}
    fields.update(kw)
    return ApiKey(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
    ],
)
def test_parse_bearer(header: str | None, token: str | None) -> None:
    assert parse_bearer(header) == token


@pytest.mark.parametrize(
    ("presented", "rec", "outcome"),
    [
        (None, record(), AuthOutcome.MISSING),
        ("sk-something", record(), AuthOutcome.MALFORMED),
        ("lg-0123456789ab-short", record(), AuthOutcome.MALFORMED),
        (SECRET, None, AuthOutcome.UNKNOWN),
        (SECRET[:-1] + "y", record(), AuthOutcome.UNKNOWN),
        (SECRET, record(revoked=True), AuthOutcome.REVOKED),
        (SECRET, record(expires_at=NOW), AuthOutcome.EXPIRED),
        (SECRET, record(expires_at=NOW - timedelta(seconds=1)), AuthOutcome.EXPIRED),
        (SECRET, record(expires_at=NOW + timedelta(seconds=1)), AuthOutcome.OK),
        (SECRET, record(), AuthOutcome.OK),
        # a wrong secret on a revoked key says "invalid", not "revoked": nothing is told without the secret
        (SECRET[:-1] + "y", record(revoked=True), AuthOutcome.UNKNOWN),
    ],
)
def test_check_key(presented: str | None, rec: ApiKey | None, outcome: AuthOutcome) -> None:
    assert check_key(presented, rec, NOW) is outcome


@pytest.mark.parametrize(
    ("adapters", "bases", "adapter", "base", "allowed"),
    [
        (("acme*",), ("*",), "acme-support", "tiny", True),
        (("acme*",), ("*",), "acme", "tiny", True),
        (("acme*",), ("*",), "globex", "tiny", False),
        (("acme*",), ("*",), "ACME", "tiny", False),
        (("acme*", "support-bot"), ("*",), "support-bot", "tiny", True),
        (("acme*",), ("*",), None, "tiny", True),
        (("acme*",), (), None, "tiny", False),
        (("acme*",), (), "acme-support", "tiny", False),
        (("*",), ("llama*",), "any", "tiny", False),
        (("*",), ("llama*",), "any", "llama-3", True),
        ((), ("*",), "acme", "tiny", False),
    ],
)
def test_may_use(
    adapters: tuple[str, ...], bases: tuple[str, ...], adapter: str | None, base: str, allowed: bool
) -> None:
    assert may_use(record(adapters=adapters, bases=bases), adapter=adapter, base=base) is allowed


def test_local_mode_may_use_everything() -> None:
    assert may_use(None, adapter="anything", base="any-base") is True


@pytest.mark.parametrize(
    ("value", "patterns"),
    [("acme*, support-bot", ("acme*", "support-bot")), ("*", ("*",)), ("", ()), (" , ", ())],
)
def test_parse_patterns(value: str, patterns: tuple[str, ...]) -> None:
    assert parse_patterns(value) == patterns


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-06-01", datetime(2026, 6, 2, tzinfo=UTC)),
        ("2026-07-01T08:30:00", datetime(2026, 7, 1, 8, 30, tzinfo=UTC)),
        ("2026-07-01T08:30:00+02:00", datetime(2026, 7, 1, 6, 30, tzinfo=UTC)),
    ],
)
def test_parse_expiry(value: str, expected: datetime) -> None:
    assert parse_expiry(value, NOW) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-05-31", "already passed"),
        ("2026-06-01T12:00:00", "already passed"),
        ("tomorrow", "expected an ISO date"),
    ],
)
def test_parse_expiry_refuses(value: str, message: str) -> None:
    with pytest.raises(KeyStoreError, match=message):
        parse_expiry(value, NOW)


def test_key_id_embedded() -> None:
    assert key_id_of(SECRET) == "0123456789ab"
    assert key_id_of("lg-XYZ-" + "x" * 43) is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_store_keeps_only_a_hash(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    keys = KeyStore(store, cache_ttl_s=0)
    created = keys.create("acme", adapters=("acme*",), rpm=60)
    raw = store.get_bytes(f"keys/{created.record.key_id}.json")
    assert raw is not None
    assert created.secret.encode() not in raw
    assert created.secret[len("lg-0123456789ab-") :].encode() not in raw
    assert ApiKey.from_json(raw) == created.record
    assert created.record.key_hash == hash_key(created.secret)
    assert "key_hash" not in created.record.public()
    assert keys.authenticate(created.secret) == (AuthOutcome.OK, created.record)


def test_store_create_list_find_revoke(tmp_path: Path) -> None:
    keys = KeyStore(LocalStore(tmp_path), cache_ttl_s=0)
    assert not keys.has_keys()
    first = keys.create("acme")
    second = keys.create("globex", admin=True)
    assert keys.has_keys()
    assert [k.key_id for k in keys.list()] == [first.record.key_id, second.record.key_id]
    with pytest.raises(KeyStoreError, match="an active key named 'acme' exists"):
        keys.create("acme")
    assert keys.find("globex") == second.record
    assert keys.find(first.record.key_id) == first.record
    revoked = keys.revoke("acme")
    assert revoked.revoked and revoked.key_id == first.record.key_id
    assert keys.authenticate(first.secret) == (AuthOutcome.REVOKED, None)
    replacement = keys.create("acme")
    assert keys.find("acme") == replacement.record  # the active one wins over the revoked one
    keys.revoke("acme")
    with pytest.raises(KeyStoreError, match="2 revoked keys are named 'acme'; give the key id"):
        keys.find("acme")
    with pytest.raises(KeyStoreError, match="no key with id or name 'nobody'"):
        keys.revoke("nobody")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"name": "has space"}, "key name 'has space'"),
        ({"name": "ok", "rpm": 0}, "--rpm 0: must be at least 1"),
        ({"name": "ok", "tpm": -5}, "--tpm -5: must be at least 1"),
        ({"name": "ok", "max_concurrency": 0}, "--max-concurrency 0: must be at least 1"),
    ],
)
def test_store_refuses_bad_values(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    keys = KeyStore(LocalStore(tmp_path), cache_ttl_s=0)
    name = str(kw.pop("name"))
    with pytest.raises(KeyStoreError, match=message):
        keys.create(name, **kw)  # type: ignore[arg-type]
    assert keys.list() == []


def test_lookup_cache_delays_revocation_by_ttl_across_replicas(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    clock = Clock()
    replica = KeyStore(store, cache_ttl_s=5.0, clock=clock)
    admin = KeyStore(store, cache_ttl_s=0)
    created = admin.create("acme")
    assert replica.authenticate(created.secret)[0] is AuthOutcome.OK
    admin.revoke(created.record.key_id)
    clock.now += 4.9
    assert replica.authenticate(created.secret)[0] is AuthOutcome.OK  # cached on this replica
    clock.now += 0.2
    assert replica.authenticate(created.secret)[0] is AuthOutcome.REVOKED
