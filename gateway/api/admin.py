"""Admin routes under /admin (engines, adapter load/unload/pin, registry reload) and the /healthz, /readyz probes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters_registry import open_registry
from adapters_registry.aliases import check_gate, describe_state
from adapters_registry.errors import RegistryError
from adapters_registry.golden import GoldenRow, normalize_rows
from adapters_registry.manifest import AdapterManifest, AliasRecord, ParityGate, RolloutPolicy
from gateway.deps import Gateway, GatewayDep
from gateway.errors import (
    AdapterRefused,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    ParityRefused,
    Unavailable,
    from_registry_error,
)
from gateway.parity import run_gate
from gateway.readiness import registry_readiness

log = logging.getLogger(__name__)
router = APIRouter(prefix="/admin", tags=["admin"])
probes = APIRouter(tags=["probes"])


class AdapterAction(BaseModel):
    model: str
    engine: str | None = None


class PrewarmAction(BaseModel):
    models: list[str] | None = None  # references or glob patterns; default: the configured adapters.prewarm


class PolicyIn(RolloutPolicy):
    """A rollout policy as the admin API takes it: a mistyped rule is refused, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GateIn(ParityGate):
    """Parity thresholds as the admin API takes them: a mistyped one is refused, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AliasPromote(BaseModel):
    ref: str
    alias: str
    weight: int | None = Field(default=None, ge=0, le=100)  # a rollout: this percent of the alias's requests
    policy: PolicyIn | None = None  # with a weight 1-99: when gateways stop the rollout by themselves
    shadow: str | None = None  # a version that gets a copy of `shadow_percent` percent of the alias's requests
    shadow_percent: int | None = Field(default=None, ge=0, le=100)  # 0 stops the alias's shadow
    gate: GateIn | None = None  # the alias's parity thresholds, kept for its later promotes
    golden: list[Any] | None = None  # golden prompts for this promote's parity gate instead of the versions' own
    golden_max_tokens: int | None = Field(default=None, ge=1, le=4096)
    force: bool = False  # skip the parity gate (the audit line says so)

    def shadow_move(self) -> tuple[str, int] | None:
        if self.shadow is None and self.shadow_percent is None:
            return None
        if self.shadow_percent is None:
            raise InvalidRequest(
                "`shadow` needs `shadow_percent` (the share of the alias's requests to copy)", param="shadow_percent"
            )
        if self.shadow is None and self.shadow_percent != 0:
            raise InvalidRequest("`shadow_percent` needs `shadow` (0 alone stops the alias's shadow)", param="shadow")
        return self.shadow or "", self.shadow_percent


class AliasRollback(BaseModel):
    name: str
    alias: str


def engine_view(gateway: Gateway, engine_id: str) -> dict[str, Any]:
    engine = gateway.supervisor.engines[engine_id]
    ledger = gateway.adapters.ledger
    resident = []
    for lora_name in ledger.resident(engine_id) if engine_id in ledger.engines() else []:
        manifest = gateway.adapters.manifests.get(lora_name)
        resident.append(
            {"engine_name": lora_name, "ref": manifest.ref if manifest else None, "pinned": lora_name in ledger.pinned}
        )
    return {
        "id": engine.id,
        "url": engine.url,
        "healthy": engine.healthy,
        "warming": engine.warming,
        "pid": engine.process.pid if engine.process else None,
        "restarts": engine.restarts,
        "gave_up": engine.gave_up,
        "last_error": engine.last_error,
        "inflight": engine.inflight,
        "running": engine.running,
        "waiting": engine.waiting,
        "max_loras": engine.max_loras,
        "slots": engine.slots,
        "cpu_slots": engine.cpu_slots or engine.slots,
        "resident": resident,
    }


@router.get("/engines")
async def list_engines(gateway: GatewayDep) -> dict[str, Any]:
    return {"engines": [engine_view(gateway, engine_id) for engine_id in gateway.supervisor.engines]}


def _engine(gateway: Gateway, engine_id: str) -> Any:
    engine = gateway.supervisor.engines.get(engine_id)
    if engine is None:
        raise InvalidRequest(f"no engine '{engine_id}'", param="engine")
    if not engine.healthy:
        raise Unavailable(f"engine '{engine_id}' is not healthy", code="engine_unhealthy")
    return engine


@router.post("/adapters/load")
async def load_adapter(action: AdapterAction, request: Request, gateway: GatewayDep) -> dict[str, Any]:
    target = await gateway.adapters.resolve(action.model)
    request.state.adapter = target.label
    if target.manifest is None:
        raise InvalidRequest("the base model is always loaded", param="model")
    if action.engine:
        engine = _engine(gateway, action.engine)
        if not await gateway.adapters.ensure_loaded(engine, target.manifest):
            raise Unavailable(f"engine '{engine.id}' has no free or evictable slot", code="no_adapter_slot")
        engine_id = engine.id
    else:
        lease = await gateway.adapters.acquire(target.manifest, request.state.request_id)
        lease.release()
        engine_id = lease.engine.id
    return {"model": action.model, "ref": target.manifest.ref, "engine_name": target.lora_name, "engine": engine_id}


@router.post("/adapters/prewarm")
async def prewarm_adapters(gateway: GatewayDep, action: PrewarmAction | None = None) -> dict[str, Any]:
    """Warm every healthy engine now with its share of `models` (or of `adapters.prewarm`): the versions whose
    rendezvous home it is and that no engine holds yet, into free CPU slots only (each load stalls that engine)."""
    models = action.models if action is not None and action.models is not None else None
    if models is None and not gateway.adapters.prewarm_refs:
        raise InvalidRequest("nothing to prewarm: give `models` or set adapters.prewarm", param="models")
    if models is not None and not all(models):
        raise InvalidRequest("`models` must be a list of non-empty strings", param="models")
    wanted = await gateway.adapters.prewarm_targets(models, strict=True)
    engines = [engine for engine in gateway.supervisor.engines.values() if engine.healthy]
    loaded = await asyncio.gather(*(gateway.adapters.prewarm(engine, wanted) for engine in engines))
    return {"loaded": {engine.id: refs for engine, refs in zip(engines, loaded, strict=True)}}


@router.post("/adapters/unload")
async def unload_adapter(action: AdapterAction, request: Request, gateway: GatewayDep) -> dict[str, Any]:
    target = await gateway.adapters.resolve(action.model)
    request.state.adapter = target.label
    lora_name = target.lora_name
    if lora_name is None:
        raise InvalidRequest("the base model cannot be unloaded", param="model")
    if lora_name in gateway.adapters.ledger.pinned:
        raise InvalidRequest(f"{target.label} is pinned; unpin it first", param="model")
    holders = [action.engine] if action.engine else gateway.adapters.ledger.holders(lora_name)
    holders = [engine_id for engine_id in holders if gateway.adapters.ledger.has(engine_id, lora_name)]
    if not holders:
        raise ModelNotFound(action.model)
    for engine_id in holders:
        await gateway.adapters.unload(_engine(gateway, engine_id), lora_name)
    return {"model": action.model, "ref": target.label, "unloaded_from": holders}


@router.post("/adapters/pin")
async def pin_adapter(action: AdapterAction, request: Request, gateway: GatewayDep) -> dict[str, Any]:
    manifest = await gateway.adapters.pin(action.model)
    request.state.adapter = manifest.ref
    return {"model": action.model, "ref": manifest.ref, "engine_name": manifest.engine_name, "pinned": True}


@router.post("/adapters/unpin")
async def unpin_adapter(action: AdapterAction, request: Request, gateway: GatewayDep) -> dict[str, Any]:
    target = await gateway.adapters.resolve(action.model)
    request.state.adapter = target.label
    if target.lora_name is None or target.lora_name not in gateway.adapters.ledger.pinned:
        raise InvalidRequest(f"{target.label} is not pinned", param="model")
    gateway.adapters.unpin(target.lora_name)
    return {"model": action.model, "ref": target.label, "pinned": False}


async def _move_alias(gateway: Gateway, move: Any, *args: str, **kwargs: Any) -> dict[str, Any]:
    registry = gateway.registry
    try:
        manifest = await asyncio.to_thread(move, *args, **kwargs)  # audited by the registry hook, as the calling key
        record = (await asyncio.to_thread(registry.alias_records, manifest.name)).get(args[-1])
    except RegistryError as exc:
        raise from_registry_error(exc, args[0], param="alias") from exc
    gateway.adapters.resolver.forget(manifest.name)  # this replica serves the move at once
    unloaded = {}  # a version the move took out of the alias: unloaded once its calls in flight end, unless served
    for version in _lost_weight(record):
        unloaded[f"{manifest.name}@{version}"] = await gateway.adapters.retire(manifest.name, version)
    return {
        "name": manifest.name,
        "alias": args[-1],
        "ref": manifest.ref,
        "digest": manifest.digest,
        "serves": describe_state(record),
        "split": record.split.model_dump(exclude_none=True) if record is not None and record.split else None,
        "shadow": record.shadow.model_dump() if record is not None and record.shadow else None,
        "unloaded": unloaded,
    }


def _lost_weight(record: AliasRecord | None) -> list[int]:
    """The versions the alias's last move took out of it (its old version, candidate or shadow)."""
    if record is None or not record.history:
        return []
    move = record.history[-1]
    before = {move.from_version} | {s.version for s in (move.from_split, move.from_shadow) if s is not None}
    return sorted(v for v in before - set(record.versions()) if v is not None)


