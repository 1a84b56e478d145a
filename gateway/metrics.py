"""Per-adapter Prometheus metrics of the gateway, on a registry object owned by the app (no global state).

Label rules (bounded cardinality):
- `adapter` is a registry adapter name, `""` for the base model, or `"other"`: past `max_adapter_labels` distinct
  adapters the least-used are folded into `"other"` (with `version=""`), and model names that resolved to nothing
  are counted there too. No request ids, key ids or user text ever become label values.
- `error_code`, load-failure `reason` and restart `reason` are slugged and capped at `MAX_REASON_LABELS` values.

Residency, free adapter slots and waiting requests are read from the gateway's ledger at scrape time through
callbacks registered with `add_state_collector` (a custom Collector, the client_python pattern).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.call import Call

logger = logging.getLogger(__name__)

BASE_LABEL = ""
OTHER_LABEL = "other"
MAX_REASON_LABELS = 32
DEFAULT_DECAY_EVERY = 10_000
TIERS = frozenset({"gpu", "cpu", "unknown"})

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class ResidentAdapter:
    adapter: str
    version: str
    tier: str = "unknown"  # "gpu" | "cpu" | "unknown": only what the engine reveals


@dataclass(frozen=True)
class EngineSnapshot:
    """Ledger state of one engine at scrape time."""

    engine: str
    adapter_slots: int
    resident: Sequence[ResidentAdapter] = field(default_factory=tuple)
    waiting: int = 0
    inflight: int | None = None  # None: use the count kept by `track_inflight`


StateSource = Callable[[], Iterable[EngineSnapshot]]


@dataclass(frozen=True)
class FoldDecision:
    label: str
    promote: bool = False
    demote: str | None = None


def fold_decision(adapter: str, usage: Mapping[str, float], labelled: frozenset[str], limit: int) -> FoldDecision:
    """Which label `adapter` gets. A newcomer takes a free label slot; when none is free it replaces the least-used
    labelled adapter only once it has more than twice that one's usage (hysteresis against flapping)."""
    if adapter in labelled:
        return FoldDecision(adapter)
    if len(labelled) < limit:
        return FoldDecision(adapter, promote=True)
    if not labelled:
        return FoldDecision(OTHER_LABEL)
    least = min(labelled, key=lambda name: (usage.get(name, 0.0), name))
    if usage.get(adapter, 0.0) > 2 * usage.get(least, 0.0):
        return FoldDecision(adapter, promote=True, demote=least)
    return FoldDecision(OTHER_LABEL)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "unknown"


def validity_label(output_valid: bool | None) -> str:
    if output_valid is None:
        return "none"
    return "valid" if output_valid else "invalid"


def time_per_output_token(latency_s: float, ttft_s: float | None, completion_tokens: int | None) -> float | None:
    """Decode time per token after the first one; needs a measured TTFT and at least two output tokens."""
    if ttft_s is None or completion_tokens is None or completion_tokens < 2:
        return None
    return max(latency_s - ttft_s, 0.0) / (completion_tokens - 1)


_LORA_INFO = re.compile(r'^vllm:lora_requests_info\{[^}]*running_lora_adapters="([^"]*)"[^}]*\}\s+(\S+)')


def running_lora_adapters(vllm_metrics_text: str) -> frozenset[str] | None:
    """Adapters in vLLM's running batch (on the accelerator now), from its `/metrics` text; None when the engine
    does not report `vllm:lora_requests_info`. vLLM keeps one sample per label set with the time it was set as the
    value, so the newest sample is the current one."""
    newest: tuple[float, str] | None = None
    for line in vllm_metrics_text.splitlines():
        match = _LORA_INFO.match(line)
        if match is None:
            continue
        try:
            stamp = float(match.group(2))
        except ValueError:
            continue
        if newest is None or stamp > newest[0]:
            newest = (stamp, match.group(1))
    if newest is None:
        return None
    return frozenset(name for name in newest[1].split(",") if name)


def residency_tier(engine_name: str, running: frozenset[str] | None) -> str:
    """ "gpu" while the adapter is in the running batch, "cpu" while it only sits in the engine's adapter cache."""
    if running is None:
        return "unknown"
    return "gpu" if engine_name in running else "cpu"


_SLUG = re.compile(r"[^a-z0-9_]+")


def slug(value: str) -> str:
    return _SLUG.sub("_", value.strip().lower()).strip("_")[:48] or "unknown"


