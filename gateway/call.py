"""One record per OpenAI call: created by the completion route, filled in by the proxy, read by the observers.

Hooks (`gateway.hooks`), the proxy and the observers of a finished call (metrics, usage events, the quota's
settlement) all read and write the same `Call`, so nothing about a request is converted or parsed twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapters_registry import AdapterManifest

if TYPE_CHECKING:
    from adapters_registry.aliases import Resolution
    from gateway.errors import GatewayError
    from gateway.quotas import QuotaLease


@dataclass(eq=False)
class Call:
    route: str  # "chat" | "completions" | "responses"
    request_id: str
    stream: bool = False
    body: dict[str, Any] = field(default_factory=dict)  # the parsed request body
    model: str | None = None  # what the client asked for
    manifest: AdapterManifest | None = None  # the adapter version it resolved to (None: the base model)
    rollout: Resolution | None = None  # the alias's rollout or shadow it was resolved under (None: neither)
    keep_answer: bool = False  # keep the answer (`answer`) for a comparison after the call (shadow traffic)
    answer: dict[str, Any] | None = None  # the parsed answer, streamed or not, when `keep_answer`
    lora_name: str | None = None  # the name vLLM serves it under (the base's served name for the base)
    adapter: str | None = None  # the manifest's name and version, for labels and usage events
    version: str | None = None
    key_id: str | None = None
    quota: QuotaLease | None = None
    started: float = field(default_factory=time.monotonic)
    engine: str | None = None
    status: int = 200
    error_code: str | None = None
    ttft_s: float | None = None
    queue_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    events: int = 0  # SSE events relayed to the client (what a stream cut short had delivered)
    output_valid: bool | None = None
    unresolved: bool = False  # `model` named nothing servable here
    ended: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # per-call state a hook keeps between prepare and finish

    def resolved(self, manifest: AdapterManifest | None, lora_name: str) -> None:
        self.manifest, self.lora_name = manifest, lora_name
        if manifest is not None:
            self.adapter, self.version = manifest.name, str(manifest.version)

    @property
    def label(self) -> str:
        """What the response's `x-loragate-adapter` names: the version's ref, else the model asked for."""
        return self.manifest.ref if self.manifest else (self.lora_name or "none")

    @property
    def latency_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def fail(self, error: GatewayError) -> None:
        self.status = error.status
        self.error_code = None if error.code is None else str(error.code)
        self.unresolved = self.unresolved or (error.status == 404 and error.code == "model_not_found")


Observer = Callable[[Call], object]
