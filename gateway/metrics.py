"""Per-adapter Prometheus metrics of the gateway, on a registry object owned by the app (no global state).

Every label value is bounded (metric_labels.py says how). Residency, free adapter slots, waiting and in-flight
requests are read from the gateway's ledger at scrape time through sources registered with `add_state_collector`
(engine_collector.py).
"""

from __future__ import annotations

import logging
import threading
from contextlib import suppress
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.engine_collector import EngineStateCollector, StateSource
from gateway.metric_labels import (
    BASE_LABEL,
    MAX_REASON_LABELS,
    OTHER_LABEL,
    AdapterLabels,
    BoundedSlugs,
    FoldDecision,
    slug,
    status_class,
    time_per_output_token,
    validity_label,
)

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.dispatch import Dispatcher

logger = logging.getLogger(__name__)

DEFAULT_DECAY_EVERY = 10_000

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """All gateway metrics on one `CollectorRegistry`; built in `create_app` and kept on `app.state`."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        max_adapter_labels: int = 50,
        *,
        decay_every: int = DEFAULT_DECAY_EVERY,
    ) -> None:
        if max_adapter_labels < 0:
            raise ValueError(f"max_adapter_labels must be >= 0, got {max_adapter_labels}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.RLock()  # folding state and series creation change together
        self._labels = AdapterLabels(max_adapter_labels, max(decay_every, 1))
        self._error_codes = BoundedSlugs(MAX_REASON_LABELS)
        self._reasons = BoundedSlugs(MAX_REASON_LABELS)
        # series created per labelled adapter, so that a demoted adapter's series can be removed
        self._series: dict[str, set[tuple[Counter | Histogram, tuple[str, ...]]]] = {}
        r = self.registry
        av = ["adapter", "version"]
        self.requests = Counter(
            "loragate_requests", "Finished requests.", [*av, "route", "status_class", "error_code"], registry=r
        )
        self.prompt_tokens = Counter("loragate_prompt_tokens", "Prompt tokens (upstream usage).", av, registry=r)
        self.completion_tokens = Counter(
            "loragate_completion_tokens", "Completion tokens (upstream usage).", av, registry=r
        )
        self.request_duration = Histogram(
            "loragate_request_duration_seconds",
            "End-to-end request latency at the gateway.",
            [*av, "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "loragate_time_to_first_token_seconds",
            "Time from arrival to the first streamed content chunk.",
            av,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "loragate_time_per_output_token_seconds",
            "Decode time per output token after the first.",
            av,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "loragate_queue_wait_seconds",
            "Time from arrival until an engine took the request (adapter load included).",
            av,
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.structured = Counter(
            "loragate_structured_outputs", "Structured-output validity per request.", [*av, "result"], registry=r
        )
        self.load_duration = Histogram(
            "loragate_adapter_load_seconds",
            "Adapter load latency.",
            ["engine", "adapter"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.unload_duration = Histogram(
            "loragate_adapter_unload_seconds",
            "Adapter unload latency.",
            ["engine", "adapter"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.loads = Counter("loragate_adapter_loads", "Adapter loads.", ["engine", *av], registry=r)
        self.evictions = Counter(
            "loragate_adapter_evictions", "Adapters evicted to free a slot.", ["engine", *av], registry=r
        )
        self.load_failures = Counter(
            "loragate_adapter_load_failures", "Failed adapter loads.", ["engine", "adapter", "reason"], registry=r
        )
        self.engine_up_gauge = Gauge("loragate_engine_up", "1 when the engine answers /health.", ["engine"], registry=r)
        self.slots_wanted = Gauge(
            "loragate_adapter_slots_wanted",
            "GPU adapter slots (vLLM max_loras) the adapters with requests in flight or waiting here need: one per "
            "engine an adapter runs on, one per waiting adapter that runs nowhere.",
            registry=r,
        )
        self.waiting_requests = Gauge(
            "loragate_waiting_requests", "Requests waiting in the gateway for a GPU slot or a load.", registry=r
        )
        self.slot_handovers = Gauge(
            "loragate_adapter_slot_handovers",
            "GPU slots handed from a running adapter to one that waited past routing.slot_wait_s (since start).",
            registry=r,
        )
        self.engine_restarts = Counter(
            "loragate_engine_restarts", "Engine restarts by the supervisor.", ["engine", "reason"], registry=r
        )
        self.usage_dropped = Counter(
            "loragate_usage_events_dropped", "Usage events not delivered.", ["reason"], registry=r
        )
        self.usage_posts = Counter(
            "loragate_usage_webhook_posts", "Usage webhook POSTs by result.", ["result"], registry=r
        )
        self.rate_limited_requests = Counter(
            "loragate_rate_limited", "Requests refused by a rate limit.", ["scope", "limit"], registry=r
        )
        self.auth_failures = Counter("loragate_auth_failures", "Rejected credentials.", ["reason"], registry=r)
        self.limit_rejections = Counter(
            "loragate_limit_rejections", "Requests refused by an input limit.", ["limit"], registry=r
        )
        # Rollouts: labelled by alias reference (`name:alias`) and version numbers, as many as aliases are rolled out
        self.rollout_rollbacks = Counter(
            "loragate_rollout_rollbacks",
            "Rollouts this gateway stopped because the candidate broke the rollout's policy.",
            ["alias", "version", "reason"],
            registry=r,
        )
        self.parity_gates = Counter(
            "loragate_parity_gate_runs",
            "Parity gates run before a promote gave a version traffic, by outcome: passed, refused, forced, skipped.",
            ["alias", "version", "outcome"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "loragate_shadow_requests",
            "Shadow copies by outcome: agree, differ (greedy answers compared), unjudged, error, dropped.",
            ["alias", "current", "shadow", "outcome"],
            registry=r,
        )
        self.shadow_agreement = Gauge(
            "loragate_shadow_agreement_ratio",
            "Of the shadow copies compared, the share whose answer agreed with the caller's.",
            ["alias", "current", "shadow"],
            registry=r,
        )
        self.shadow_contract = Counter(
            "loragate_shadow_contract",
            "Shadow answers by contract validity.",
            ["alias", "shadow", "result"],
            registry=r,
        )
        self.shadow_latency = Histogram(
            "loragate_shadow_latency_seconds",
            "End-to-end latency of the shadow copies.",
            ["alias", "shadow"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._agreement: dict[tuple[str, str, str], list[int]] = {}  # (alias, current, shadow) -> [agreed, compared]
        self._state = EngineStateCollector(self.current_adapter_label)
        r.register(self._state)

    # -- request path ---------------------------------------------------------------------------------------------

    def observe_request(self, outcome: Call) -> None:
        with self._lock:
            self._observe_request(outcome)

    def _observe_request(self, outcome: Call) -> None:
        adapter, version = self._request_labels(outcome)
        code = self._error_codes(outcome.error_code)
        self._inc(self.requests, adapter, (adapter, version, outcome.route, status_class(outcome.status), code))
        if outcome.prompt_tokens:
            self._inc(self.prompt_tokens, adapter, (adapter, version), outcome.prompt_tokens)
        if outcome.completion_tokens:
            self._inc(self.completion_tokens, adapter, (adapter, version), outcome.completion_tokens)
        self._observe(self.request_duration, adapter, (adapter, version, outcome.route), outcome.latency_s)
        if outcome.ttft_s is not None:
            self._observe(self.ttft, adapter, (adapter, version), outcome.ttft_s)
        tpot = time_per_output_token(outcome.latency_s, outcome.ttft_s, outcome.completion_tokens)
        if tpot is not None:
            self._observe(self.tpot, adapter, (adapter, version), tpot)
        if outcome.queue_s is not None:
            self._observe(self.queue_wait, adapter, (adapter, version), outcome.queue_s)
        self._inc(self.structured, adapter, (adapter, version, validity_label(outcome.output_valid)))

    # -- adapter lifecycle ----------------------------------------------------------------------------------------

    def adapter_loaded(self, engine: str, adapter: str, version: str, seconds: float) -> None:
        with self._lock:
            label = self._lifecycle_label(adapter)
            self._inc(self.loads, label, (engine, label, self._version(label, version)))
            self._observe(self.load_duration, label, (engine, label), seconds)

    def adapter_load_failed(self, engine: str, adapter: str, reason: str) -> None:
        with self._lock:
            label = self._lifecycle_label(adapter)
            self._inc(self.load_failures, label, (engine, label, self._reasons(reason)))

    def adapter_unloaded(self, engine: str, adapter: str, version: str, seconds: float, evicted: bool) -> None:
        with self._lock:
            label = self._lifecycle_label(adapter)
            self._observe(self.unload_duration, label, (engine, label), seconds)
            if evicted:
                self._inc(self.evictions, label, (engine, label, self._version(label, version)))

    # -- rollouts -------------------------------------------------------------------------------------------------

    def rollout_stopped(self, alias: str, version: str, reason: str) -> None:
        self.rollout_rollbacks.labels(alias, version, reason).inc()

    def parity_gated(self, alias: str, version: str, outcome: str) -> None:
        self.parity_gates.labels(alias, version, outcome).inc()

    def shadow_observed(
        self, alias: str, current: str, shadow: str, outcome: str, valid: bool | None, latency_s: float | None
    ) -> None:
        with self._lock:
            self.shadow_requests.labels(alias, current, shadow, outcome).inc()
            if outcome in ("agree", "differ"):
                counts = self._agreement.setdefault((alias, current, shadow), [0, 0])
                counts[0] += outcome == "agree"
                counts[1] += 1
                self.shadow_agreement.labels(alias, current, shadow).set(counts[0] / counts[1])
            if outcome in ("agree", "differ", "unjudged"):
                self.shadow_contract.labels(alias, shadow, validity_label(valid)).inc()
            if latency_s is not None:
                self.shadow_latency.labels(alias, shadow).observe(latency_s)

    # -- engines --------------------------------------------------------------------------------------------------

    def engine_up(self, engine: str, up: bool) -> None:
        self.engine_up_gauge.labels(engine).set(1 if up else 0)

    def engine_restarted(self, engine: str, reason: str) -> None:
        with self._lock:
            self.engine_restarts.labels(engine, self._reasons(reason)).inc()

    def add_state_collector(self, source: StateSource) -> None:
        self._state.sources.append(source)

    def watch_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Slot pressure, read from the placement queue at scrape time."""
        self.slots_wanted.set_function(dispatcher.slots_wanted)
        self.waiting_requests.set_function(dispatcher.waiting_requests)
        self.slot_handovers.set_function(lambda: dispatcher.handovers)

    # -- auth and limits (called by gateway/auth.py) ---------------------------------------------------------------

    def rate_limited(self, scope: str, limit: str) -> None:
        with self._lock:
            self.rate_limited_requests.labels(self._reasons(scope), self._reasons(limit)).inc()

    def auth_failed(self, reason: str) -> None:
        with self._lock:
            self.auth_failures.labels(self._reasons(reason)).inc()

    def limit_rejected(self, limit: str) -> None:
        with self._lock:
            self.limit_rejections.labels(self._reasons(limit)).inc()

    # -- usage events ---------------------------------------------------------------------------------------------

    def usage_event_dropped(self, reason: str, count: int = 1) -> None:
        self.usage_dropped.labels(slug(reason)).inc(count)

    def usage_webhook_posted(self, ok: bool) -> None:
        self.usage_posts.labels("ok" if ok else "error").inc()

    # -- exposition -----------------------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type, for a `GET /metrics` route."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def current_adapter_label(self, adapter: str) -> str:
        with self._lock:
            return self._labels.current(adapter)

    # -- internals ------------------------------------------------------------------------------------------------

    def _request_labels(self, outcome: Call) -> tuple[str, str]:
        if outcome.unresolved:
            return OTHER_LABEL, ""
        if outcome.adapter is None:
            return BASE_LABEL, ""
        self._labels.count(outcome.adapter)
        label = self._apply(self._labels.decide(outcome.adapter))
        return label, self._version(label, outcome.version or "")

    def _lifecycle_label(self, adapter: str) -> str:
        return self._apply(self._labels.decide(adapter))

    def _apply(self, decision: FoldDecision) -> str:
        if decision.demote is not None:
            for metric, labelvalues in self._series.pop(decision.demote, set()):
                with suppress(KeyError):
                    metric.remove(*labelvalues)
            logger.info("metrics: adapter %s folded into adapter=%s", decision.demote, OTHER_LABEL)
        return decision.label

    def _remember(self, metric: Counter | Histogram, adapter_label: str, labelvalues: tuple[str, ...]) -> None:
        if adapter_label not in (BASE_LABEL, OTHER_LABEL):
            self._series.setdefault(adapter_label, set()).add((metric, labelvalues))

    def _inc(self, metric: Counter, adapter_label: str, labelvalues: tuple[str, ...], amount: float = 1) -> None:
        self._remember(metric, adapter_label, labelvalues)
        metric.labels(*labelvalues).inc(amount)

    def _observe(self, metric: Histogram, adapter_label: str, labelvalues: tuple[str, ...], value: float) -> None:
        self._remember(metric, adapter_label, labelvalues)
        metric.labels(*labelvalues).observe(max(value, 0.0))

    @staticmethod
    def _version(label: str, version: str) -> str:
        return "" if label == OTHER_LABEL else version
