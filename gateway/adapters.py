"""Adapter hot-loading: resolve `model` through the registry, place it, load it into vLLM, evict, re-load.

An adapter version is loaded under its version-qualified engine name (`manifest.engine_name`, `name@<digest12>`),
so a re-used name can never serve old weights. One load at a time per (engine, version); concurrent requests
wait on it. The ledger changes only after vLLM accepted a load or confirmed an unload.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adapters_registry import AdapterManifest, Registry
from adapters_registry.aliases import Resolution
from adapters_registry.errors import RegistryError
from gateway.dispatch import Ask, Decision, Dispatcher
from gateway.errors import (
    AdapterLoadFailed,
    AdapterRefused,
    GatewayError,
    InvalidRequest,
    Unavailable,
    from_registry_error,
)
from gateway.ledger import ResidencyLedger
from gateway.resolver import Resolver
from gateway.routing import Placement, Policy, Refusal, rendezvous_order
from gateway.supervisor import Engine
from gateway.upstream import ERRORS, Reply, Upstream

log = logging.getLogger(__name__)

ENGINE_NAME = re.compile(r"^(?P<name>.+)@(?P<digest>[0-9a-f]{12})$")


@dataclass(frozen=True)
class Target:
    """What a request's `model` names: the base (manifest None) or one adapter version."""

    model: str
    manifest: AdapterManifest | None
    upstream_name: str  # the `model` vLLM is sent: the base's served name or the version's lora_name
    rollout: Resolution | None = None  # the alias's rollout or shadow the version was picked from (None: neither)

    @property
    def label(self) -> str:
        return self.manifest.ref if self.manifest else self.upstream_name

    @property
    def lora_name(self) -> str | None:
        """The name vLLM knows the version by (`name@digest12`, the manifest's engine_name); None for the base."""
        return self.manifest.engine_name if self.manifest else None


class Lease:
    """A placed request: it holds the engine's in-flight slot and keeps its adapter from being evicted."""

    __slots__ = ("_on_release", "engine", "lora_name", "released")

    def __init__(self, engine: Engine, lora_name: str | None, on_release: Callable[[], None]) -> None:
        self.engine = engine
        self.lora_name = lora_name
        self.released = False
        self._on_release = on_release

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_release()


class AdapterMetrics(Protocol):
    """What the adapter manager counts (gateway.metrics.GatewayMetrics provides it; `NO_METRICS` counts nothing)."""

    def adapter_loaded(self, engine: str, adapter: str, version: str, seconds: float) -> None: ...

    def adapter_load_failed(self, engine: str, adapter: str, reason: str) -> None: ...

    def adapter_unloaded(self, engine: str, adapter: str, version: str, seconds: float, evicted: bool) -> None: ...


class _NoMetrics:
    def adapter_loaded(self, engine: str, adapter: str, version: str, seconds: float) -> None:
        pass

    def adapter_load_failed(self, engine: str, adapter: str, reason: str) -> None:
        pass

    def adapter_unloaded(self, engine: str, adapter: str, version: str, seconds: float, evicted: bool) -> None:
        pass


