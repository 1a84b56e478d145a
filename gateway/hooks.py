"""Seams in the completion path for other gateway modules (structured outputs, ...).

A `CompletionHook` sees every chat/completions call twice: `prepare` may rewrite the outgoing body (after `model`
was replaced by the engine name) or raise a `GatewayError` to refuse it; `finish` gets the final answer (the
engine's JSON body, or for a stream the answer assembled from its chunks) and returns whether the output was
valid (None: not checked); for a stream, `finish` runs only if some hook's `wants_answer` said so after `prepare`
(assembling a stream's answer costs a JSON decode per chunk). `call.notes` carries a hook's state from `prepare`
to `finish`.
Hooks are listed in `app.state.hooks`; `create_app` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters_registry import AdapterManifest


@dataclass
class CallContext:
    route: str  # "chat" | "completions"
    model: str  # what the client asked for
    manifest: AdapterManifest | None  # None for the base model
    request_id: str
    stream: bool
    notes: dict[str, Any] = field(default_factory=dict)  # per-call state a hook keeps between prepare and finish


class CompletionHook(Protocol):
    def prepare(self, call: CallContext, body: dict[str, Any]) -> dict[str, Any]: ...

    def wants_answer(self, call: CallContext) -> bool: ...

    def finish(self, call: CallContext, body: dict[str, Any], answer: dict[str, Any]) -> bool | None: ...
