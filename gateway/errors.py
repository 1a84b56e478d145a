"""The gateway's exception tree and its mapping to OpenAI's error envelope.

    GatewayError                      500 internal_error
    ├── InvalidRequest                400 invalid_request_error (param names the field)
    ├── ModelNotFound                 404 model_not_found
    ├── AdapterRefused                400 adapter_refused: the registry version cannot be served as a LoRA here
    │                                     (merge-only, rank above the engine's max_lora_rank, other base)
    ├── AdapterLoadFailed             502 adapter_load_failed: the engine refused the load
    ├── Unavailable                   503 engines not ready / all busy / no adapter slot; carries Retry-After
    └── UpstreamError                 the engine's own status and envelope, passed through

Every handler is registered in `app.create_app`; a client never sees a traceback.
"""

from __future__ import annotations

import json
from typing import Any


class GatewayError(Exception):
    status = 500
    type = "internal_error"
    code = "internal_error"

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


class UpstreamError(GatewayError):
    """An engine answered an error: its status and (OpenAI-shaped) body go to the client unchanged."""

    type = "upstream_error"
    code = "upstream_error"

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"engine answered {status}")
        self.status = status
        self.body = body

    def envelope(self) -> dict[str, Any]:
        return upstream_envelope(self.status, self.body)


def error_envelope(message: str, type_: str, param: str | None, code: str | int | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def upstream_envelope(status: int, body: bytes) -> dict[str, Any]:
    """vLLM's error body when it is an OpenAI envelope, else a new envelope around its text."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) and "message" in parsed["error"]:
        return parsed
    text = body.decode(errors="replace").strip()[:500] or f"engine answered {status}"
    return error_envelope(text, "upstream_error", None, status)
