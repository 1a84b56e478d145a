"""Authentication, access, quotas and input limits: the gateway's security decisions and their runtime object.

Where each check runs:
- `gateway.middleware.SecurityMiddleware` (pure ASGI, every route): header limits, ``Authorization: Bearer <key>``
  in keyed mode, an admin key on the admin surface (and `/metrics` per ``metrics_auth``), an audit line for every
  admin request, and the body limits of the admin routes.
- The completion routes (`gateway.api.completions`) read the body once: size, JSON depth and generation limits
  (`read_completion`), then `check_model` (a key sees only the adapters and bases it allows; others are 404,
  exactly like a model that does not exist) and `admit` (quotas, 429 with Retry-After). The quota lease is paid
  from the call's token counts when the call ends (an observer of the finished call, `settle`).
- The model routes filter `/v1/models` with `visible_card`; the runtime load route checks `check_load_path`.

Modes: keyed when the registry's store holds at least one key (``security.auth = "auto"``) or when
``auth = "required"``; otherwise local mode, where every request is allowed and `bind_host` keeps the gateway on
loopback unless ``allow_open_bind`` is set. Once a key exists, a running gateway in ``auto`` mode turns keyed
within ``key_cache_ttl_s``; it never turns back while key records (even revoked ones) remain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from adapters_registry.audit import AuditLog
from adapters_registry.store import ObjectStore
from gateway.errors import (
    Forbidden,
    InvalidRequest,
    LimitExceeded,
    ModelNotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from gateway.keys import AUTH_MESSAGES, ApiKey, AuthOutcome, KeyStore, key_id_of, may_use, parse_bearer
from gateway.limits import (
    LimitSettings,
    check_body_size,
    check_generation,
    check_json_depth,
    prompt_length,
)
from gateway.quotas import Limits, QuotaExceeded, QuotaLease, QuotaManager, QuotaSettings

logger = logging.getLogger(__name__)

ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
ADMIN_PREFIX = "/admin"
TARGET_FIELDS = ("model", "lora_name", "name", "ref", "adapter", "alias", "base")


class SecurityMetrics(Protocol):
    """What the security layer counts (gateway.metrics.GatewayMetrics provides it)."""

    def rate_limited(self, scope: str, limit: str) -> None: ...

    def auth_failed(self, reason: str) -> None: ...

    def limit_rejected(self, limit: str) -> None: ...


class SecuritySettings(BaseModel):
    auth: Literal["auto", "required", "off"] = "auto"
    key_cache_ttl_s: float = Field(default=5.0, ge=0)
    allow_open_bind: bool = Field(default=False, description="local mode: bind a non-loopback host anyway")
    path_roots: list[Path] = Field(default_factory=list, description="keyed mode: adapters load by path only here")
    metrics_auth: Literal["none", "key", "admin"] = "admin"
    open_paths: list[str] = ["/healthz", "/readyz", "/health", "/openapi.json", "/docs", "/redoc"]
    audit_file: Path | None = None
    limits: LimitSettings = LimitSettings()
    quotas: QuotaSettings = QuotaSettings()


@dataclass(frozen=True)
class Principal:
    """Who makes a request: an API key, or ``key=None`` in local mode (allowed everything)."""

    key: ApiKey | None

    @property
    def who(self) -> str:
        return f"key:{self.key.key_id}:{self.key.name}" if self.key else "local"

    @property
    def key_id(self) -> str | None:
        return self.key.key_id if self.key else None

    @property
    def is_admin(self) -> bool:
        return self.key is None or self.key.admin


LOCAL = Principal(None)
ANONYMOUS = Principal(ApiKey(key_id="anonymous", name="anonymous", key_hash="", adapters=(), bases=()))


# --- pure decisions ------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_host(host: str, keyed: bool, allow_open_bind: bool) -> tuple[str, str | None]:
    """The host to bind and a warning to log: local mode stays on loopback unless told otherwise."""
    if keyed:
        return host, None
    if is_loopback(host):
        return host, "no API keys configured: local mode, requests are not authenticated (loopback only)"
    if allow_open_bind:
        return host, f"no API keys configured: serving WITHOUT authentication on {host} (allow_open_bind is set)"
    return "127.0.0.1", (
        f"no API keys configured: binding 127.0.0.1 instead of {host}; create a key (`loragate keys create`) "
        "or set security.allow_open_bind=true"
    )


def choose_bind(settings: SecuritySettings, store: ObjectStore | None, host: str) -> tuple[str, str | None]:
    """At startup: the host to bind (loopback in local mode unless told otherwise) and a warning to log."""
    if settings.auth == "required":
        return host, None
    keyed = settings.auth == "auto" and store is not None and KeyStore(store, cache_ttl_s=0).has_keys()
    return bind_host(host, keyed, settings.allow_open_bind)


def path_within_roots(raw: str, roots: list[Path]) -> Path | None:
    """The resolved path when ``raw`` names a place inside one of ``roots`` (no ``..``, symlinks followed)."""
    if not raw or "\x00" in raw:
        return None
    candidate = Path(raw)
    if ".." in candidate.parts or not candidate.is_absolute():
        return None
    try:
        resolved = candidate.resolve(strict=False)
        resolved_roots = [root.resolve(strict=False) for root in roots]
    except (OSError, RuntimeError):
        return None
    return resolved if any(resolved.is_relative_to(root) for root in resolved_roots) else None


def route_class(method: str, path: str, settings: SecuritySettings) -> Literal["open", "metrics", "admin", "user"]:
    if path in settings.open_paths:
        return "open"
    if path == "/metrics" or path.startswith("/metrics/"):
        return "metrics"
    if path in ADMIN_PATHS or path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return "admin"
    return "user"


def audit_target(body: Any) -> str | None:
    if isinstance(body, dict):
        for name in TARGET_FIELDS:
            value = body.get(name)
            if isinstance(value, str) and len(value) <= 200:
                return value
    return None


def parse_completion(raw: bytes, limits: LimitSettings) -> dict[str, Any]:
    """A completion request's body, checked against the input limits and parsed once (after the depth check)."""
    violation = check_body_size(len(raw), limits) or check_json_depth(raw, limits)
    if violation:
        raise LimitExceeded(violation)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    violation = check_generation(body, limits)
    if violation:
        raise LimitExceeded(violation)
    return body


