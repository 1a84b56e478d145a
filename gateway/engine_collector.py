"""The engines' state as metrics, read at scrape time: residency, adapter slots, waiting and in-flight requests.

`engine_snapshots` reads the gateway's ledger and supervisor into plain `EngineSnapshot`s; `EngineStateCollector`
(a custom Collector, the client_python pattern) turns what its sources return into gauge families at each scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapters_registry.manifest import AdapterManifest
from gateway.ledger import ResidencyLedger
from gateway.metric_labels import OTHER_LABEL
from gateway.supervisor import Engine

logger = logging.getLogger(__name__)

TIERS = frozenset({"gpu", "cpu", "unknown"})


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
    inflight: int = 0


StateSource = Callable[[], Iterable[EngineSnapshot]]


def residency_tier(engine_name: str, running: frozenset[str] | None) -> str:
    """ "gpu" while the adapter is in the running batch, "cpu" while it only sits in the engine's adapter cache."""
    if running is None:
        return "unknown"
    return "gpu" if engine_name in running else "cpu"


def engine_snapshots(
    ledger: ResidencyLedger, engines: Mapping[str, Engine], manifests: Mapping[str, AdapterManifest]
) -> list[EngineSnapshot]:
    """One snapshot per engine of the ledger; `manifests` by engine name (versions the ledger does not know by
    manifest are left out)."""
    snapshots = []
    for engine_id in ledger.engines():
        engine = engines.get(engine_id)
        running = engine.gpu_adapters if engine else None
        resident = []
        for key in ledger.resident(engine_id):
            manifest = manifests.get(key)
            if manifest is not None:
                resident.append(ResidentAdapter(manifest.name, str(manifest.version), residency_tier(key, running)))
        waiting, inflight = (engine.waiting, engine.inflight) if engine else (0, 0)
        snapshots.append(EngineSnapshot(engine_id, ledger.slots(engine_id), resident, waiting, inflight))
    return snapshots


class EngineStateCollector(Collector):
    """Scrape-time view of engine ledgers; `adapter_label` folds an adapter name the way the request metrics do."""

    def __init__(self, adapter_label: Callable[[str], str]) -> None:
        self._adapter_label = adapter_label
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
        for snap in snapshots:
            counts: dict[tuple[str, str, str], int] = {}
            for item in snap.resident:
                label = self._adapter_label(item.adapter)
                tier = item.tier if item.tier in TIERS else "unknown"
                key = (label, item.version if label != OTHER_LABEL else "", tier)
                counts[key] = counts.get(key, 0) + 1
            for (adapter, version, tier), n in sorted(counts.items()):
                resident.add_metric([snap.engine, adapter, version, tier], n)
            slots.add_metric([snap.engine], snap.adapter_slots)
            free.add_metric([snap.engine], max(snap.adapter_slots - len(snap.resident), 0))
            waiting.add_metric([snap.engine], snap.waiting)
            inflight.add_metric([snap.engine], snap.inflight)
        return [resident, slots, free, waiting, inflight]
