"""The security layer: pure decisions, and the middleware in front of a small in-process FastAPI app."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from adapters_registry.local import LocalStore
from gateway.auth import (
    AdminDep,
    PrincipalDep,
    SecurityMiddleware,
    SecuritySettings,
    bind_host,
    build_security,
    choose_bind,
    path_within_roots,
    route_class,
    usage_total,
)
from gateway.errors import GatewayError
from gateway.keys import KeyStore
from gateway.limits import LimitSettings
from gateway.metrics import GatewayMetrics
from gateway.quotas import Limits, QuotaSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("host", "keyed", "allow", "bound", "warns"),
    [
        ("127.0.0.1", True, False, "127.0.0.1", None),
        ("0.0.0.0", True, False, "0.0.0.0", None),
        ("127.0.0.1", False, False, "127.0.0.1", "loopback only"),
        ("::1", False, False, "::1", "loopback only"),
        ("localhost", False, False, "localhost", "loopback only"),
        ("0.0.0.0", False, False, "127.0.0.1", "binding 127.0.0.1 instead of 0.0.0.0"),
        ("0.0.0.0", False, True, "0.0.0.0", "WITHOUT authentication on 0.0.0.0"),
    ],
)
def test_bind_host(host: str, keyed: bool, allow: bool, bound: str, warns: str | None) -> None:
    chosen, warning = bind_host(host, keyed, allow)
    assert chosen == bound
    if warns is None:
        assert warning is None
    else:
        assert warning is not None and warns in warning


def test_path_within_roots(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    (root / "acme").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, root / "escape")
    os.symlink(root / "acme", tmp_path / "link-in")
    roots = [root]
    cases = {
        str(root / "acme"): root / "acme",
        str(root / "new"): root / "new",
        str(tmp_path / "link-in"): root / "acme",  # a symlink into a root is judged by its target
        str(root / "escape"): None,
        str(root / "escape" / "x"): None,
        str(root / ".." / "elsewhere"): None,
        str(root / "acme" / ".." / "acme"): None,  # any '..' is refused, even one that stays inside
        "acme": None,
        "": None,
        "/etc/passwd": None,
        str(root) + "\x00": None,
        str(tmp_path / "adapters-evil"): None,  # a sibling with the root's name as prefix
    }
    for raw, expected in cases.items():
        assert path_within_roots(raw, roots) == (expected.resolve() if expected else None), raw
    assert path_within_roots(str(root / "acme"), []) is None


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/healthz", "open"),
        ("/openapi.json", "open"),
        ("/metrics", "metrics"),
        ("/admin", "admin"),
        ("/admin/adapters/load", "admin"),
        ("/administrator", "user"),
        ("/v1/load_lora_adapter", "admin"),
        ("/v1/unload_lora_adapter", "admin"),
        ("/v1/chat/completions", "user"),
        ("/v1/models", "user"),
    ],
)
def test_route_class(path: str, kind: str) -> None:
    assert route_class("POST", path, SecuritySettings()) == kind


# --- the middleware over a tiny app ---------------------------------------------------------------------------------


def card(model_id: str, adapter: str | None) -> dict[str, Any]:
    return {"id": model_id, "root": "tiny", "parent": None if adapter is None else "tiny", "adapter": adapter}


def make_app(store: LocalStore, settings: SecuritySettings, metrics: GatewayMetrics | None = None) -> FastAPI:
    """Routes shaped like the gateway's: the middleware does access, quotas and model filtering around them."""
    app = FastAPI()
    app.state.security = build_security(settings, store, metrics, base_name="tiny")

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers())

    @app.post("/v1/chat/completions")
    async def chat(request: Request, principal: PrincipalDep) -> dict[str, Any]:
        body = await request.json()
        return {"who": principal.who, "model": body["model"], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [card("tiny", None), card("acme-bot", "acme-bot"), card("acme-bot@2", "acme-bot")]
        return {"object": "list", "data": [*data, card("globex:prod", "globex")]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> dict[str, Any]:
        return {"loaded": (await request.json())["lora_name"]}

    @app.post("/admin/promote")
    async def promote(principal: AdminDep) -> dict[str, str]:
        return {"done": principal.who}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/metrics")
    async def exposition() -> str:
        return "m 1"

    app.add_middleware(SecurityMiddleware)
    return app


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def client_for(app: FastAPI, key: str | None = None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=headers)


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def test_local_mode_allows_everything(store: LocalStore) -> None:
    async with client_for(make_app(store, SecuritySettings())) as client:
        reply = await client.post("/v1/chat/completions", json={**CHAT, "model": "globex"})
        assert reply.json()["who"] == "local"
        assert (await client.post("/admin/promote")).json() == {"done": "local"}
        listed = (await client.get("/v1/models")).json()["data"]
        assert [c["id"] for c in listed] == ["tiny", "acme-bot", "acme-bot@2", "globex:prod"]


async def test_keyed_mode_access_admin_and_audit(store: LocalStore) -> None:
    keys = KeyStore(store, cache_ttl_s=0)
    acme = keys.create("acme", adapters=("acme*",))
    ops = keys.create("ops", admin=True)
    app = make_app(store, SecuritySettings(key_cache_ttl_s=0))
    async with client_for(app) as anon:
        missing = await anon.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert (await anon.get("/healthz")).status_code == 200
        assert (await anon.get("/metrics")).status_code == 401
    async with client_for(app, "lg-000000000000-" + "A" * 43) as wrong:
        assert (await wrong.get("/v1/models")).json()["error"]["message"] == "Invalid API key."
    async with client_for(app, acme.secret) as client:
        listed = await client.get("/v1/models")
        assert [c["id"] for c in listed.json()["data"]] == ["tiny", "acme-bot", "acme-bot@2"]
        assert listed.headers["content-length"] == str(len(listed.content))
        ok = await client.post("/v1/chat/completions", json={**CHAT, "model": "acme-bot"})
        assert ok.json()["who"] == f"key:{acme.record.key_id}:acme"
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "acme-bot:prod"})).status_code == 200
        hidden = await client.post("/v1/chat/completions", json={**CHAT, "model": "globex:prod"})
        assert hidden.status_code == 404
        assert hidden.json()["error"] == {
            "message": "The model 'globex:prod' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
        denied = await client.post("/admin/promote", json={"ref": "acme@1", "alias": "prod"})
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "admin_required"
        assert (await client.get("/metrics")).status_code == 403
    async with client_for(app, ops.secret) as admin:
        assert (await admin.post("/admin/promote", json={"ref": "acme@1"})).status_code == 200
        assert (await admin.get("/metrics")).text == '"m 1"'
    events = [(e["who"].split(":")[-1], e["action"], e["target"], e["result"]) for e in app.state.security.audit.read()]
    assert events == [
        ("acme", "admin.POST /admin/promote", None, "denied"),
        ("ops", "admin.POST /admin/promote", "acme@1", "ok"),
    ]


async def test_key_and_adapter_rate_limits_answer_429(store: LocalStore) -> None:
    keys = KeyStore(store, cache_ttl_s=0)
    limited = keys.create("acme", rpm=1)
    other = keys.create("other")
    metrics = GatewayMetrics(registry=CollectorRegistry())
    app = make_app(store, SecuritySettings(quotas=QuotaSettings(adapters={"glob*": Limits(rpm=1)})), metrics)
    async with client_for(app, limited.secret) as client:
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})).status_code == 200
        refused = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "60"
        assert refused.json()["error"] == {
            "message": "Rate limit exceeded: rpm=1 for this API key; retry after 60s.",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    async with client_for(app, other.secret) as client:
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "globex"})).status_code == 200
        shared = await client.post("/v1/chat/completions", json={**CHAT, "model": "globex"})
        assert shared.status_code == 429
        assert shared.json()["error"]["message"].startswith("Rate limit exceeded: rpm=1 for this model")
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})).status_code == 200
    async with client_for(app, "lg-000000000000-" + "A" * 43) as wrong:
        assert (await wrong.get("/v1/models")).status_code == 401
    exposition = metrics.render()[0].decode()
    assert 'loragate_rate_limited_total{limit="rpm",scope="key"} 1.0' in exposition
    assert 'loragate_rate_limited_total{limit="rpm",scope="adapter"} 1.0' in exposition
    assert 'loragate_auth_failures_total{reason="unknown"} 1.0' in exposition