@router.post("/aliases/promote")
async def promote_alias(body: AliasPromote, gateway: GatewayDep) -> dict[str, Any]:
    """Point `name:alias` at the version `ref` names, or with `weight` roll it out to that percent of the alias's
    requests (what `loragate registry promote [--weight N]` does). Before the version gets any of the alias's
    traffic it is loaded on the engines that hold the alias's version now (`warmed_on`), so no request pays its
    load at the flip, and it passes the parity gate (gateway/parity.py: its golden prompts against the alias's
    version, `parity`; refused with 409 and the figures, unless `force`); a version this gateway would refuse is
    refused before anything moves."""
    shadow = body.shadow_move()
    golden = _golden(body)
    gate = _gate(body)
    warmed: list[str] = []
    parity: dict[str, Any] | None = None
    if body.weight != 0:
        warmed = await _warm(gateway, body.ref, body.alias)
        parity = await _parity(gateway, body, gate, golden)
    if shadow is not None and shadow[1]:  # the shadow's copies are not the callers', but warm it all the same
        await _warm(gateway, shadow[0], body.alias)
    moved = await _move_alias(
        gateway,
        gateway.registry.promote,
        body.ref,
        body.alias,
        weight=body.weight,
        policy=RolloutPolicy(**body.policy.model_dump()) if body.policy is not None else None,
        shadow=shadow,
        gate=gate,
        parity=parity,
    )
    return {**moved, "warmed_on": warmed, "parity": parity}


