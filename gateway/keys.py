"""API keys: records kept in the registry's object store, and the pure decisions made with them.

A key looks like ``lg-<key id>-<secret>``. The store holds ``keys/<key id>.json`` with the SHA-256 of the whole key,
never the key itself, so every gateway replica that reads the same registry sees the same keys. Presented keys are
compared in constant time. Lookups are cached for ``cache_ttl_s`` seconds per replica: a revocation takes effect
everywhere within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import Enum
from fnmatch import fnmatchcase
from typing import Any

from adapters_registry.store import ObjectStore

KEY_PREFIX = "keys/"
_KEY_RE = re.compile(r"^lg-([0-9a-f]{12})-([A-Za-z0-9_-]{32,64})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class KeyStoreError(Exception):
    """A key operation the caller asked for cannot be done (unknown key, duplicate name, bad value)."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    key_hash: str
    adapters: tuple[str, ...] = ("*",)
    bases: tuple[str, ...] = ("*",)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    expires_at: datetime | None = None
    revoked: bool = False
    admin: bool = False
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> bytes:
        data = asdict(self)
        data["adapters"] = list(self.adapters)
        data["bases"] = list(self.bases)
        data["expires_at"] = self.expires_at.isoformat() if self.expires_at else None
        data["created_at"] = self.created_at.isoformat()
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ApiKey:
        data: dict[str, Any] = json.loads(raw)
        expires = data.get("expires_at")
        return cls(
            key_id=str(data["key_id"]),
            name=str(data["name"]),
            key_hash=str(data["key_hash"]),
            adapters=tuple(data.get("adapters", ["*"])),
            bases=tuple(data.get("bases", ["*"])),
            rpm=data.get("rpm"),
            tpm=data.get("tpm"),
            max_concurrency=data.get("max_concurrency"),
            expires_at=datetime.fromisoformat(expires) if expires else None,
            revoked=bool(data.get("revoked", False)),
            admin=bool(data.get("admin", False)),
            created_at=datetime.fromisoformat(data["created_at"]),
        )

    def public(self) -> dict[str, Any]:
        """Everything but the hash: what `keys list` and the audit log show."""
        data: dict[str, Any] = json.loads(self.to_json())
        del data["key_hash"]
        return data


# --- pure decisions ------------------------------------------------------------------------------------------------


class AuthOutcome(Enum):
    OK = "ok"
    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"


AUTH_MESSAGES = {
    AuthOutcome.MISSING: "Missing API key: send 'Authorization: Bearer <key>'.",
    AuthOutcome.MALFORMED: "Invalid API key.",
    AuthOutcome.UNKNOWN: "Invalid API key.",
    AuthOutcome.REVOKED: "This API key has been revoked.",
    AuthOutcome.EXPIRED: "This API key has expired.",
}


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_id_of(presented: str) -> str | None:
    """The key id embedded in a well-formed key, or None."""
    match = _KEY_RE.match(presented)
    return match.group(1) if match else None


def parse_bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or another scheme."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_key(presented: str | None, record: ApiKey | None, now: datetime) -> AuthOutcome:
    """Decide whether a presented key authenticates against the record stored under its key id."""
    if presented is None:
        return AuthOutcome.MISSING
    if key_id_of(presented) is None:
        return AuthOutcome.MALFORMED
    # Hash even when there is no record, so unknown and wrong keys take the same path.
    digest = hash_key(presented)
    if record is None or not hmac.compare_digest(digest, record.key_hash):
        return AuthOutcome.UNKNOWN
    if record.revoked:
        return AuthOutcome.REVOKED
    if record.expires_at is not None and now >= record.expires_at:
        return AuthOutcome.EXPIRED
    return AuthOutcome.OK


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def may_use(key: ApiKey | None, *, adapter: str | None, base: str) -> bool:
    """Whether a key may see and call a model: a base (adapter None) or an adapter by registry name on a base.

    ``key`` None is local mode (no keys configured): everything is allowed. An adapter needs both its name and
    its base allowed.
    """
    if key is None:
        return True
    if not matches_any(base, key.bases):
        return False
    return adapter is None or matches_any(adapter, key.adapters)


