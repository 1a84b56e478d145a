"""The gateway's two pure-ASGI middlewares, outermost first.

`RequestHeaders` gives every request an id (`x-request-id`, a valid one from the client is kept) and every response
`x-request-id` and `x-loragate-adapter`; an unexpected exception becomes a 500 envelope with the request id, never a
traceback. `SecurityMiddleware` runs what every route needs before routing (gateway.security says what runs where):
header limits, authentication, the admin requirement and audit, and the body limits of the routes other than the
completion routes, which read and check their body themselves, once.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_registry.audit import CURRENT_ACTOR
from gateway.deps import Live
from gateway.errors import Forbidden, GatewayError, LimitExceeded, Unavailable, error_envelope, send_error
from gateway.limits import LimitViolation, check_headers, check_json_depth
from gateway.security import ANONYMOUS, LOCAL, Principal, Security, audit_target, route_class

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


class RequestHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value
        request_id = given.decode("latin-1") if given and REQUEST_ID.match(given.decode("latin-1")) else None
        request_id = request_id or secrets.token_hex(16)  # uuid4().hex's form, at a fifth of its cost
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["adapter"] = "none"
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if not started and message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                headers["x-loragate-adapter"] = state["adapter"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("%s: unhandled error", request_id)
            if not started:
                envelope = error_envelope(
                    f"internal error (request {request_id})", "internal_error", None, "internal_error"
                )
                body = json.dumps(envelope).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send_with_headers({"type": "http.response.start", "status": 500, "headers": headers})
                await send_with_headers({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    """Checks before routing; the principal it authenticated is in `scope["state"]["principal"]`."""

    def __init__(self, app: ASGIApp, live: Live) -> None:
        self.app = app
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gateway = self.live.gateway
        if gateway is None:
            await send_error(send, Unavailable("the gateway is starting", retry_after_s=1, code="starting"))
            return
        security = gateway.security
        method: str = scope["method"]
        path: str = scope["path"]
        kind = route_class(method, path, security.settings)
        state = scope.setdefault("state", {})
        parsed: Any = None
        try:
            violation = check_headers(scope["headers"], security.settings.limits)
            if violation:
                raise LimitExceeded(violation)
            principal = await self._authenticate(security, scope, kind, method, path)
            if method in BODY_METHODS and path not in COMPLETION_PATHS:
                body, pending = await _checked_body(security, scope, receive)
                parsed = _json_or_none(body)
                receive = _replay(body, pending, receive)
        except GatewayError as error:
            if isinstance(error, Forbidden) and kind == "admin":
                who = state["principal"].who if isinstance(state.get("principal"), Principal) else "unknown"
                security.audit.record(who, f"admin.{method} {path}", None, "denied", error=error.message)
            if isinstance(error, LimitExceeded):
                security.limit_rejected(error)
            await send_error(send, error)
            return
        state["principal"] = principal
        if kind == "admin":
            await self._audited(security, scope, receive, send, principal, parsed)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    async def _authenticate(security: Security, scope: Scope, kind: str, method: str, path: str) -> Principal:
        if kind == "open" or (kind == "metrics" and security.settings.metrics_auth == "none"):
            return ANONYMOUS if security.keyed() else LOCAL
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
        principal = await security.authenticate(authorization)
        scope["state"]["principal"] = principal
        if kind == "admin" or (kind == "metrics" and security.settings.metrics_auth == "admin"):
            security.require_admin(principal, f"{method} {path}")
        return principal

    async def _audited(
        self, security: Security, scope: Scope, receive: Receive, send: Send, principal: Principal, body: Any
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


class _TooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> tuple[bytes, list[Message]]:
    """The whole request body, refused past `limit` bytes; messages other than the body that arrived meanwhile."""
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):  # the usual case: one message
        body: bytes = message.get("body", b"")
        if len(body) > limit:
            raise _TooLarge
        return body, []
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] != "http.request":
            return b"".join(chunks), [message]
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), []
        message = await receive()


async def read_limited_body(scope: Scope, receive: Receive, limit: int) -> tuple[bytes, list[Message]]:
    """`read_body` with the declared content-length checked first; LimitExceeded past `limit`."""
    too_large = LimitExceeded(LimitViolation("max_body_bytes", limit, None))
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise too_large
    try:
        return await read_body(receive, limit)
    except _TooLarge:
        raise too_large from None


async def _checked_body(security: Security, scope: Scope, receive: Receive) -> tuple[bytes, list[Message]]:
    limits = security.settings.limits
    body, pending = await read_limited_body(scope, receive, limits.max_body_bytes)
    violation = check_json_depth(body, limits)
    if violation:
        raise LimitExceeded(violation)
    return body, pending


def _json_or_none(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _replay(body: bytes, pending: list[Message], receive: Receive) -> Receive:
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}, *pending]

    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    return replay
