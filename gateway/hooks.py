"""Seams in the completion path for other gateway modules (structured outputs, ...).

A `CompletionHook` sees every completion call twice: `prepare` may rewrite the outgoing body (after `model` was
replaced by the engine's name for it) or raise a `GatewayError` to refuse it; `finish` gets the final answer (the
engine's JSON body, or for a stream the answer assembled from its events) and returns a `Verdict`: whether the
output was valid (None: not checked) and whether the call should be sent once more (a non-streamed answer that
broke the adapter's contract). For a stream, `finish` runs only if some hook's `wants_answer` said so after
`prepare` (assembling a stream's answer costs a JSON decode per event). `call.notes` carries a hook's state from
`prepare` to `finish`. `create_app` builds the list.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from gateway.call import Call


class Verdict(NamedTuple):
    valid: bool | None = None
    retry: bool = False


class CompletionHook(Protocol):
    def prepare(self, call: Call, body: dict[str, Any]) -> dict[str, Any]: ...

    def wants_answer(self, call: Call) -> bool: ...

    def finish(self, call: Call, body: dict[str, Any], answer: dict[str, Any]) -> Verdict: ...
