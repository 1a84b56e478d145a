"""Adapter hot-loading: resolve `model` through the registry, place it, load it into vLLM, evict, re-load.

An adapter version is loaded under its version-qualified engine name (`manifest.engine_name`, `name@<digest12>`),
so a re-used name can never serve old weights. One load at a time per (engine, version); concurrent requests
wait on it. The ledger changes only after vLLM accepted a load or confirmed an unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from adapters_registry import AdapterManifest, Registry
from adapters_registry.errors import ConflictError, NotFoundError, RegistryError, ValidationError
from gateway.errors import AdapterLoadFailed, AdapterRefused, InvalidRequest, ModelNotFound, Unavailable
from gateway.metrics import GatewayMetrics
from gateway.routing import EngineLoad, Placement, Policy, Refusal, ResidencyLedger, choose_engine
from gateway.supervisor import Engine

log = logging.getLogger(__name__)

ENGINE_NAME = re.compile(r"^(?P<name>.+)@(?P<digest>[0-9a-f]{12})$")


@dataclass(frozen=True)
class Target:
    """What a request's `model` names: the base (manifest None) or one adapter version."""

    model: str
    manifest: AdapterManifest | None
    upstream_name: str  # the name vLLM knows: the served base name or the engine name

    @property
    def label(self) -> str:
        return self.manifest.ref if self.manifest else self.upstream_name

    @property
    def key(self) -> str | None:
        return self.manifest.engine_name if self.manifest else None


@dataclass
class Lease:
    """A placed request: it holds the engine's in-flight slot and keeps its adapter from being evicted."""

    engine: Engine
    key: str | None
    release: Callable[[], None] = field(repr=False)


def refusal_reason(manifest: AdapterManifest, base_name: str, max_lora_rank: int) -> str | None:
    """Why this version cannot be served as a LoRA on these engines (None: it can)."""
    if manifest.serving == "merge-only":
        reason = manifest.serving_reason or "its configuration is not supported by vLLM's LoRA runtime"
        return (
            f"adapter {manifest.ref} cannot be served as a LoRA: {reason}. "
            f"Merge it into its base with `loragate merge {manifest.ref}` and serve the merged model"
        )
    if manifest.base != base_name:
        return f"adapter {manifest.ref} was trained on base '{manifest.base}', but this gateway serves '{base_name}'"
    if manifest.r > max_lora_rank:
        return (
            f"adapter {manifest.ref} has rank {manifest.r}, above the engines' max_lora_rank {max_lora_rank}; "
            f"raise engines.max_lora_rank or retrain with a smaller rank"
        )
    return None


def no_engine_error(engines: list[Engine]) -> Unavailable:
    """Why no engine can take a request: still starting (retry soon), or every one given up (retrying won't help)."""
    if not engines:
        return Unavailable("no engine is configured or discovered yet; retry shortly", code="engines_not_ready")
    if all(engine.gave_up for engine in engines):
        reasons = "; ".join(f"{engine.id}: {engine.last_error or 'down'}" for engine in engines)
        return Unavailable(
            f"every engine is down and its restart budget is spent ({reasons}); the gateway needs an operator",
            retry_after_s=60,
            code="engines_down",
        )
    return Unavailable("no engine is ready yet; retry shortly", code="engines_not_ready")