# --- the runtime object --------------------------------------------------------------------------------------------


class Security:
    def __init__(
        self,
        settings: SecuritySettings,
        keys: KeyStore | None,
        audit: AuditLog,
        quotas: QuotaManager,
        metrics: SecurityMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        base_name: str = "",
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.audit = audit
        self.quotas = quotas
        self.metrics = metrics
        self._clock = clock
        self._keyed_at: tuple[float, bool] | None = None
        self._asking: asyncio.Future[None] | None = None
        self.base_name = base_name

    def adapter_of(self, model: str) -> str | None:
        """The adapter name a requested model refers to (``acme@3``, ``acme:prod`` -> ``acme``); None for the base."""
        if model == self.base_name:
            return None
        return model.split("@", 1)[0].split(":", 1)[0]

    def visible_card(self, principal: Principal, card: Any) -> bool:
        """Whether a /v1/models entry may be shown to this principal."""
        if principal.key is None:
            return True
        if not isinstance(card, dict):
            return False
        model = str(card.get("id", ""))
        adapter = card.get("adapter")
        name = adapter if isinstance(adapter, str) else self.adapter_of(model)
        root = card.get("root")
        base = root if card.get("parent") is None and isinstance(root, str) else self.base_name
        return may_use(principal.key, adapter=name, base=base or model)

    def keyed(self) -> bool:
        """Keyed or local mode, as last known (`refresh_keyed` keeps it current, off the event loop)."""
        if self.settings.auth != "auto":
            return self.settings.auth == "required"
        return self._keyed_at is not None and self._keyed_at[1]

    async def refresh_keyed(self) -> None:
        """In `auto` mode: whether the store holds keys, asked in a thread (never again once it said yes). The
        first request waits for the answer; after that a stale answer (older than `key_cache_ttl_s`) still serves
        while a fresh one is fetched behind it. While the store cannot be read, the last answer stands; with none
        yet, 503 `keys_unavailable`."""
        if self.settings.auth != "auto" or self.keys is None:
            return
        known = self._keyed_at
        if known is not None and (known[1] or self._clock() - known[0] < self.settings.key_cache_ttl_s):
            return
        if known is None:
            await self._ask_keyed()
        elif self._asking is None:
            self._asking = asyncio.ensure_future(self._ask_keyed())
            self._asking.add_done_callback(self._asked)

    def _asked(self, task: asyncio.Future[None]) -> None:
        self._asking = None
        if not task.cancelled():
            task.exception()  # retrieved: _ask_keyed keeps the last answer itself

    async def _ask_keyed(self) -> None:
        known = self._keyed_at
        try:
            keyed = await asyncio.to_thread(self.keys.has_keys)  # type: ignore[union-attr]
        except Exception as exc:
            if known is None:
                raise Unavailable(f"cannot read the API keys' store: {exc}", code="keys_unavailable") from exc
            mode = "keyed" if known[1] else "local"
            logger.warning("cannot read the API keys' store (%s); staying in %s mode", exc, mode)
            self._keyed_at = (self._clock(), known[1])
            return
        self._keyed_at = (self._clock(), keyed)

    async def authenticate(self, authorization: str | None) -> Principal:
        await self.refresh_keyed()
        if not self.keyed():
            return LOCAL
        if self.keys is None:
            self._auth_failed("unknown")
            raise Unauthorized(AUTH_MESSAGES[AuthOutcome.UNKNOWN])
        presented = parse_bearer(authorization)
        key_id = key_id_of(presented) if presented else None
        record = None
        if key_id is not None:
            fresh = self.keys.cached(key_id)  # the request path reads the store only on a cache miss, in a thread
            try:
                record = fresh[0] if fresh is not None else await asyncio.to_thread(self.keys.lookup, key_id)
            except Exception as exc:
                raise Unavailable(f"cannot read the API keys' store: {exc}", code="keys_unavailable") from exc
        outcome, record = self.keys.judge(presented, record)
        if outcome is not AuthOutcome.OK or record is None:
            self._auth_failed(outcome.value)
            raise Unauthorized(AUTH_MESSAGES[outcome])
        return Principal(record)

    def require_admin(self, principal: Principal, action: str) -> None:
        if not principal.is_admin:
            self._auth_failed("forbidden")
            raise Forbidden(f"{action} needs an admin API key")

    def check_model(self, principal: Principal, model: str) -> None:
        """Raise the same 404 as for a missing model when the key may not use it."""
        if principal.key is not None and not may_use(
            principal.key, adapter=self.adapter_of(model), base=self.base_name
        ):
            raise ModelNotFound(model)

    def admit(self, principal: Principal, model: str, body: dict[str, Any]) -> QuotaLease:
        """A quota lease for one call (it pays its tokens and frees its slot in `settle`), or 429."""
        key_limits = None
        key = principal.key
        if key is not None and (key.rpm or key.tpm or key.max_concurrency):
            # values were validated when the key was created
            key_limits = Limits.model_construct(rpm=key.rpm, tpm=key.tpm, max_concurrency=key.max_concurrency)
        scopes = self.quotas.scopes_for(principal.key_id, key_limits, self.adapter_of(model))
        try:
            lease = self.quotas.admit(scopes)
        except QuotaExceeded as exc:
            if self.metrics is not None:
                self.metrics.rate_limited(exc.refusal.scope, exc.refusal.limit)
            raise RateLimited(exc.refusal) from None
        lease.estimate = prompt_length(body) // 4 + 1 if scopes else 0
        return lease

    def check_load_path(self, raw: str) -> Path:
        """A filesystem path an adapter may be loaded from; in keyed mode only inside ``path_roots``."""
        if not self.keyed() and not self.settings.path_roots:
            return Path(raw)
        resolved = path_within_roots(raw, self.settings.path_roots)
        if resolved is None:
            raise Forbidden(
                "loading an adapter by path is allowed only inside the configured roots", code="path_refused"
            )
        return resolved

    def limit_rejected(self, error: LimitExceeded) -> None:
        if self.metrics is not None:
            self.metrics.limit_rejected(error.limit)

    def _auth_failed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.auth_failed(reason)


def settle(lease: QuotaLease | None, prompt_tokens: int | None, completion_tokens: int | None, events: int) -> None:
    """A call ended: pay its tokens (the engine's count, else an estimate) and free its concurrency slot."""
    if lease is None or not lease.scopes:
        return
    if prompt_tokens is not None or completion_tokens is not None:
        tokens = (prompt_tokens or 0) + (completion_tokens or 0)
    else:
        tokens = lease.estimate + events
    lease.charge(tokens)
    lease.release()


def build_security(
    settings: SecuritySettings,
    store: ObjectStore | None,
    metrics: SecurityMetrics | None = None,
    *,
    base_name: str = "",
    replicas: int = 1,
) -> Security:
    """`replicas`: processes that share the limits (gateway workers); each enforces its part, like replicas do."""
    keys = KeyStore(store, cache_ttl_s=settings.key_cache_ttl_s) if store is not None else None
    if settings.auth == "required" and keys is None:
        raise ValueError("security.auth=required needs a registry (API keys live in its store)")
    quotas = settings.quotas.model_copy(update={"replicas": settings.quotas.replicas * replicas})
    return Security(
        settings,
        keys,
        AuditLog(store=store, path=settings.audit_file),
        QuotaManager(quotas),
        metrics,
        base_name=base_name,
    )
