"""Authentication, access and the admin surface: the gateway's security layer.

`SecurityMiddleware` (pure ASGI, outermost) bounds headers, body size and JSON depth, checks generation limits on
the OpenAI routes, authenticates ``Authorization: Bearer <key>`` in keyed mode, requires an admin key on the admin
surface, and writes an audit line for every admin request. The routes call `Security` for what needs the resolved
model: `check_model` (a key sees only the adapters and bases it allows; others are 404, exactly like a model that
does not exist), `visible` (filtering /v1/models), `admit` (quotas, 429 with Retry-After) and `check_load_path`.

Modes: keyed when the registry's store holds at least one key (``security.auth = "auto"``) or when
``auth = "required"``; otherwise local mode, where every request is allowed and `bind_host` keeps the gateway on
loopback unless ``allow_open_bind`` is set. Once a key exists, a running gateway in ``auto`` mode turns keyed
within ``key_cache_ttl_s``; it never turns back while key records (even revoked ones) remain.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, Request
from pydantic import BaseModel, Field

from gateway.audit import CURRENT_ACTOR, AuditLog
from gateway.errors import GatewayError, ModelNotFound, Unavailable
from gateway.keys import AUTH_MESSAGES, ApiKey, AuthOutcome, KeyStore, ObjectStore, may_use, parse_bearer
from gateway.limits import (
    LimitSettings,
    LimitViolation,
    check_body_size,
    check_generation,
    check_headers,
    check_json_depth,
    prompt_length,
)
from gateway.quotas import Lease, Limits, QuotaExceeded, QuotaManager, QuotaSettings, Refusal

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
ADMIN_PREFIX = "/admin"
MODEL_PREFIX = "/v1/models/"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
TARGET_FIELDS = ("lora_name", "name", "ref", "adapter", "alias", "base")


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


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": "Bearer"}


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "admin_required"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal

    def headers(self) -> dict[str, str]:
        return {"retry-after": self.refusal.retry_after_header}


class LimitExceeded(GatewayError):
    type = "invalid_request_error"
    code = "limit_exceeded"

    def __init__(self, violation: LimitViolation) -> None:
        super().__init__(violation.message, param=violation.param)
        self.status = violation.status
        self.limit = violation.limit


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
        self._calls: dict[str, _Call] = {}
        self.base_name = base_name

    def track(self, request_id: str | None, call: _Call) -> None:
        if request_id is not None:
            self._calls[request_id] = call

    def untrack(self, request_id: str | None) -> None:
        if request_id is not None:
            self._calls.pop(request_id, None)

    def observed(self, request_id: str, prompt_tokens: int | None, completion_tokens: int | None) -> str | None:
        """The gateway finished a call: its exact token count pays the quota. Returns the caller's key id."""
        call = self._calls.get(request_id)
        if call is None:
            return None
        if prompt_tokens is not None or completion_tokens is not None:
            call.reported_tokens = (prompt_tokens or 0) + (completion_tokens or 0)
        return call.key_id

    def adapter_of(self, model: str) -> str | None:
        """The adapter name a requested model refers to (``acme@3``, ``acme:prod`` -> ``acme``); None for the base."""
        if model == self.base_name:
            return None
        return model.split("@", 1)[0].split(":", 1)[0]

    def card_visible(self, principal: Principal, card: Any) -> bool:
        """Whether a /v1/models entry may be shown to this principal."""
        if not isinstance(card, dict):
            return False
        model = str(card.get("id", ""))
        adapter = card.get("adapter")
        name = adapter if isinstance(adapter, str) else self.adapter_of(model)
        root = card.get("root")
        base = root if card.get("parent") is None and isinstance(root, str) else self.base_name
        return may_use(principal.key, adapter=name, base=base or model)

    def keyed(self) -> bool:
        if self.settings.auth == "off":
            return False
        if self.settings.auth == "required":
            return True
        if self.keys is None:
            return False
        now = self._clock()
        if self._keyed_at is not None and (
            self._keyed_at[1] or now - self._keyed_at[0] < self.settings.key_cache_ttl_s
        ):
            return self._keyed_at[1]
        keyed = self.keys.has_keys()
        self._keyed_at = (now, keyed)
        return keyed

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.keyed():
            return LOCAL
        if self.keys is None:
            self._auth_failed("unknown")
            raise Unauthorized(AUTH_MESSAGES[AuthOutcome.UNKNOWN])
        outcome, record = self.keys.authenticate(parse_bearer(authorization))
        if outcome is not AuthOutcome.OK or record is None:
            self._auth_failed(outcome.value)
            raise Unauthorized(AUTH_MESSAGES[outcome])
        return Principal(record)

    def require_admin(self, principal: Principal, action: str) -> None:
        if not principal.is_admin:
            self._auth_failed("forbidden")
            raise Forbidden(f"{action} needs an admin API key")

    def visible(self, principal: Principal, adapter: str | None, base: str) -> bool:
        return may_use(principal.key, adapter=adapter, base=base)

    def check_model(self, principal: Principal, model: str, adapter: str | None, base: str) -> None:
        """Raise the same 404 as for a missing model when the key may not use it."""
        if not may_use(principal.key, adapter=adapter, base=base):
            raise ModelNotFound(model)

    def admit(self, principal: Principal, adapter: str | None) -> Lease:
        key_limits = None
        key = principal.key
        if key is not None and (key.rpm or key.tpm or key.max_concurrency):
            # values were validated when the key was created
            key_limits = Limits.model_construct(rpm=key.rpm, tpm=key.tpm, max_concurrency=key.max_concurrency)
        scopes = self.quotas.scopes_for(principal.key_id, key_limits, adapter)
        try:
            return self.quotas.admit(scopes)
        except QuotaExceeded as exc:
            if self.metrics is not None:
                self.metrics.rate_limited(exc.refusal.scope, exc.refusal.limit)
            raise RateLimited(exc.refusal) from None

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

    def _auth_failed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.auth_failed(reason)


