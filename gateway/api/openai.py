"""OpenAI-compatible routes besides the completions (gateway.api.completions): the model list and vLLM's runtime
adapter endpoints. A key sees only the models it may use; the others are as missing as a model that does not exist.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from adapters_registry import AdapterManifest
from adapters_registry.errors import RegistryError
from adapters_registry.manifest import RolloutPolicy
from gateway.adapters import refusal_reason
from gateway.deps import Gateway, GatewayDep, PrincipalDep
from gateway.errors import InvalidRequest, LoRANotFound, ModelNotFound, Unavailable

router = APIRouter()


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    """An inline request-body schema for /openapi.json (the handlers read raw JSON)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


LOAD_BODY = _body(
    {
        "type": "object",
        "required": ["lora_name"],
        "properties": {"lora_name": {"type": "string"}, "lora_path": {"type": "string"}},
    }
)
UNLOAD_BODY = _body({"type": "object", "required": ["lora_name"], "properties": {"lora_name": {"type": "string"}}})


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


@router.get("/version")
async def version(gateway: GatewayDep) -> Response:
    """vLLM's `/version`, from an engine (every engine runs the same vLLM)."""
    engine = next((e for e in gateway.supervisor.engines.values() if e.healthy), None)
    if engine is None:
        raise Unavailable("no engine is ready yet; retry shortly", code="engines_not_ready")
    reply = await gateway.upstream.get(f"{engine.url}/version", timeout_s=10)
    return Response(reply.body, status_code=reply.status, media_type="application/json")


@router.get("/health")
async def health(gateway: GatewayDep) -> Response:
    """vLLM's `/health`: 200 while an engine can answer (the gateway's own probes are /healthz and /readyz)."""
    if any(e.healthy for e in gateway.supervisor.engines.values()):
        return Response(status_code=200)
    raise Unavailable("no engine is ready yet; retry shortly", code="engines_not_ready")