NO_METRICS: AdapterMetrics = _NoMetrics()


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
        upstream: Upstream,
        engines: Mapping[str, Engine],
        *,
        base_name: str,
        bound_base: str | None = None,
        policy: Policy,
        load_timeout_s: float,
        metrics: AdapterMetrics = NO_METRICS,
        materialize: bool = True,
        pinned: list[str] | None = None,
        resolve_ttl_s: float = 2.0,
        prewarm: list[str] | None = None,
        prewarm_timeout_s: float = 300.0,
    ) -> None:
        self.registry = registry
        self.resolver = Resolver(registry, ttl_s=resolve_ttl_s)
        self.upstream = upstream
        self.engines = engines  # the supervisor's: it adds and removes them
        self.base_name = base_name
        self.bound_base = bound_base or base_name  # the registry base adapters must be bound to
        self.policy = policy
        self.load_timeout_s = load_timeout_s
        self.metrics = metrics
        self.materialize = materialize  # False: the engines' own synced cache holds the files; only name the folder
        self.ledger = ResidencyLedger()
        self.manifests: dict[str, AdapterManifest] = {}
        # ref -> engine name once resolved (None: not yet, e.g. before any engine told its max_lora_rank)
        self.pinned_refs: dict[str, str | None] = dict.fromkeys(pinned or [])
        self.pin_problems: dict[str, str] = {}  # ref -> why it is not pinned yet
        self.prewarm_refs = list(prewarm or [])  # references or glob patterns over adapter names, most wanted first
        self.prewarm_timeout_s = prewarm_timeout_s
        self._warm_gate: asyncio.Semaphore | None = None
        self._paths: dict[str, Path] = {}
        self._loading: Counter[str] = Counter()
        self.dispatcher = Dispatcher(self.ledger, policy, lambda: list(self.engines.values()))
        self._version_locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._engine_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._path_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._background: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        # With gateway workers: which of these adapters another process has requests in flight for on an engine
        self.busy_elsewhere: Callable[[str, tuple[str, ...]], Awaitable[set[str]]] | None = None

    # -- resolution ------------------------------------------------------------------------------------------------
    async def resolve(self, model: object, split_key: str = "") -> Target:
        """What a request's `model` serves; `split_key` picks the version while an alias rolls one out (the same
        key, the same version)."""
        if not isinstance(model, str) or not model:
            raise InvalidRequest("`model` must be a non-empty string", param="model")
        if model == self.base_name:
            return Target(model, None, self.base_name)
        resolution = await self.resolution_for(model)
        manifest = resolution.pick(split_key)
        reason = refusal_reason(manifest, self.bound_base, self.max_lora_rank())
        if reason:
            raise AdapterRefused(reason, param="model", adapter=manifest.name, version=manifest.version)
        self.manifests[manifest.engine_name] = manifest
        rollout = resolution if resolution.candidate is not None or resolution.shadow is not None else None
        return Target(model, manifest, manifest.engine_name, rollout)

    async def manifest_for(self, model: str) -> AdapterManifest:
        """The registry version a reference names (an alias's own version, not a rollout's candidate), whether or
        not it can be served here."""
        return (await self.resolution_for(model)).current

    async def resolution_for(self, model: str) -> Resolution:
        try:
            return await self.resolver.resolve(model)
        except RegistryError as exc:
            raise from_registry_error(exc, model) from exc

    def max_lora_rank(self) -> int:
        ranks = [engine.max_lora_rank for engine in self.engines.values()]
        return min(ranks) if ranks else 0

    def status(self, lora_name: str) -> str:
        if self.ledger.holders(lora_name):
            return "loaded"
        return "loading" if self._loading[lora_name] else "registered"

    # -- placement ---------------------------------------------------------------------------------------------------
    async def acquire(
        self, manifest: AdapterManifest | None, request_id: str, exclude: set[str] | None = None
    ) -> Lease:
        """Place the request (gateway.dispatch), loading its adapter first when needed; a request that must wait
        for a slot or a load waits up to the load timeout."""
        deadline = time.monotonic() + self.load_timeout_s
        lora_name = manifest.engine_name if manifest is not None else None
        while True:
            decision = await self._dispatch(lora_name, request_id, frozenset(exclude or ()), deadline)
            if decision is Refusal.NO_ENGINE:
                raise no_engine_error(list(self.engines.values()))
            if decision is Refusal.BUSY:
                raise Unavailable("all engines are busy; retry shortly", code="engines_busy")
            assert isinstance(decision, Placement)
            engine = self.engines[decision.engine]
            lease = self._lease(engine, lora_name)
            if lora_name is None or self.ledger.has(engine.id, lora_name):
                return lease
            assert manifest is not None
            try:
                placed = await self.place(engine, manifest, request_id, set(exclude or ()))
            except BaseException:
                lease.release()
                raise
            finally:
                if decision.load:
                    self.dispatcher.load_done(engine.id, lora_name, None)
            if placed is None:
                lease.release()
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"no adapter slot freed up within {self.load_timeout_s:.0f}s", code="no_adapter_slot"
                    )
                await asyncio.sleep(0.05)
                continue
            if placed is not engine:
                self.dispatcher.moved(lora_name, engine.id, placed.id)
                engine.inflight -= 1
                placed.inflight += 1
                return self._lease(placed, lora_name)
            return lease

    async def _dispatch(
        self, lora_name: str | None, request_id: str, exclude: frozenset[str], deadline: float
    ) -> Decision:
        """The dispatcher's decision for one request, waiting in its queue when it holds the request."""
        ready: asyncio.Future[Decision] | None = None  # made only when the request has to wait
        early: list[Decision] = []  # a decision handed over before offer returned

        def on_ready(decision: Decision) -> None:
            self._reserve(decision)
            if ready is None:
                early.append(decision)
            elif not ready.done():
                ready.set_result(decision)

        ask = Ask(lora_name, request_id, on_ready, exclude)
        decision = self.dispatcher.offer(ask)
        if decision is not None:
            self._reserve(decision)
            return decision
        if early:
            return early[0]
        ready = asyncio.get_running_loop().create_future()
        self._tick()
        try:
            return await asyncio.wait_for(asyncio.shield(ready), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            self.dispatcher.cancel(ask)
            if ready.done():  # placed just as the deadline passed
                return ready.result()
            why = ask.held.value if ask.held is not None else "no slot"
            raise Unavailable(
                f"no adapter slot freed up within {self.load_timeout_s:.0f}s ({why})", code="no_adapter_slot"
            ) from None
        except asyncio.CancelledError:
            self.dispatcher.cancel(ask)
            if ready.done() and isinstance(ready.result(), Placement):  # placed, then its client went away
                placement = ready.result()
                assert isinstance(placement, Placement)
                self.engines[placement.engine].inflight -= 1
                self.dispatcher.release(placement.engine, lora_name)
            raise

    def _reserve(self, decision: Decision) -> None:
        if isinstance(decision, Placement):
            self.engines[decision.engine].inflight += 1

    def _tick(self) -> None:
        """While requests wait, look again every 0.2 s (engines come back, slot hand-overs fall due)."""
        if self._ticker is not None and not self._ticker.done():
            return

        async def tick() -> None:
            while self.dispatcher.waiting:
                await asyncio.sleep(0.2)
                self.dispatcher.pump()

        self._ticker = asyncio.get_running_loop().create_task(tick())

    async def place(
        self, engine: Engine, manifest: AdapterManifest, request_id: str, exclude: set[str]
    ) -> Engine | None:
        """Load `manifest` where placement chose (`engine`); the engine that holds it then, or None (no slot now)."""
        return engine if await self.ensure_loaded(engine, manifest) else None

    def _lease(self, engine: Engine, lora_name: str | None) -> Lease:
        """The lease of a placed call (the engine's in-flight count was raised when it was placed)."""
        if lora_name is not None:
            self.ledger.touch(engine.id, lora_name)

        def release() -> None:
            engine.inflight -= 1
            self.dispatcher.release(engine.id, lora_name)

        return Lease(engine, lora_name, release)

    def busy_here(self, engine_id: str) -> set[str]:
        """The adapters this process has calls in flight for on `engine_id`."""
        return self.dispatcher.active(engine_id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- load / unload -----------------------------------------------------------------------------------------------
    async def _local_path(self, manifest: AdapterManifest) -> Path:
        lora_name = manifest.engine_name
        async with self._path_locks[lora_name]:
            if lora_name not in self._paths and not self.materialize:
                self._paths[lora_name] = self.registry.materialized_path(manifest)
            elif lora_name not in self._paths:
                try:
                    self._paths[lora_name] = await asyncio.to_thread(self.registry.materialize, manifest)
                except RegistryError as exc:
                    raise from_registry_error(exc, manifest.ref) from exc
            return self._paths[lora_name]

    async def ensure_loaded(self, engine: Engine, manifest: AdapterManifest, *, evict: bool = True) -> bool:
        """Load `manifest` into `engine` (evicting the least wanted adapters; with `evict` False, only into a free
        slot); False when no slot can be freed now."""
        lora_name = manifest.engine_name
        self.manifests[lora_name] = manifest
        async with self._version_locks[(engine.id, lora_name)]:
            if self.ledger.has(engine.id, lora_name):
                return True
            path = await self._local_path(manifest)
            async with self._engine_locks[engine.id]:
                busy, wanted = self.dispatcher.active(engine.id), self.dispatcher.wanted()
                victims = self.ledger.plan_admit(engine.id, lora_name, busy, wanted, self.dispatcher.eviction_weight())
                if victims is None or (victims and (not evict or not await self._idle_elsewhere(engine, victims))):
                    return False
                for victim in victims:
                    await self._unload(engine, victim, evicted=True)
                await self._load(engine, lora_name, path)
        return True

    async def _idle_elsewhere(self, engine: Engine, victims: tuple[str, ...]) -> bool:
        """Whether no other process of this gateway has a request in flight on `victims` (they leave the ledger
        first, so none starts one after it answered); put back when one has."""
        if self.busy_elsewhere is None:
            return True
        for victim in victims:
            self.ledger.record_unloaded(engine.id, victim)
        busy = await self.busy_elsewhere(engine.id, victims)
        if busy:
            for victim in victims:
                self.ledger.record_loaded(engine.id, victim)
            return False
        return True

    async def _load(self, engine: Engine, lora_name: str, path: Path) -> None:
        manifest = self.manifests.get(lora_name)
        self._loading[lora_name] += 1
        started = time.monotonic()
        try:
            response = await self.upstream.post_json(
                f"{engine.url}/v1/load_lora_adapter",
                {"lora_name": lora_name, "lora_path": str(path)},
                timeout_s=self.load_timeout_s,
            )
        except ERRORS as exc:
            self._load_failed(engine, lora_name, type(exc).__name__)
            raise Unavailable(f"engine {engine.id} did not answer the adapter load: {exc!r}") from exc
        finally:
            self._loading[lora_name] -= 1
        already = response.status == 400 and "already been loaded" in response.text
        if response.status != 200 and not already:
            self._load_failed(engine, lora_name, str(response.status))
            what = manifest.ref if manifest else lora_name
            raise AdapterLoadFailed(f"engine {engine.id} refused adapter {what}: {_upstream_message(response)}")
        self.ledger.record_loaded(engine.id, lora_name)
        seconds = time.monotonic() - started
        self.dispatcher.load_done(engine.id, lora_name, seconds)
        log.info("%s: loaded %s as %s in %.3fs", engine.id, manifest.ref if manifest else lora_name, lora_name, seconds)
        if manifest is not None:
            self.metrics.adapter_loaded(engine.id, manifest.name, str(manifest.version), seconds)

    def _load_failed(self, engine: Engine, lora_name: str, reason: str) -> None:
        manifest = self.manifests.get(lora_name)
        if manifest is not None:
            self.metrics.adapter_load_failed(engine.id, manifest.name, reason)

    async def _unload(self, engine: Engine, lora_name: str, *, evicted: bool) -> None:
        started = time.monotonic()
        # Out of the ledger first, so that no new request is routed to it while vLLM drops it.
        self.ledger.record_unloaded(engine.id, lora_name)
        try:
            response = await self.upstream.post_json(f"{engine.url}/v1/unload_lora_adapter", {"lora_name": lora_name})
            if response.status not in (200, 404):
                raise AdapterLoadFailed(
                    f"engine {engine.id} refused to unload {lora_name}: {_upstream_message(response)}"
                )
            if lora_name in await self._engine_adapters(engine):
                raise AdapterLoadFailed(f"engine {engine.id} still lists {lora_name} after unloading it")
        except (AdapterLoadFailed, *ERRORS):  # type: ignore[misc]
            self.ledger.record_loaded(engine.id, lora_name)
            raise
        seconds = time.monotonic() - started
        log.info("%s: %s %s", engine.id, "evicted" if evicted else "unloaded", lora_name)
        manifest = self.manifests.get(lora_name)
        if manifest is not None:
            self.metrics.adapter_unloaded(engine.id, manifest.name, str(manifest.version), seconds, evicted)

    async def unload(self, engine: Engine, lora_name: str) -> None:
        async with self._version_locks[(engine.id, lora_name)], self._engine_locks[engine.id]:
            await self._unload(engine, lora_name, evicted=False)

    def retire_soon(self, name: str, version: int) -> None:
        """`retire` in the background (a resolver refresh found the version out of an alias)."""

        async def retire() -> None:
            await self.retire(name, version)

        self._spawn(retire())

    async def retire(self, name: str, version: int, wait_s: float | None = None) -> list[str]:
        """A version that lost its alias weight (a stopped, rolled back or completed rollout): unloaded from the
        engines that hold it once its calls in flight here end, unless an alias of `name` still serves it (as its
        version, candidate or shadow) or it is pinned. The engines it was unloaded from."""
        manifest = next((m for m in self.manifests.values() if (m.name, m.version) == (name, version)), None)
        if manifest is None or manifest.engine_name in self.ledger.pinned:
            return []  # never served here, or pinned
        lora_name = manifest.engine_name
        deadline = time.monotonic() + (self.load_timeout_s if wait_s is None else wait_s)
        while any(lora_name in self.dispatcher.active(engine_id) for engine_id in self.ledger.holders(lora_name)):
            if time.monotonic() >= deadline:
                log.info("%s still has calls in flight; left loaded (eviction will take it)", manifest.ref)
                return []
            await asyncio.sleep(0.05)
        try:
            records = await asyncio.to_thread(self.registry.alias_records, name)
        except RegistryError as exc:
            log.warning("%s left loaded: the registry cannot say whether an alias serves it (%s)", manifest.ref, exc)
            return []
        if any(version in record.versions() for record in records.values()):
            return []
        unloaded = []
        for engine_id in self.ledger.holders(lora_name):
            engine = self.engines.get(engine_id)
            if engine is None or not engine.healthy or lora_name in self.dispatcher.active(engine_id):
                continue
            try:
                await self.unload(engine, lora_name)
            except (GatewayError, *ERRORS) as exc:  # type: ignore[misc]
                log.warning("%s not unloaded from %s: %s", manifest.ref, engine_id, exc)
                continue
            unloaded.append(engine_id)
        if unloaded:
            log.info("%s unloaded from %s: no alias serves it any more", manifest.ref, ", ".join(unloaded))
        return unloaded

    async def _engine_adapters(self, engine: Engine) -> set[str]:
        """The adapters the engine itself lists (vLLM's `/v1/models`: the cards with a parent)."""
        response = await self.upstream.get(f"{engine.url}/v1/models", timeout_s=10.0)
        if response.status != 200:
            raise AdapterLoadFailed(f"engine {engine.id} answered {response.status} listing its adapters")
        return {card["id"] for card in response.json().get("data", []) if card.get("parent")}

    # -- pins, restarts, reconciliation ----------------------------------------------------------------------------
    async def pin(self, ref: str) -> AdapterManifest:
        """Pin a version: never evicted, loaded on every healthy engine now and after every restart."""
        target = await self.resolve(ref)
        assert target.manifest is not None
        lora_name = target.manifest.engine_name
        self.ledger.pin(lora_name)
        self.pinned_refs[ref] = lora_name
        self.pin_problems.pop(ref, None)
        for engine in list(self.engines.values()):
            if engine.healthy and not await self.ensure_loaded(engine, target.manifest):
                raise Unavailable(f"engine {engine.id} has no slot for pinned adapter {ref}", code="no_adapter_slot")
        return target.manifest

    def unpin(self, lora_name: str) -> None:
        self.ledger.unpin(lora_name)
        for ref in [ref for ref, pinned in self.pinned_refs.items() if pinned == lora_name]:
            del self.pinned_refs[ref]

    def pinned_resident(self, engine: Engine) -> bool:
        return not self.pin_problems and all(self.ledger.has(engine.id, lora_name) for lora_name in self.ledger.pinned)

    async def _resolve_pins(self) -> None:
        """Pins given in the settings become engine names once an engine says what it can serve (its rank)."""
        for ref, lora_name in list(self.pinned_refs.items()):
            if lora_name is not None:
                continue
            try:
                target = await self.resolve(ref)
            except Exception as exc:
                self.pin_problems[ref] = str(getattr(exc, "message", exc))
                log.error("pinned adapter %s cannot be pinned: %s", ref, self.pin_problems[ref])
                continue
            assert target.lora_name is not None
            self.ledger.pin(target.lora_name)
            self.pinned_refs[ref] = target.lora_name
            self.pin_problems.pop(ref, None)

    async def on_engine_ready(self, engine: Engine) -> None:
        """An engine (re)started or came back: align the ledger with what it holds, then load what it should hold.

        A restarted engine holds nothing; one that was only unreachable for a while still holds its adapters.
        Pinned adapters load first, then those the ledger says it held (they were in use there)."""
        try:
            listed = await self._engine_adapters(engine)
        except (AdapterLoadFailed, *ERRORS) as exc:  # type: ignore[misc]
            log.warning("%s: could not list its adapters (%s); assuming it holds none", engine.id, exc)
            listed = set()
        async with self._engine_locks[engine.id]:
            held = [lora_name for lora_name in self.ledger.resident(engine.id) if lora_name not in self.ledger.pinned]
            for lora_name in self.ledger.resident(engine.id):
                if lora_name not in listed:
                    self.ledger.record_unloaded(engine.id, lora_name)
            for lora_name in sorted(listed):
                if ENGINE_NAME.match(lora_name) and not self.ledger.has(engine.id, lora_name):
                    self.ledger.record_loaded(engine.id, lora_name)
        await self._resolve_pins()
        for lora_name in [*sorted(self.ledger.pinned), *held]:
            manifest = self.manifests.get(lora_name)
            if manifest is None or self.ledger.has(engine.id, lora_name):
                continue
            try:
                await self.ensure_loaded(engine, manifest)
            except Exception as exc:
                log.error("%s: could not re-load %s: %s", engine.id, manifest.ref, exc)
        await self.prewarm(engine)

    # -- prewarm -----------------------------------------------------------------------------------------------------
    async def prewarm_targets(self, refs: list[str] | None = None, *, strict: bool = False) -> list[AdapterManifest]:
        """The versions `refs` (default: the configured `prewarm` list) name, in their order: a reference resolves
        as a request's `model` would; a glob pattern (`*`, `team-*`) stands for the adapter names it matches, in
        name order. What cannot be served here is left out with a warning (`strict`: a reference given by name
        raises its error; a pattern's matches are still skipped)."""
        entries = self.prewarm_refs if refs is None else refs
        names: list[str] | None = None
        expanded: list[str] = []
        named: set[str] = set()
        for entry in entries:
            if any(char in entry for char in "*?["):
                if names is None:
                    try:
                        names = sorted(await asyncio.to_thread(self.registry.adapter_names))
                    except RegistryError as exc:
                        log.warning("prewarm: the registry cannot list its adapters (%s); %s skipped", exc, entry)
                        continue
                expanded += [name for name in names if fnmatch.fnmatchcase(name, entry)]
            else:
                expanded.append(entry)
                named.add(entry)
        manifests: dict[str, AdapterManifest] = {}
        for ref in dict.fromkeys(expanded):
            try:
                target = await self.resolve(ref)
            except GatewayError as exc:
                if strict and ref in named:
                    raise
                log.warning("prewarm: %s skipped: %s", ref, exc.message)
                continue
            if target.manifest is not None:
                manifests.setdefault(target.manifest.engine_name, target.manifest)
        return list(manifests.values())

    async def prewarm(self, engine: Engine, wanted: list[AdapterManifest] | None = None) -> list[str]:
        """Fill `engine`'s free CPU slots (never evicting) with the versions `wanted` (default: the configured
        prewarm list's, `prewarm_targets`) whose rendezvous home it is over every engine the gateway knows, healthy
        or not (but not given up), and that no engine holds yet, most wanted first; the refs it loaded.

        Called before a (re)started or joining engine takes traffic, so the loads (each a stall of the whole engine
        in vLLM) happen while nothing runs there. Placement then finds each adapter on its home, as several gateway
        replicas do without talking (they warm the same homes); an adapter already served elsewhere stays there (a
        joining engine moves nothing already loaded). At most `max_loading_fraction` of the engines warm at once;
        no load starts after `prewarm_timeout_s`."""
        if wanted is None and not self.prewarm_refs:
            return []
        started = time.monotonic()
        deadline = started + self.prewarm_timeout_s
        if wanted is None:
            try:
                wanted = await self.prewarm_targets()
            except Exception:
                log.exception("%s: prewarm could not list its adapters", engine.id)
                return []
        known = [e.id for e in self.engines.values() if not e.gave_up and e.id in self.ledger.engines()]
        homed = [m for m in wanted if engine.id in known and rendezvous_order(known, m.engine_name)[0] == engine.id]
        engine.warming = bool(homed)
        try:
            loaded = await self._prewarm_homed(engine, homed, deadline)
        finally:
            engine.warming = False
        if homed:
            log.info(
                "%s: prewarmed %d of the %d adapters homed here in %.1fs",
                engine.id,
                len(loaded),
                len(homed),
                time.monotonic() - started,
            )
        return loaded

    async def _prewarm_homed(self, engine: Engine, homed: list[AdapterManifest], deadline: float) -> list[str]:
        """Load `homed` (most wanted first) into `engine`'s free slots until it is full or `deadline`; the refs
        loaded."""
        loaded: list[str] = []
        free = self.ledger.slots(engine.id) - len(self.ledger.resident(engine.id))
        if engine.cpu_slots and free > engine.cpu_slots:
            # More will be registered than vLLM's CPU cache holds: the last loaded stay in it (its LRU), so load the
            # most wanted last (the choice of which to load stays the most wanted first)
            unheld = [m for m in homed if not self.ledger.holders(m.engine_name)]
            homed = list(reversed(unheld[:free]))
        for manifest in homed:
            if len(self.ledger.resident(engine.id)) >= self.ledger.slots(engine.id):
                break
            if time.monotonic() >= deadline:
                log.warning("%s: prewarm stopped after %.0fs (prewarm_timeout_s)", engine.id, self.prewarm_timeout_s)
                break
            if self.ledger.holders(manifest.engine_name):
                continue
            async with self._warm_slot():
                try:
                    if await self.ensure_loaded(engine, manifest, evict=False):
                        loaded.append(manifest.ref)
                except Exception as exc:  # one adapter that fails to load does not keep the engine from the others
                    why = getattr(exc, "message", exc)
                    log.error("%s: prewarm could not load %s: %s", engine.id, manifest.ref, why)
        return loaded

    def _warm_slot(self) -> asyncio.Semaphore:
        if self._warm_gate is None:
            self._warm_gate = asyncio.Semaphore(
                max(1, math.floor(len(self.ledger.engines()) * self.policy.max_loading_fraction))
            )
        return self._warm_gate

    async def on_engine_down(self, engine: Engine) -> None:
        log.warning(
            "%s: down; its adapters (%s) will be re-loaded when it is back",
            engine.id,
            ", ".join(self.ledger.resident(engine.id)) or "none",
        )

    async def reconcile(self, engine: Engine) -> None:
        """Align the ledger with what the engine lists (another gateway replica may have loaded adapters), and load
        a pinned adapter it lost (an engine restarted between two health checks)."""
        async with self._engine_locks[engine.id]:
            listed = await self._engine_adapters(engine)
            known = set(self.ledger.resident(engine.id))
            for lora_name in sorted(listed - known):
                if ENGINE_NAME.match(lora_name):
                    self.ledger.record_loaded(engine.id, lora_name)
            for lora_name in known - listed:
                if not self._loading[lora_name]:
                    log.warning("%s: %s vanished from the engine; dropping it from the ledger", engine.id, lora_name)
                    self.ledger.record_unloaded(engine.id, lora_name)
        for lora_name in sorted(self.ledger.pinned - listed):
            manifest = self.manifests.get(lora_name)
            if manifest is not None and not self._loading[lora_name]:
                await self.ensure_loaded(engine, manifest)


def _upstream_message(response: Reply) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message", response.text))
        if isinstance(body, dict) and "message" in body:
            return str(body["message"])
    except ValueError:
        pass
    return response.text.strip()[:300] or f"status {response.status}"