class _AdapterLabels:
    """Folding state: decayed request counts per adapter and the set of adapters that have their own label."""

    def __init__(self, limit: int, decay_every: int) -> None:
        self.limit = limit
        self.decay_every = decay_every
        self.usage: dict[str, float] = {}
        self.labelled: set[str] = set()
        self._requests = 0

    def count(self, adapter: str) -> None:
        self.usage[adapter] = self.usage.get(adapter, 0.0) + 1.0
        self._requests += 1
        if self._requests % self.decay_every == 0:
            self.usage = {name: score / 2 for name, score in self.usage.items() if score >= 0.5}

    def decide(self, adapter: str) -> FoldDecision:
        decision = fold_decision(adapter, self.usage, frozenset(self.labelled), self.limit)
        if decision.promote:
            self.labelled.add(adapter)
        if decision.demote is not None:
            self.labelled.discard(decision.demote)
        return decision

    def current(self, adapter: str) -> str:
        return adapter if adapter in self.labelled else OTHER_LABEL


class _BoundedSlugs:
    """Caps a free-form label (error code, reason) at `limit` distinct values; later ones become "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        label = slug(value)
        if label in self.seen:
            return label
        if len(self.seen) < self.limit:
            self.seen.add(label)
            return label
        return OTHER_LABEL


class _StateCollector(Collector):
    """Scrape-time view of engine ledgers: residency, adapter slots, free slots, waiting requests."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        self.sources: list[StateSource] = []

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        snapshots: list[EngineSnapshot] = []
        for source in list(self.sources):
            try:
                snapshots.extend(source())
            except Exception:
                logger.exception("metrics state source %r failed", source)
        return self._families(snapshots)

    def _families(self, snapshots: Sequence[EngineSnapshot] = ()) -> list[Metric]:
        resident = GaugeMetricFamily(
            "loragate_adapter_resident",
            "Adapter versions loaded in an engine (1 per version; folded adapters summed under adapter=other).",
            labels=["engine", "adapter", "version", "tier"],
        )
        slots = GaugeMetricFamily(
            "loragate_engine_adapter_slots", "Adapter capacity of an engine's residency ledger.", labels=["engine"]
        )
        free = GaugeMetricFamily(
            "loragate_engine_free_adapter_slots",
            "Adapter slots an engine can fill without evicting.",
            labels=["engine"],
        )
        waiting = GaugeMetricFamily(
            "loragate_engine_waiting_requests",
            "Requests admitted for an engine that it has not started yet.",
            labels=["engine"],
        )
        inflight = GaugeMetricFamily(
            "loragate_engine_inflight_requests", "Requests forwarded to an engine and not finished.", labels=["engine"]
        )
        tracked = self._metrics.tracked_inflight()
        for snap in snapshots:
            counts: dict[tuple[str, str, str], int] = {}
            for item in snap.resident:
                label = self._metrics.current_adapter_label(item.adapter)
                tier = item.tier if item.tier in TIERS else "unknown"
                key = (label, item.version if label != OTHER_LABEL else "", tier)
                counts[key] = counts.get(key, 0) + 1
            for (adapter, version, tier), n in sorted(counts.items()):
                resident.add_metric([snap.engine, adapter, version, tier], n)
            slots.add_metric([snap.engine], snap.adapter_slots)
            free.add_metric([snap.engine], max(snap.adapter_slots - len(snap.resident), 0))
            waiting.add_metric([snap.engine], snap.waiting)
            count = tracked.pop(snap.engine, 0)
            inflight.add_metric([snap.engine], count if snap.inflight is None else snap.inflight)
        for engine, count in sorted(tracked.items()):
            inflight.add_metric([engine], count)
        return [resident, slots, free, waiting, inflight]


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
        self._labels = _AdapterLabels(max_adapter_labels, max(decay_every, 1))
        self._error_codes = _BoundedSlugs(MAX_REASON_LABELS)
        self._reasons = _BoundedSlugs(MAX_REASON_LABELS)
        # series created per labelled adapter, so that a demoted adapter's series can be removed
        self._series: dict[str, set[tuple[Counter | Histogram, tuple[str, ...]]]] = {}
        self._inflight: dict[str, int] = {}
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
        self._state = _StateCollector(self)
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

    @contextmanager
    def track_inflight(self, engine: str) -> Iterator[None]:
        """Counts a request in flight on `engine`, for engines whose snapshot does not report `inflight`."""
        with self._lock:
            self._inflight[engine] = self._inflight.get(engine, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight[engine] -= 1

    def tracked_inflight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._inflight)

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

    # -- engines --------------------------------------------------------------------------------------------------

    def engine_up(self, engine: str, up: bool) -> None:
        self.engine_up_gauge.labels(engine).set(1 if up else 0)

    def engine_restarted(self, engine: str, reason: str) -> None:
        with self._lock:
            self.engine_restarts.labels(engine, self._reasons(reason)).inc()

    def add_state_collector(self, source: StateSource) -> None:
        self._state.sources.append(source)

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