async def test_limits_answer_400_and_431_before_the_app(store: LocalStore) -> None:
    settings = SecuritySettings(
        limits=LimitSettings(max_body_bytes=2000, max_tokens=16, max_json_depth=4, max_headers=20)
    )
    metrics = GatewayMetrics(registry=CollectorRegistry())
    async with client_for(make_app(store, settings, metrics)) as client:
        over = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "max_tokens": 17})
        assert over.status_code == 400
        assert over.json()["error"] == {
            "message": "max_tokens is above the gateway limit max_tokens=16",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "limit_exceeded",
        }
        big = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "pad": "x" * 3000})
        assert big.status_code == 400
        assert "max_body_bytes=2000" in big.json()["error"]["message"]

        async def chunks() -> Any:
            for _ in range(3):
                yield b" " * 1000

        streamed = await client.post("/v1/chat/completions", content=chunks())  # no content-length
        assert streamed.status_code == 400
        deep = await client.post("/v1/chat/completions", content=json.dumps({"model": [[[[["x"]]]]]}))
        assert deep.status_code == 400
        assert "max_json_depth=4" in deep.json()["error"]["message"]
        many = await client.get("/healthz", headers={f"x-h{i}": "1" for i in range(25)})
        assert many.status_code == 431
        fine = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
        assert fine.json()["who"] == "local"
    exposition = metrics.render()[0].decode()
    expected = {"max_tokens": 1, "max_body_bytes": 2, "max_json_depth": 1, "max_headers": 1}
    for limit, count in expected.items():
        assert f'loragate_limit_rejections_total{{limit="{limit}"}} {count}.0' in exposition