def _gate(body: AliasPromote) -> ParityGate | None:
    if body.gate is None:
        return None
    gate = ParityGate(**body.gate.model_dump())
    try:
        check_gate(gate)
    except RegistryError as exc:
        raise InvalidRequest(str(exc), param="gate") from exc
    return gate


def _golden(body: AliasPromote) -> list[GoldenRow] | None:
    if body.golden is None:
        return None
    try:
        return normalize_rows(body.golden, "golden")
    except RegistryError as exc:
        raise InvalidRequest(str(exc), param="golden") from exc


async def _parity(
    gateway: Gateway, body: AliasPromote, gate: ParityGate | None, golden: list[GoldenRow] | None
) -> dict[str, Any] | None:
    """Run the parity gate for a promote that gives `body.ref` traffic; what the audit line records of it (None: the
    move gives no version new traffic, or the registry's promote refuses it). ParityRefused when it fails."""
    adapters, registry = gateway.adapters, gateway.registry
    try:
        candidate = (await adapters.resolve(body.ref)).manifest
    except GatewayError:
        return None  # refused or unknown: the registry's promote (or _warm, audited) says so
    if candidate is None:
        return None
    try:
        current: AdapterManifest | None = await adapters.manifest_for(f"{candidate.name}:{body.alias}")
    except GatewayError:
        current = None  # a new alias: the candidate is judged on its own
    if current is not None and current.version == candidate.version:
        return None  # the alias's own version: nothing gets new traffic
    alias = f"{candidate.name}:{body.alias}"

    def counted(outcome: str) -> None:
        gateway.metrics.parity_gated(alias, str(candidate.version), outcome)

    if body.force:
        counted("forced")
        return {"forced": True}
    try:
        record = (await asyncio.to_thread(registry.alias_records, candidate.name)).get(body.alias)
        thresholds = gate or (record.gate if record is not None else None) or ParityGate()
        rows, source, max_tokens = await _golden_rows(gateway, golden, body, candidate, current)
    except RegistryError as exc:
        raise from_registry_error(exc, body.ref, param="ref") from exc
    if not rows:
        counted("skipped")
        return {"skipped": f"no golden prompts: neither {candidate.ref} nor the alias's version has any"}
    if current is not None:
        current = (await adapters.resolve(current.ref)).manifest  # known to placement like any served version
    verdict = await run_gate(gateway.proxy, thresholds, candidate, current, rows, source, max_tokens)
    figures = verdict.to_dict() | {"gate": thresholds.model_dump(mode="json")}
    if not verdict.breaches:
        counted("passed")
        return figures
    counted("refused")
    message = (
        f"parity gate: {candidate.ref} may not get traffic on {alias}: {'; '.join(verdict.breaches)}; on "
        f"{len(rows)} golden prompts from {source}; nothing moved (force promotes anyway, audited)"
    )
    log.warning("%s", message)
    await adapters.retire(candidate.name, candidate.version)  # warmed for nothing: unloaded unless served
    with registry.audited("promote", f"{body.ref} -> :{body.alias}", None, alias=body.alias, parity=figures):
        raise ParityRefused(message, figures)


