"""The completion routes, `POST /v1/chat/completions`, `/v1/completions` and `/v1/responses`, as pure ASGI endpoints.

They are the request path, so they skip what a FastAPI route costs per request (the Request object, dependency
resolution, a Response object: about 55 us of the gateway's own CPU per request, measured with
benchmarks/bench_dataplane.py) and read the body once: limits, JSON, model, access, quota, then the proxy, which
writes the answer and tells the observers. `openapi_paths` documents them in /openapi.json like any other route.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Receive, Scope, Send

from gateway.call import Call
from gateway.deps import Live
from gateway.errors import AdapterRefused, GatewayError, LimitExceeded, Unavailable, send_error
from gateway.middleware import read_limited_body
from gateway.security import Principal, parse_completion

ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/tokenize": "tokenize",  # vLLM's own: by `model` too, so to an engine that holds the adapter
    "/detokenize": "detokenize",
}
GENERATING = frozenset({"chat", "completions", "responses"})


class CompletionRoute:
    def __init__(self, live: Live, path: str) -> None:
        self.live = live
        self.path = path
        self.route = ROUTES[path]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.live.gateway
        assert gateway is not None  # the security middleware answers 503 until it is there
        state = scope["state"]
        principal: Principal = state["principal"]
        call = Call(self.route, state["request_id"], key_id=principal.key_id)
        security = gateway.security
        try:  # a refusal here is a request too: the observers count it with its error code
            if gateway.draining:
                raise Unavailable("the gateway is shutting down", retry_after_s=1, code="draining")
            limits = security.settings.limits
            raw, _ = await read_limited_body(scope, receive, limits.max_body_bytes)
            call.body = parse_completion(raw, limits)
            call.stream = call.body.get("stream") is True
            model = call.body.get("model")
            call.model = model if isinstance(model, str) else None
            if call.model is not None:
                security.check_model(principal, call.model)
            target = await gateway.adapters.resolve(model, split_key(scope, principal, call.request_id))
            call.resolved(target.manifest, target.upstream_name)
            call.rollout = target.rollout
            call.keep_answer = gateway.shadows.wanted(call)
            state["adapter"] = target.label
            call.quota = security.admit(principal, target.model, call.body)
        except GatewayError as exc:
            if isinstance(exc, LimitExceeded):
                security.limit_rejected(exc)
            if isinstance(exc, AdapterRefused) and exc.adapter:  # counted under the adapter it refused
                call.adapter, call.version = exc.adapter, str(exc.version)
            call.fail(exc)
            gateway.proxy.finish(call)
            await send_error(send, exc)
            return
        await gateway.proxy.forward(call, self.path, receive, send)
        gateway.shadows.copy(call, self.path)  # after the caller's answer: a copy to the shadow version, if any


SPLIT_HEADER = b"x-loragate-split-key"


def split_key(scope: Scope, principal: Principal, request_id: str) -> str:
    """What picks the version while an alias rolls one out: the `x-loragate-split-key` header, else the API key,
    else the request (so one caller, or one conversation that sends its own key, sticks to one version)."""
    for name, value in scope["headers"]:
        if name == SPLIT_HEADER:
            return "header:" + bytes(value).decode("latin-1")
    if principal.key_id is not None:
        return "key:" + principal.key_id
    return "request:" + request_id


def openapi_paths() -> dict[str, Any]:
    """The completion routes in /openapi.json (request bodies pass through, so their schemas stay open)."""
    sampling: dict[str, Any] = {
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "n": {"type": "integer", "minimum": 1},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "stream": {"type": "boolean"},
        "seed": {"type": "integer"},
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": {"type": "string"},
        },
    }
    prompt = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    bodies: dict[str, tuple[str, list[str], dict[str, Any]]] = {
        "/v1/chat/completions": (
            "Chat completion",
            ["model", "messages"],
            {"messages": {"type": "array", "items": message}},
        ),
        "/v1/completions": ("Completion", ["model", "prompt"], {"prompt": prompt}),
        "/v1/responses": ("Response (Responses API)", ["model", "input"], {"input": {"type": "string"}}),
        "/tokenize": ("Tokenize (vLLM's)", ["model", "prompt"], {"prompt": {"type": "string"}}),
        "/detokenize": (
            "Detokenize (vLLM's)",
            ["model", "tokens"],
            {"tokens": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}}},
        ),
    }
    paths: dict[str, Any] = {}
    for path, (summary, required, fields) in bodies.items():
        schema = {"type": "object", "required": required, "properties": {**sampling, **fields}}
        paths[path] = {
            "post": {
                "summary": summary,
                "operationId": ROUTES[path],
                "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                "responses": {"200": {"description": "The engine's answer, or an SSE stream when `stream` is true"}},
            }
        }
    return paths