@router.get("/v1/models")
async def list_models(gateway: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    """The base and every adapter version this gateway can serve, by every name `model` accepts.

    As in vLLM, every adapter card's `parent` is the base model; loragate's lineage is in fields of its own (`ref`:
    the version, `resolves_to` on the `name` and `name:alias` cards, `aliases`, `digest`, `status`). Versions this
    gateway would refuse (merge-only, a rank above the engines', another base) are left out: `retrieve` says why."""
    cards = await _all_cards(gateway)
    return {"object": "list", "data": [card for card in cards if gateway.security.visible_card(principal, card)]}


async def _all_cards(gateway: Gateway) -> list[dict[str, Any]]:
    manifests = await asyncio.to_thread(gateway.registry.list_adapters)
    manifests = [m for m in manifests if _refusal(gateway, m) is None]
    names = sorted({m.name for m in manifests})
    records = dict(
        zip(
            names,
            await asyncio.gather(*(asyncio.to_thread(gateway.registry.alias_records, n) for n in names)),
            strict=True,
        )
    )
    aliases = {name: {alias: record.version for alias, record in records[name].items()} for name in names}
    cards: list[dict[str, Any]] = [_base_card(gateway)]
    latest: dict[str, AdapterManifest] = {}
    for manifest in sorted(manifests, key=lambda m: (m.name, m.version)):
        latest[manifest.name] = manifest
        cards.append(
            _adapter_card(gateway, manifest.ref, manifest, aliases=_alias_names(manifest, aliases[manifest.name]))
        )
    for name, manifest in latest.items():
        cards.append(_adapter_card(gateway, name, manifest, resolves_to=manifest.ref))
        for alias, record in sorted(records[name].items()):
            target = next((m for m in manifests if m.name == name and m.version == record.version), None)
            if target is not None:
                card = _adapter_card(gateway, f"{name}:{alias}", target, resolves_to=target.ref)
                if record.split is not None:
                    split = record.split
                    card["split"] = _split(f"{name}@{split.version}", split.weight, split.policy)
                if record.shadow is not None:
                    card["shadow"] = _shadow(f"{name}@{record.shadow.version}", record.shadow.percent)
                cards.append(card)
    return cards


def _split(candidate: str, weight: int, policy: RolloutPolicy | None) -> dict[str, Any]:
    """An alias card's rollout in progress: `weight` percent of its requests go to `candidate` (and the policy
    that stops it, when it has one)."""
    split: dict[str, Any] = {"candidate": candidate, "weight": weight}
    if policy is not None:
        split["policy"] = policy.model_dump(mode="json")
    return split


def _shadow(version: str, percent: int) -> dict[str, Any]:
    """An alias card's shadow: a copy of `percent` percent of its requests also goes to `version`."""
    return {"version": version, "percent": percent}


def _refusal(gateway: Gateway, manifest: AdapterManifest) -> str | None:
    adapters = gateway.adapters
    return refusal_reason(manifest, adapters.bound_base, adapters.max_lora_rank() or manifest.r)


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, gateway: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    """The `/v1/models` entry of any name `model` accepts (the OpenAI SDK's `models.retrieve`); a version this
    gateway would refuse has `status: "refused"` and the reason in `refusal`."""
    gateway.security.check_model(principal, model_id)  # a model this key may not use is as missing as any other
    if model_id == gateway.base_name:
        return _base_card(gateway)
    resolution = await gateway.adapters.resolution_for(model_id)
    manifest = resolution.current
    if manifest.base != gateway.adapters.bound_base:
        raise ModelNotFound(model_id)
    if model_id != manifest.ref:  # `name`, `name:alias`, `name@sha256:...`: it resolves to a version
        card = _adapter_card(gateway, model_id, manifest, resolves_to=manifest.ref)
        if resolution.candidate is not None:
            card["split"] = _split(resolution.candidate.ref, resolution.weight, resolution.policy)
        if resolution.shadow is not None:
            card["shadow"] = _shadow(resolution.shadow.ref, resolution.shadow_percent)
    else:
        aliases = await asyncio.to_thread(gateway.registry.aliases, manifest.name)
        card = _adapter_card(gateway, model_id, manifest, aliases=_alias_names(manifest, aliases))
    if (reason := _refusal(gateway, manifest)) is not None:
        card.update(status="refused", refusal=reason)
    return card


def _alias_names(manifest: AdapterManifest, aliases: dict[str, int]) -> list[str]:
    """`name:alias` for each alias of the adapter that points at this version."""
    return [f"{manifest.name}:{alias}" for alias, version in sorted(aliases.items()) if version == manifest.version]


def _base_card(gateway: Gateway) -> dict[str, Any]:
    live = any(engine.healthy for engine in gateway.supervisor.engines.values())
    return _card(gateway.base_name, None, gateway.base_name, status="loaded" if live else "loading")


def _card(model_id: str, parent: str | None, root: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "loragate",
        "root": root,
        "parent": parent,
        **extra,
    }


def _adapter_card(
    gateway: Gateway,
    model_id: str,
    manifest: AdapterManifest,
    *,
    aliases: list[str] | None = None,
    resolves_to: str | None = None,
) -> dict[str, Any]:
    try:
        created = int(datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        created = 0
    lineage: dict[str, Any] = {"resolves_to": resolves_to} if resolves_to is not None else {"aliases": aliases or []}
    card = _card(
        model_id,
        gateway.base_name,
        manifest.ref,
        ref=manifest.ref,
        adapter=manifest.name,
        version=manifest.version,
        digest=manifest.digest,
        **lineage,
        status=gateway.adapters.status(manifest.engine_name),
        serving=manifest.serving,
    )
    card["created"] = created
    return card


@router.post("/v1/load_lora_adapter", openapi_extra=LOAD_BODY)
async def load_lora_adapter(request: Request, gateway: GatewayDep) -> Response:
    """vLLM's runtime endpoint, with vLLM's answers: `lora_path` registers that folder under `lora_name` (a new
    version when its content is new) and loads it; a name already loaded needs `load_inplace`. Without `lora_path`,
    `lora_name` may name an adapter already in the registry (loragate's addition)."""
    body = await read_json(request)
    name, path = body.get("lora_name"), body.get("lora_path")
    both = InvalidRequest("Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
    if not isinstance(name, str) or not name or (path is not None and not isinstance(path, str)):
        raise both
    if name == gateway.base_name:
        raise InvalidRequest(f"The lora adapter '{name}' conflicts with a served base model.", param="lora_name")
    if path is not None:
        gateway.security.check_load_path(path)
        if not (Path(path) / "adapter_config.json").is_file():
            raise LoRANotFound(f"Loading lora {name} failed: No adapter found for {path}")
        if body.get("load_inplace") is not True and await _loaded_somewhere(gateway, name):
            raise InvalidRequest(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
                param="lora_name",
            )
        try:
            await asyncio.to_thread(
                gateway.registry.push, Path(path), name, gateway.adapters.bound_base, source="vllm-load-lora-adapter"
            )
        except RegistryError as exc:
            raise InvalidRequest(f"Loading lora {name} failed: {exc}", param="lora_path") from exc
        gateway.adapters.resolver.forget(name)
    try:
        target = await gateway.adapters.resolve(name)
    except ModelNotFound as exc:
        raise both from exc
    request.state.adapter = target.label
    lease = await gateway.adapters.acquire(target.manifest, request.state.request_id)
    lease.release()
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def _loaded_somewhere(gateway: Gateway, name: str) -> bool:
    try:
        manifest = await gateway.adapters.manifest_for(name)
    except ModelNotFound:
        return False
    return bool(gateway.adapters.ledger.holders(manifest.engine_name))


@router.post("/v1/unload_lora_adapter", openapi_extra=UNLOAD_BODY)
async def unload_lora_adapter(request: Request, gateway: GatewayDep) -> Response:
    """vLLM's runtime endpoint: the version `lora_name` names leaves every engine that holds it."""
    body = await read_json(request)
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'lora_name' needs to be provided to unload a LoRA adapter.", param="lora_name")
    missing = LoRANotFound(f"The lora adapter '{name}' cannot be found.")
    try:
        target = await gateway.adapters.resolve(name)
    except ModelNotFound as exc:
        raise missing from exc
    request.state.adapter = target.label
    lora_name = target.lora_name
    holders = gateway.adapters.ledger.holders(lora_name) if lora_name else []
    if not holders:
        raise missing
    for engine_id in holders:
        await gateway.adapters.unload(gateway.supervisor.engines[engine_id], lora_name or "")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
