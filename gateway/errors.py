"""The gateway's exception tree, its one renderer, and the mapping of registry errors to it.

    GatewayError                      500 internal_error
    ├── InvalidRequest                400 invalid_request_error (param names the field)
    │   ├── InvalidConstraint         400 the output constraint is malformed or cannot be enforced (structured.py)
    │   └── LimitExceeded             400/431 limit_exceeded: an input limit (body, headers, JSON depth, generation)
    ├── Unauthorized                  401 invalid_api_key, with WWW-Authenticate: Bearer
    ├── Forbidden                     403 admin_required / path_refused
    ├── ModelNotFound                 404 model_not_found
    ├── LoRANotFound                  404 NotFoundError: vLLM's runtime LoRA routes, as vLLM answers
    ├── MethodNotAllowed              405 method_not_allowed (a completion route asked with another method)
    ├── AdapterRefused                400 adapter_refused: the registry version cannot be served as a LoRA here
    │                                     (merge-only, rank above the engine's max_lora_rank, other base)
    ├── ParityRefused                 409 parity_gate_failed: a promote's candidate failed its golden prompts
    ├── RateLimited                   429 rate_limit_exceeded, with Retry-After
    ├── AdapterLoadFailed             502 adapter_load_failed: the engine refused the load
    ├── Unavailable                   503 engines not ready / all busy / no adapter slot / draining; Retry-After
    ├── UpstreamTimeout               504 upstream_timeout: the engine did not answer in time
    └── UpstreamError                 the engine's own status and envelope, passed through (`code` made a string)

`error_body` renders any of them as OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, whose
`code` is always a string or null (vLLM's integer codes are converted on the way through); `error_response` adds
the status and headers. The FastAPI handlers (`install_error_handlers`), the middleware and the completion routes
all render through it; a client never sees a traceback. `from_registry_error` is the one mapping of registry
errors to HTTP.

Outside the HTTP tree, before anything is served (`loragate serve` prints them as one line, exit status 2):

    StartupError                      the config file or a setting is wrong (cli.py)
    ├── BaseModelError                `base` names neither a directory nor a registry base (base_model.py)
    └── MetricsPortError              the /metrics port cannot be bound (metrics_server.py)
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from adapters_registry.errors import ConflictError, NotFoundError, RegistryError, ValidationError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gateway.limits import LimitViolation
    from gateway.quotas import QuotaRefusal

log = logging.getLogger(__name__)


class GatewayError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class LimitExceeded(InvalidRequest):
    code = "limit_exceeded"

    def __init__(self, violation: LimitViolation) -> None:
        super().__init__(violation.message, param=violation.param)
        self.status = violation.status
        self.limit = violation.limit


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


class LoRANotFound(GatewayError):
    """vLLM's answer on its runtime LoRA routes for an adapter (or its folder) that is not there."""

    status = 404
    type = "NotFoundError"
    code = "404"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def headers(self) -> dict[str, str]:
        return {"allow": "POST"}


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist", param="model")


class AdapterRefused(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "adapter_refused"

    def __init__(self, message: str, *, param: str | None = None, adapter: str | None = None, version: int = 0) -> None:
        super().__init__(message, param=param)
        self.adapter, self.version = adapter, version  # the version refused, for its metrics label


class ParityRefused(GatewayError):
    """A promote refused by the parity gate (gateway/parity.py); `figures` are what it measured."""

    status = 409
    type = "invalid_request_error"
    code = "parity_gate_failed"

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message, param="ref")
        self.figures = figures


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, refusal: QuotaRefusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal

    def headers(self) -> dict[str, str]:
        return {"retry-after": self.refusal.retry_after_header}


class AdapterLoadFailed(GatewayError):
    status = 502
    type = "upstream_error"
    code = "adapter_load_failed"


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "engines_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class UpstreamError(GatewayError):
    """An engine answered an error: its status and (OpenAI-shaped) body go to the client, `code` as a string."""

    type = "upstream_error"
    code = "upstream_error"

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"engine answered {status}")
        self.status = status
        self.body = body

    def envelope(self) -> dict[str, Any]:
        return upstream_envelope(self.status, self.body)


class StartupError(Exception):
    """The gateway cannot start for a reason the user can fix; `str()` is the one-line message."""


def error_envelope(message: str, type_: str, param: str | None, code: str | int | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": None if code is None else str(code)}}


def upstream_envelope(status: int, body: bytes) -> dict[str, Any]:
    """vLLM's error body when it is an OpenAI envelope (its integer `code` made a string), else a new envelope."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) and "message" in parsed["error"]:
        error = parsed["error"]
        code = error.get("code")
        return {**parsed, "error": {**error, "code": None if code is None else str(code)}}
    text = body.decode(errors="replace").strip()[:500] or f"engine answered {status}"
    return error_envelope(text, "upstream_error", None, str(status))


def error_body(exc: GatewayError) -> bytes:
    return json.dumps(exc.envelope()).encode()


def error_response(exc: GatewayError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, raw headers, body) of the error response for `exc`: what every part of the gateway sends."""
    body = error_body(exc)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode()) for name, value in exc.headers().items()]
    return exc.status, headers, body


async def send_error(send: Any, exc: GatewayError, *, engine: str | None = None) -> None:
    """Send `exc` as a whole ASGI response (for code that speaks ASGI directly); `engine`: the one that answered."""
    status, headers, body = error_response(exc)
    if engine:
        headers.append((b"x-loragate-engine", engine.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def from_registry_error(exc: RegistryError, subject: str, *, param: str | None = "model") -> GatewayError:
    """The HTTP error for a registry failure about `subject` (a model reference, an alias, a path)."""
    if isinstance(exc, NotFoundError):
        return ModelNotFound(subject)
    if isinstance(exc, ValidationError | ConflictError):  # a malformed or ambiguous reference is the caller's mistake
        return InvalidRequest(f"invalid {param or 'request'} '{subject}': {exc}", param=param)
    return Unavailable(f"registry unavailable: {exc}", code="registry_unavailable")


def install_error_handlers(app: FastAPI) -> None:
    """Every error of a FastAPI route rendered by `error_response`."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import Response

    def respond(exc: GatewayError) -> Response:
        status, headers, body = error_response(exc)
        response = Response(body, status_code=status)
        response.raw_headers = headers
        return response

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        if exc.status >= 500:
            log.warning("%s: %s %s", request.state.request_id, exc.status, exc.message)
        return respond(exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request body')}"
        return respond(InvalidRequest(message, param=".".join(loc) or None))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = GatewayError(str(exc.detail))
        error.status, error.type = exc.status_code, "invalid_request_error"
        error.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, str(exc.status_code))
        response = respond(error)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