def parse_patterns(value: str) -> tuple[str, ...]:
    """``'acme*, support-bot'`` -> ``('acme*', 'support-bot')``; an empty string allows nothing."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def parse_expiry(value: str, now: datetime) -> datetime:
    """An ISO date (valid through the end of that UTC day) or an ISO datetime (naive = UTC) in the future."""
    try:
        if len(value) == 10:
            moment = datetime.fromisoformat(value).replace(tzinfo=UTC) + timedelta(days=1)
        else:
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise KeyStoreError(f"--expires {value!r}: expected an ISO date (2027-01-31) or datetime") from None
    if moment <= now:
        raise KeyStoreError(f"--expires {value!r}: that moment has already passed")
    return moment


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise KeyStoreError(f"key name {name!r}: use 1-64 letters, digits, '.', '_', '-', '@'")
    return name


def validate_limit(flag: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise KeyStoreError(f"{flag} {value}: must be at least 1")
    return value


# --- the store -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatedKey:
    record: ApiKey
    secret: str


class KeyStore:
    """API key records in an object store, with a short per-replica lookup cache."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        cache_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._lock = threading.Lock()

    def create(
        self,
        name: str,
        *,
        adapters: tuple[str, ...] = ("*",),
        bases: tuple[str, ...] = ("*",),
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrency: int | None = None,
        expires_at: datetime | None = None,
        admin: bool = False,
    ) -> CreatedKey:
        validate_name(name)
        validate_limit("--rpm", rpm)
        validate_limit("--tpm", tpm)
        validate_limit("--max-concurrency", max_concurrency)
        if any(k.name == name and not k.revoked for k in self.list()):
            raise KeyStoreError(f"an active key named {name!r} exists; revoke it first or pick another name")
        for _ in range(5):
            key_id = secrets.token_hex(6)
            secret = f"lg-{key_id}-{secrets.token_urlsafe(32)}"
            record = ApiKey(
                key_id=key_id,
                name=name,
                key_hash=hash_key(secret),
                adapters=adapters,
                bases=bases,
                rpm=rpm,
                tpm=tpm,
                max_concurrency=max_concurrency,
                expires_at=expires_at,
                admin=admin,
            )
            if self._store.put_bytes(self._path(key_id), record.to_json(), if_absent=True):
                return CreatedKey(record, secret)
        raise KeyStoreError("could not allocate a unique key id")  # pragma: no cover - 48 random bits, 5 tries

    def list(self) -> list[ApiKey]:
        records = []
        for path in self._store.list_keys(KEY_PREFIX):
            raw = self._store.get_bytes(path)
            if raw is not None and path.endswith(".json"):
                records.append(ApiKey.from_json(raw))
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    def find(self, id_or_name: str) -> ApiKey:
        """One key by key id or by name (the active one, else the only one with that name)."""
        raw = self._store.get_bytes(self._path(id_or_name)) if re.fullmatch(r"[0-9a-f]{12}", id_or_name) else None
        if raw is not None:
            return ApiKey.from_json(raw)
        named = [k for k in self.list() if k.name == id_or_name]
        active = [k for k in named if not k.revoked]
        if len(active) == 1:
            return active[0]
        if len(named) == 1:
            return named[0]
        if not named:
            raise KeyStoreError(f"no key with id or name {id_or_name!r}")
        raise KeyStoreError(f"{len(named)} revoked keys are named {id_or_name!r}; give the key id")

    def revoke(self, id_or_name: str) -> ApiKey:
        record = replace(self.find(id_or_name), revoked=True)
        self._store.put_bytes(self._path(record.key_id), record.to_json())
        with self._lock:
            self._cache.pop(record.key_id, None)
        return record

    def cached(self, key_id: str) -> tuple[ApiKey | None] | None:
        """The cached record for a key id while it is fresh (a 1-tuple: the record may be None, a cached miss)."""
        with self._lock:
            hit = self._cache.get(key_id)
        if hit is not None and self._clock() - hit[0] < self._ttl:
            return (hit[1],)
        return None

    def lookup(self, key_id: str) -> ApiKey | None:
        """The record for a key id, read through the cache (misses are cached too). While the store cannot be read,
        the last record read stands in; with none, the store's error is raised."""
        if (fresh := self.cached(key_id)) is not None:
            return fresh[0]
        now = self._clock()
        try:
            raw = self._store.get_bytes(self._path(key_id))
        except Exception:
            with self._lock:
                stale = self._cache.get(key_id)
            if stale is None:
                raise
            return stale[1]
        record = ApiKey.from_json(raw) if raw is not None else None
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key_id] = (now, record)
        return record

    def authenticate(self, presented: str | None, now: datetime | None = None) -> tuple[AuthOutcome, ApiKey | None]:
        key_id = key_id_of(presented) if presented else None
        record = self.lookup(key_id) if key_id else None
        return self.judge(presented, record, now)

    @staticmethod
    def judge(
        presented: str | None, record: ApiKey | None, now: datetime | None = None
    ) -> tuple[AuthOutcome, ApiKey | None]:
        outcome = check_key(presented, record, now or datetime.now(UTC))
        return outcome, record if outcome is AuthOutcome.OK else None

    def has_keys(self) -> bool:
        return bool(self._store.list_keys(KEY_PREFIX))

    @staticmethod
    def _path(key_id: str) -> str:
        return f"{KEY_PREFIX}{key_id}.json"