def test_required_auth_needs_a_store() -> None:
    with pytest.raises(ValueError, match=r"security\.auth=required needs a registry"):
        build_security(SecuritySettings(auth="required"), None)


async def test_tokens_per_minute_are_paid_from_the_response_usage(store: LocalStore) -> None:
    keys = KeyStore(store, cache_ttl_s=0)
    limited = keys.create("acme", tpm=10)  # a call costs 5 + 7 = 12 tokens: 2 overdrawn, 12 s to pay back
    app = make_app(store, SecuritySettings())
    async with client_for(app, limited.secret) as client:
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})).status_code == 200
        refused = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
        assert refused.status_code == 429
        assert refused.json()["error"]["message"] == "Rate limit exceeded: tpm=10 for this API key; retry after 12s."


async def test_load_by_path_only_inside_roots(store: LocalStore, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    (root / "acme").mkdir(parents=True)
    keys = KeyStore(store, cache_ttl_s=0)
    ops = keys.create("ops", admin=True)
    app = make_app(store, SecuritySettings(path_roots=[root]))
    async with client_for(app, ops.secret) as admin:
        inside = await admin.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(root / "acme")})
        assert inside.json() == {"loaded": "a"}
        for bad in (str(tmp_path), str(root / ".." / "adapters" / "acme"), "relative/acme"):
            refused = await admin.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": bad})
            assert refused.status_code == 403, bad
            assert refused.json()["error"]["code"] == "path_refused"
    results = [(e["action"], e["result"]) for e in app.state.security.audit.read()]
    assert (
        results == [("admin.POST /v1/load_lora_adapter", "ok")] + [("admin.POST /v1/load_lora_adapter", "denied")] * 3
    )


@pytest.mark.parametrize(
    ("raw", "total"),
    [
        (b'{"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}', 7),
        (b'{"id": "x"}', None),
        (
            b'data: {"choices": []}\n\ndata: {"usage": {"prompt_tokens": 2, "completion_tokens": 9}}\n\n',
            11,
        ),
        (b"data: [DONE]\n\n", None),
        (b'{"usage": "lots"}', None),
    ],
)
def test_usage_total(raw: bytes, total: int | None) -> None:
    assert usage_total(raw) == total


def test_choose_bind_reads_the_store(store: LocalStore) -> None:
    assert choose_bind(SecuritySettings(), store, "0.0.0.0")[0] == "127.0.0.1"
    assert choose_bind(SecuritySettings(auth="off"), store, "0.0.0.0")[0] == "127.0.0.1"
    assert choose_bind(SecuritySettings(auth="required"), None, "0.0.0.0") == ("0.0.0.0", None)
    KeyStore(store, cache_ttl_s=0).create("acme")
    assert choose_bind(SecuritySettings(), store, "0.0.0.0") == ("0.0.0.0", None)


async def test_middleware_before_startup_answers_503(store: LocalStore) -> None:
    app = FastAPI()
    app.add_middleware(SecurityMiddleware)
    async with client_for(app) as client:
        reply = await client.get("/v1/models")
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["code"] == "starting"