class AdapterManager:
    def __init__(
        self,
        registry: Registry,
        client: httpx.AsyncClient,
        engines: dict[str, Engine],
        *,
        base_name: str,
        bound_base: str | None = None,
        policy: Policy,
        load_timeout_s: float,
        metrics: GatewayMetrics | None = None,
        materialize: bool = True,
    ) -> None:
        self.registry = registry
        self.client = client
        self.engines = engines
        self.base_name = base_name
        self.bound_base = bound_base or base_name  # the registry base adapters must be bound to
        self.policy = policy
        self.load_timeout_s = load_timeout_s
        self.metrics = metrics
        self.materialize = materialize  # False: the engines' own synced cache holds the files; only name the folder
        self.ledger = ResidencyLedger()
        self.manifests: dict[str, AdapterManifest] = {}
        self.pinned_refs: dict[str, str] = {}  # engine name -> the ref it was pinned by
        self._paths: dict[str, Path] = {}
        self._loading: Counter[str] = Counter()
        self._busy: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._version_locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._engine_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._path_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._slot_freed = asyncio.Condition()

    # -- resolution ------------------------------------------------------------------------------------------------
    async def resolve(self, model: object) -> Target:
        if not isinstance(model, str) or not model:
            raise InvalidRequest("`model` must be a non-empty string", param="model")
        if model == self.base_name:
            return Target(model, None, self.base_name)
        manifest = await self.manifest_for(model)
        reason = refusal_reason(manifest, self.bound_base, self.max_lora_rank())
        if reason:
            raise AdapterRefused(reason, param="model")
        self.manifests[manifest.engine_name] = manifest
        return Target(model, manifest, manifest.engine_name)

    async def manifest_for(self, model: str) -> AdapterManifest:
        """The registry version a reference names, whether or not it can be served here."""
        try:
            return await asyncio.to_thread(self.registry.resolve, model)
        except NotFoundError as exc:
            raise ModelNotFound(model) from exc
        except (ValidationError, ConflictError) as exc:  # a malformed or ambiguous ref is the caller's mistake
            raise InvalidRequest(f"invalid model '{model}': {exc}", param="model") from exc
        except RegistryError as exc:
            raise Unavailable(f"registry unavailable: {exc}", code="registry_unavailable") from exc

    def max_lora_rank(self) -> int:
        ranks = [engine.max_lora_rank for engine in self.engines.values()]
        return min(ranks) if ranks else 0

    def status(self, key: str) -> str:
        if any(self.ledger.has(engine, key) for engine in self.ledger.engines()):
            return "loaded"
        return "loading" if self._loading[key] else "registered"

    # -- placement ---------------------------------------------------------------------------------------------------
    def _loads(self, exclude: set[str]) -> list[EngineLoad]:
        return [
            EngineLoad(e.id, e.healthy and e.id not in exclude, e.inflight, e.waiting) for e in self.engines.values()
        ]

    async def acquire(self, target: Target, request_id: str, exclude: set[str] | None = None) -> Lease:
        """Place the request, loading its adapter first when needed; waits for a free slot up to the load timeout."""
        exclude = exclude or set()
        deadline = time.monotonic() + self.load_timeout_s
        key = target.key
        while True:
            decision = choose_engine(
                key, self._loads(exclude), self.ledger, self.policy, busy=self._busy, spread_key=request_id
            )
            if decision is Refusal.NO_ENGINE:
                raise no_engine_error(list(self.engines.values()))
            if decision is Refusal.BUSY:
                raise Unavailable("all engines are busy; retry shortly", code="engines_busy")
            if isinstance(decision, Placement):
                engine = self.engines[decision.engine]
                if key is None or self.ledger.has(engine.id, key):
                    return self._lease(engine, key)
                assert target.manifest is not None
                if await self.ensure_loaded(engine, target.manifest):
                    return self._lease(engine, key)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"no adapter slot freed up within {self.load_timeout_s:.0f}s", code="no_adapter_slot")
            async with self._slot_freed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), min(remaining, 1.0))

    def _lease(self, engine: Engine, key: str | None) -> Lease:
        engine.inflight += 1
        if key is not None:
            self._busy[engine.id][key] += 1
            self.ledger.touch(engine.id, key)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            engine.inflight -= 1
            if key is not None:
                self._busy[engine.id][key] -= 1
                if self._busy[engine.id][key] <= 0:
                    del self._busy[engine.id][key]
                    asyncio.get_running_loop().create_task(self._notify())

        return Lease(engine, key, release)

    async def _notify(self) -> None:
        async with self._slot_freed:
            self._slot_freed.notify_all()

    # -- load / unload -----------------------------------------------------------------------------------------------
    async def _local_path(self, manifest: AdapterManifest) -> Path:
        key = manifest.engine_name
        async with self._path_locks[key]:
            if key not in self._paths and not self.materialize:
                self._paths[key] = self.registry.materialized_path(manifest)
            elif key not in self._paths:
                self._paths[key] = await asyncio.to_thread(self.registry.materialize, manifest)
            return self._paths[key]

    async def ensure_loaded(self, engine: Engine, manifest: AdapterManifest) -> bool:
        """Load `manifest` into `engine` (evicting LRU adapters); False when no slot can be freed right now."""
        key = manifest.engine_name
        self.manifests[key] = manifest
        async with self._version_locks[(engine.id, key)]:
            if self.ledger.has(engine.id, key):
                return True
            path = await self._local_path(manifest)
            async with self._engine_locks[engine.id]:
                evict = self.ledger.plan_admit(engine.id, key, self._busy[engine.id])
                if evict is None:
                    return False
                for victim in evict:
                    await self._unload(engine, victim, evicted=True)
                await self._load(engine, key, path)
        return True

    async def _load(self, engine: Engine, key: str, path: Path) -> None:
        manifest = self.manifests.get(key)
        self._loading[key] += 1
        started = time.monotonic()
        try:
            response = await self.client.post(
                f"{engine.url}/v1/load_lora_adapter",
                json={"lora_name": key, "lora_path": str(path)},
                timeout=self.load_timeout_s,
            )
        except httpx.HTTPError as exc:
            self._load_failed(engine, key, type(exc).__name__)
            raise Unavailable(f"engine {engine.id} did not answer the adapter load: {exc}") from exc
        finally:
            self._loading[key] -= 1
        already = response.status_code == 400 and "already been loaded" in response.text
        if response.status_code != 200 and not already:
            self._load_failed(engine, key, str(response.status_code))
            raise AdapterLoadFailed(
                f"engine {engine.id} refused adapter {manifest.ref if manifest else key}: {_upstream_message(response)}"
            )
        self.ledger.record_loaded(engine.id, key)
        seconds = time.monotonic() - started
        log.info("%s: loaded %s as %s in %.3fs", engine.id, manifest.ref if manifest else key, key, seconds)
        if self.metrics is not None and manifest is not None:
            self.metrics.adapter_loaded(engine.id, manifest.name, str(manifest.version), seconds)

    def _load_failed(self, engine: Engine, key: str, reason: str) -> None:
        manifest = self.manifests.get(key)
        if self.metrics is not None and manifest is not None:
            self.metrics.adapter_load_failed(engine.id, manifest.name, reason)

    async def _unload(self, engine: Engine, key: str, *, evicted: bool) -> None:
        started = time.monotonic()
        # Out of the ledger first, so that no new request is routed to it while vLLM drops it.
        self.ledger.record_unloaded(engine.id, key)
        try:
            response = await self.client.post(f"{engine.url}/v1/unload_lora_adapter", json={"lora_name": key})
            if response.status_code not in (200, 404):
                raise AdapterLoadFailed(f"engine {engine.id} refused to unload {key}: {_upstream_message(response)}")
            if key in await self._engine_adapters(engine):
                raise AdapterLoadFailed(f"engine {engine.id} still lists {key} after unloading it")
        except (AdapterLoadFailed, httpx.HTTPError):
            self.ledger.record_loaded(engine.id, key)
            raise
        seconds = time.monotonic() - started
        log.info("%s: %s %s", engine.id, "evicted" if evicted else "unloaded", key)
        manifest = self.manifests.get(key)
        if self.metrics is not None and manifest is not None:
            self.metrics.adapter_unloaded(engine.id, manifest.name, str(manifest.version), seconds, evicted)

    async def unload(self, engine: Engine, key: str) -> None:
        async with self._version_locks[(engine.id, key)], self._engine_locks[engine.id]:
            await self._unload(engine, key, evicted=False)

    async def _engine_adapters(self, engine: Engine) -> set[str]:
        response = await self.client.get(f"{engine.url}/v1/models", timeout=10.0)
        response.raise_for_status()
        return {card["id"] for card in response.json().get("data", []) if card.get("parent")}

    # -- pins, restarts, reconciliation ----------------------------------------------------------------------------
    async def pin(self, ref: str) -> AdapterManifest:
        """Pin a version: never evicted, loaded on every healthy engine now and after every restart."""
        target = await self.resolve(ref)
        assert target.manifest is not None
        key = target.manifest.engine_name
        self.ledger.pin(key)
        self.pinned_refs[key] = ref
        for engine in list(self.engines.values()):
            if engine.healthy and not await self.ensure_loaded(engine, target.manifest):
                raise Unavailable(f"engine {engine.id} has no slot for pinned adapter {ref}", code="no_adapter_slot")
        return target.manifest

    def unpin(self, key: str) -> None:
        self.ledger.unpin(key)
        self.pinned_refs.pop(key, None)

    def pinned_resident(self, engine: Engine) -> bool:
        return all(self.ledger.has(engine.id, key) for key in self.ledger.pinned)

    async def on_engine_ready(self, engine: Engine) -> None:
        """A (re)started engine holds nothing: load what the ledger says it held, pinned adapters first."""
        held = [key for key in self.ledger.resident(engine.id) if key not in self.ledger.pinned]
        for key in held:
            self.ledger.record_unloaded(engine.id, key)
        for key in [*sorted(self.ledger.pinned), *held]:
            manifest = self.manifests.get(key)
            if manifest is None:
                continue
            try:
                await self.ensure_loaded(engine, manifest)
            except Exception as exc:
                log.error("%s: could not re-load %s: %s", engine.id, manifest.ref, exc)

    async def on_engine_down(self, engine: Engine) -> None:
        log.warning(
            "%s: down; its adapters (%s) will be re-loaded when it is back",
            engine.id,
            ", ".join(self.ledger.resident(engine.id)) or "none",
        )

    async def reconcile(self, engine: Engine) -> None:
        """Align the ledger with what the engine lists (another gateway replica may have loaded adapters)."""
        async with self._engine_locks[engine.id]:
            listed = await self._engine_adapters(engine)
            known = set(self.ledger.resident(engine.id))
            for key in sorted(listed - known):
                if ENGINE_NAME.match(key):
                    self.ledger.record_loaded(engine.id, key)
            for key in known - listed:
                if not self._loading[key]:
                    log.warning("%s: %s vanished from the engine; dropping it from the ledger", engine.id, key)
                    self.ledger.record_unloaded(engine.id, key)

    def engine_name_to_ref(self, key: str) -> str | None:
        match = ENGINE_NAME.match(key)
        return f"{match['name']}@sha256:{match['digest']}" if match else None


def _upstream_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message", response.text))
        if isinstance(body, dict) and "message" in body:
            return str(body["message"])
    except ValueError:
        pass
    return response.text.strip()[:300] or f"status {response.status_code}"