async def _golden_rows(
    gateway: Gateway,
    golden: list[GoldenRow] | None,
    body: AliasPromote,
    candidate: AdapterManifest,
    current: AdapterManifest | None,
) -> tuple[list[GoldenRow], str, int | None]:
    """The prompts the gate runs: the request's, else the candidate's own, else the current version's."""
    if golden is not None:
        return golden, "the request", body.golden_max_tokens
    for version in (candidate, current):
        if version is not None and version.golden is not None:
            rows = await asyncio.to_thread(gateway.registry.golden_rows, version)
            tokens = body.golden_max_tokens or version.golden.max_tokens
            return rows, f"{version.ref} ({version.golden.source})", tokens
    return [], "", None


async def _warm(gateway: Gateway, ref: str, alias: str) -> list[str]:
    """Load the version `ref` names where `name:alias`'s version is resident; the engines it was loaded on."""
    adapters = gateway.adapters
    try:
        candidate = await adapters.resolve(ref)
    except AdapterRefused:  # (rank, merge-only, another base) refused before the alias moves, and audited as such
        with gateway.registry.audited("promote", f"{ref} -> :{alias}", None, alias=alias):
            raise
    except GatewayError:
        return []  # an unknown version: the registry's promote refuses it (audited)
    if candidate.manifest is None:
        return []  # the base model: the registry's promote refuses it
    try:
        current = await adapters.manifest_for(f"{candidate.manifest.name}:{alias}")
    except GatewayError:
        return []  # no such alias yet: the promote says so, or creates it
    warmed = []
    for engine_id in adapters.ledger.holders(current.engine_name):
        engine = gateway.supervisor.engines.get(engine_id)
        if engine is not None and engine.healthy and await adapters.ensure_loaded(engine, candidate.manifest):
            warmed.append(engine_id)
    return warmed


@router.post("/aliases/rollback")
async def rollback_alias(body: AliasRollback, gateway: GatewayDep) -> dict[str, Any]:
    """Move `name:alias` back to the version it pointed at before its last move."""
    return await _move_alias(gateway, gateway.registry.rollback, body.name, body.alias)


@router.post("/registry/reload")
async def reload_registry(gateway: GatewayDep) -> dict[str, Any]:
    try:
        registry = await asyncio.to_thread(open_registry, gateway.settings.registry)
        adapters = await asyncio.to_thread(registry.list_adapters)
    except RegistryError as exc:
        raise Unavailable(f"registry unreachable: {exc}", code="registry_unavailable") from exc
    registry.audit = gateway.registry.audit  # registry writes through the gateway stay audited
    gateway.registry = registry
    gateway.adapters.registry = gateway.adapters.resolver.registry = registry
    gateway.adapters.resolver.forget()
    return {"registry": gateway.settings.registry, "adapter_versions": len(adapters)}


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz")
async def readyz(request: Request, gateway: GatewayDep) -> JSONResponse:
    """Ready: a healthy engine, pinned adapters resident, not draining, and the registry reachable recently (checked
    in the background at most every 10 s, tolerated down for 5 min: see gateway/readiness.py)."""
    problems = []
    healthy = [engine for engine in gateway.supervisor.engines.values() if engine.healthy]
    if not healthy:
        warming = [engine.id for engine in gateway.supervisor.engines.values() if engine.warming]
        problems.append("no healthy engine" + (f" ({', '.join(warming)} warming adapters)" if warming else ""))
    for engine in gateway.supervisor.engines.values():
        if engine.gave_up:
            problems.append(f"{engine.id}: restart budget spent ({engine.last_error})")
    for engine in healthy:
        if not gateway.adapters.pinned_resident(engine):
            problems.append(f"{engine.id}: pinned adapters not resident")
    if registry_problem := await registry_readiness(request.app.state).problem(gateway.registry):
        problems.append(registry_problem)
    if gateway.draining:
        problems.append("draining")
    body = {
        "ready": not problems,
        "problems": problems,
        "engines": {e.id: e.healthy for e in gateway.supervisor.engines.values()},
    }
    return JSONResponse(body, status_code=200 if not problems else 503)
