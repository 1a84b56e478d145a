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
from gateway.deps import Gateway, GatewayDep, PrincipalDep
from gateway.errors import InvalidRequest, ModelNotFound

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


@router.get("/v1/models")
async def list_models(gateway: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    cards = await _all_cards(gateway)
    return {"object": "list", "data": [card for card in cards if gateway.security.visible_card(principal, card)]}


async def _all_cards(gateway: Gateway) -> list[dict[str, Any]]:
    manifests = await asyncio.to_thread(gateway.registry.list_adapters)
    manifests = [m for m in manifests if m.base == gateway.base_name]
    names = sorted({m.name for m in manifests})
    aliases = dict(
        zip(names, await asyncio.gather(*(asyncio.to_thread(gateway.registry.aliases, n) for n in names)), strict=True)
    )
    base = gateway.base_name
    cards: list[dict[str, Any]] = [_base_card(gateway)]
    latest: dict[str, AdapterManifest] = {}
    for manifest in sorted(manifests, key=lambda m: (m.name, m.version)):
        latest[manifest.name] = manifest
        names_here = _alias_names(manifest, aliases[manifest.name])
        cards.append(_adapter_card(gateway, manifest.ref, manifest, parent=base, aliases=names_here))
    for name, manifest in latest.items():
        cards.append(_adapter_card(gateway, name, manifest, parent=manifest.ref, aliases=[]))
        for alias, version in sorted(aliases[name].items()):
            target = next((m for m in manifests if m.name == name and m.version == version), None)
            if target is not None:
                cards.append(_adapter_card(gateway, f"{name}:{alias}", target, parent=target.ref, aliases=[]))
    return cards


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, gateway: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    """The `/v1/models` entry of any name `model` accepts (the OpenAI SDK's `models.retrieve`)."""
    gateway.security.check_model(principal, model_id)  # a model this key may not use is as missing as any other
    if model_id == gateway.base_name:
        return _base_card(gateway)
    manifest = await gateway.adapters.manifest_for(model_id)
    if manifest.base != gateway.base_name:
        raise ModelNotFound(model_id)
    if model_id != manifest.ref:  # `name`, `name:alias`, `name@sha256:...`: its parent is the version it names
        return _adapter_card(gateway, model_id, manifest, parent=manifest.ref, aliases=[])
    aliases = await asyncio.to_thread(gateway.registry.aliases, manifest.name)
    names = _alias_names(manifest, aliases)
    return _adapter_card(gateway, model_id, manifest, parent=gateway.base_name, aliases=names)


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
    gateway: Gateway, model_id: str, manifest: AdapterManifest, *, parent: str, aliases: list[str]
) -> dict[str, Any]:
    try:
        created = int(datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        created = 0
    card = _card(
        model_id,
        parent,
        gateway.base_name,
        ref=manifest.ref,
        adapter=manifest.name,
        version=manifest.version,
        digest=manifest.digest,
        aliases=aliases,
        status=gateway.adapters.status(manifest.engine_name),
        serving=manifest.serving,
    )
    card["created"] = created
    return card


@router.post("/v1/load_lora_adapter", openapi_extra=LOAD_BODY)
async def load_lora_adapter(request: Request, gateway: GatewayDep) -> Response:
    """vLLM's runtime endpoint: `lora_path` given -> register that folder under `lora_name`, then load it."""
    body = await read_json(request)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("`lora_name` must be a non-empty string", param="lora_name")
    if isinstance(path, str):
        gateway.security.check_load_path(path)
    if path is not None:
        if not isinstance(path, str) or not Path(path).is_dir():
            raise InvalidRequest(f"`lora_path` {path!r} is not a directory on the gateway", param="lora_path")
        try:
            await asyncio.to_thread(
                gateway.registry.push, Path(path), name, gateway.base_name, source="vllm-load-lora-adapter"
            )
        except RegistryError as exc:
            raise InvalidRequest(f"cannot register {path}: {exc}", param="lora_path") from exc
        gateway.adapters.resolver.forget(name)
    target = await gateway.adapters.resolve(name)
    request.state.adapter = target.label
    lease = await gateway.adapters.acquire(target.manifest, request.state.request_id)
    lease.release()
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", openapi_extra=UNLOAD_BODY)
async def unload_lora_adapter(request: Request, gateway: GatewayDep) -> Response:
    body = await read_json(request)
    name = body.get("lora_name")
    target = await gateway.adapters.resolve(name)
    request.state.adapter = target.label
    key = target.key
    holders = gateway.adapters.ledger.holders(key) if key else []
    if not holders:
        raise ModelNotFound(str(name))
    for engine_id in holders:
        await gateway.adapters.unload(gateway.supervisor.engines[engine_id], key or "")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