def build_security(
    settings: SecuritySettings,
    store: ObjectStore | None,
    metrics: SecurityMetrics | None = None,
    *,
    base_name: str = "",
) -> Security:
    keys = KeyStore(store, cache_ttl_s=settings.key_cache_ttl_s) if store is not None else None
    if settings.auth == "required" and keys is None:
        raise ValueError("security.auth=required needs a registry (API keys live in its store)")
    return Security(
        settings,
        keys,
        AuditLog(store=store, path=settings.audit_file),
        QuotaManager(settings.quotas),
        metrics,
        base_name=base_name,
    )


# --- FastAPI dependencies ------------------------------------------------------------------------------------------


def get_security(request: Request) -> Security:
    security: Security = request.app.state.security
    return security


def get_principal(request: Request) -> Principal:
    """The principal the middleware authenticated; authenticates here when the middleware is not installed."""
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):
        return principal
    principal = get_security(request).authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    return principal


def get_admin(request: Request) -> Principal:
    principal = get_principal(request)
    get_security(request).require_admin(principal, f"{request.method} {request.url.path}")
    return principal


SecurityDep = Annotated[Security, Depends(get_security)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]


# --- middleware ----------------------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, list[Message]]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), [message]
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), []


async def _send_error(send: Send, error: GatewayError) -> None:
    body = json.dumps(error.envelope()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


def _json_object(body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


@dataclass
class _Call:
    """One admitted completion: its quota lease and what the response said about tokens."""

    lease: Lease
    prompt_estimate: int
    key_id: str | None = None
    reported_tokens: int | None = None  # from the gateway's own accounting (`Security.observed`)
    usage_tokens: int | None = None
    chunks: int = 0
    tail: bytes = b""
    json_body: bytearray | None = None


class SecurityMiddleware:
    """Outermost security checks; reads `Security` from ``app.state.security`` (set in the lifespan) if not given."""

    def __init__(self, app: ASGIApp, security: Security | None = None) -> None:
        self.app = app
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        security = self.security or getattr(getattr(scope.get("app"), "state", None), "security", None)
        if not isinstance(security, Security):
            await _send_error(send, Unavailable("the gateway is starting", retry_after_s=1, code="starting"))
            return
        settings = security.settings
        method: str = scope["method"]
        path: str = scope["path"]
        call: _Call | None = None
        kind = route_class(method, path, settings)
        try:
            violation = check_headers(scope.get("headers", []), settings.limits)
            if violation:
                raise LimitExceeded(violation)
            principal = self._authenticate(security, scope, kind, method, path)
            body: bytes | None = None
            parsed: dict[str, Any] | None = None
            pending: list[Message] = []
            if method in BODY_METHODS:
                body, parsed, pending = await self._checked_body(security, scope, receive)
            if path in GENERATION_PATHS and parsed is not None and isinstance(parsed.get("model"), str):
                model = parsed["model"]
                adapter = security.adapter_of(model)
                security.check_model(principal, model, adapter, security.base_name)
                call = _Call(security.admit(principal, adapter), prompt_length(parsed) // 4 + 1, principal.key_id)
            if path == "/v1/load_lora_adapter" and parsed is not None and isinstance(parsed.get("lora_path"), str):
                security.check_load_path(parsed["lora_path"])
            if method == "GET" and path.startswith(MODEL_PREFIX) and principal.key is not None:
                model = path.removeprefix(MODEL_PREFIX)  # a model this key may not use is as missing as any other
                security.check_model(principal, model, security.adapter_of(model), security.base_name)
        except GatewayError as error:
            if isinstance(error, Forbidden) and kind == "admin":
                security.audit.record(
                    principal_who(scope), f"admin.{method} {path}", None, "denied", error=error.message
                )
            if isinstance(error, LimitExceeded) and security.metrics is not None:
                security.metrics.limit_rejected(error.limit)
            await _send_error(send, error)
            return
        scope.setdefault("state", {})["principal"] = principal
        if body is not None:
            receive = _replay(body, pending, receive)
        if call is not None:
            request_id = scope.get("state", {}).get("request_id")
            security.track(request_id, call)
            try:
                await self._metered(scope, receive, send, call)
            finally:
                security.untrack(request_id)
        elif kind == "admin":
            await self._audited(security, scope, receive, send, principal, parsed)
        elif method == "GET" and path == "/v1/models" and principal.key is not None:
            await self._filtered_models(security, scope, receive, send, principal)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    def _authenticate(security: Security, scope: Scope, kind: str, method: str, path: str) -> Principal:
        if kind == "open" or (kind == "metrics" and security.settings.metrics_auth == "none"):
            return ANONYMOUS if security.keyed() else LOCAL
        principal = security.authenticate(_header(scope, b"authorization"))
        scope.setdefault("state", {})["principal"] = principal
        if kind == "admin" or (kind == "metrics" and security.settings.metrics_auth == "admin"):
            security.require_admin(principal, f"{method} {path}")
        return principal

    @staticmethod
    async def _checked_body(
        security: Security, scope: Scope, receive: Receive
    ) -> tuple[bytes, dict[str, Any] | None, list[Message]]:
        """The whole body within the limits, and its JSON object if it is one (parsed once, after the depth check)."""
        limits = security.settings.limits
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit():
            violation = check_body_size(int(length), limits)
            if violation:
                raise LimitExceeded(violation)
        try:
            body, pending = await _read_body(receive, limits.max_body_bytes)
        except _TooLarge:
            raise LimitExceeded(LimitViolation("max_body_bytes", limits.max_body_bytes, None)) from None
        violation = check_json_depth(body, limits)
        if violation:
            raise LimitExceeded(violation)
        parsed = _json_object(body)
        if parsed is not None and scope["path"] in GENERATION_PATHS:
            violation = check_generation(parsed, limits)
            if violation:
                raise LimitExceeded(violation)
        return body, parsed, pending

    async def _metered(self, scope: Scope, receive: Receive, send: Send, call: _Call) -> None:
        """Forward an admitted completion; afterwards pay its tokens and free its concurrency slot."""
        if not call.lease.scopes:  # nothing to charge or free: no need to read the response on the side
            await self.app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if content_type.startswith(b"application/json"):
                    call.json_body = bytearray()
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if call.json_body is not None:
                    if len(call.json_body) < 4 * 1024 * 1024:
                        call.json_body += chunk
                else:
                    call.chunks += chunk.count(b"data: ")
                    found = usage_total(call.tail + chunk)
                    if found is not None:
                        call.usage_tokens = found
                    call.tail = chunk[-4096:]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if call.json_body is not None:
                call.usage_tokens = usage_total(bytes(call.json_body))
            tokens = call.reported_tokens if call.reported_tokens is not None else call.usage_tokens
            if tokens is None:
                tokens = call.prompt_estimate + call.chunks
            call.lease.charge(tokens)
            call.lease.release()

    async def _audited(
        self,
        security: Security,
        scope: Scope,
        receive: Receive,
        send: Send,
        principal: Principal,
        body: dict[str, Any] | None,
    ) -> None:
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        token = CURRENT_ACTOR.set(principal.who)
        try:
            await self.app(scope, receive, capture)
        finally:
            CURRENT_ACTOR.reset(token)
            method, path = scope["method"], scope["path"]
            if method in BODY_METHODS or method == "DELETE":
                result = "ok" if status < 400 else "denied" if status in (401, 403) else "error"
                security.audit.record(
                    principal.who, f"admin.{method} {path}", audit_target(body), result, details={"status": status}
                )

    async def _filtered_models(
        self, security: Security, scope: Scope, receive: Receive, send: Send, principal: Principal
    ) -> None:
        """Drop from the model list every model this key may not use (it must not learn their names)."""
        start: Message | None = None
        chunks: list[bytes] = []

        async def hold(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._send_filtered(security, principal, start, b"".join(chunks), send)
            else:
                await send(message)

        await self.app(scope, receive, hold)

    @staticmethod
    async def _send_filtered(
        security: Security, principal: Principal, start: Message | None, body: bytes, send: Send
    ) -> None:
        assert start is not None
        listing = _json_object(body)
        if start["status"] == 200 and listing is not None and isinstance(listing.get("data"), list):
            listing["data"] = [card for card in listing["data"] if security.card_visible(principal, card)]
            body = json.dumps(listing).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def usage_total(raw: bytes) -> int | None:
    """prompt + completion tokens of the last ``"usage"`` object in a JSON body or a piece of an SSE stream."""
    total = None
    candidates = raw.split(b"\n") if raw.lstrip().startswith(b"data:") or b"\ndata:" in raw else [raw]
    for line in candidates:
        if b'"usage"' not in line:
            continue
        text = line[5:] if line.startswith(b"data:") else line
        parsed = _json_object(text.strip())
        usage = parsed.get("usage") if parsed else None
        if isinstance(usage, dict):
            counts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
            total = sum(c for c in counts if isinstance(c, int))
    return total


def principal_who(scope: Scope) -> str:
    principal = scope.get("state", {}).get("principal")
    return principal.who if isinstance(principal, Principal) else "unknown"


ANONYMOUS = Principal(ApiKey(key_id="anonymous", name="anonymous", key_hash="", adapters=(), bases=()))


def _replay(body: bytes, pending: list[Message], receive: Receive) -> Receive:
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}, *pending]

    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    return replay
