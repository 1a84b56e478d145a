"""The security layer: pure decisions, and the whole gateway's checks (middleware, completion and model routes)
in front of a `tests.fakes.FakeEngine`, with keys in the registry's store."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters_registry.local import LocalStore
from adapters_registry.registry import Registry
from gateway.deps import Live
from gateway.keys import KeyStore
from gateway.middleware import RequestHeaders, SecurityMiddleware
from gateway.security import (
    SecuritySettings,
    bind_host,
    build_security,
    choose_bind,
    path_within_roots,
    route_class,
)
from tests.fakes import FakeEngine, fake_gateway


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


# --- the whole gateway over a fake engine ---------------------------------------------------------------------


@pytest.fixture
def keyed_registry(registry: Registry, adapter_dirs: list[Path]) -> Registry:
    """The tiny base, `acme-bot` (two versions, `acme-bot:prod` on the first) and `globex` (`globex:prod`)."""
    registry.push(adapter_dirs[0], "acme-bot", "tiny")
    registry.push(adapter_dirs[1], "acme-bot", "tiny")
    registry.promote("acme-bot@1", "prod")
    registry.push(adapter_dirs[1], "globex", "tiny")
    registry.promote("globex@1", "prod")
    return registry


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    with FakeEngine() as fake:
        yield fake


def gateway_over(engine: FakeEngine, registry: Registry, **security: Any) -> Any:
    return fake_gateway([engine], Path(registry.location), security={"key_cache_ttl_s": 0, **security})


def client_for(url: str, key: str | None = None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=10)


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def admin_events(app: Any, count: int) -> list[dict[str, Any]]:
    """The audit log's admin events, once `count` are there (each is written as its response ends)."""
    deadline = time.monotonic() + 5
    while True:
        events = [e for e in app.state.gateway.security.audit.read() if e["action"].startswith("admin.")]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def listed(client: httpx.Client) -> list[str]:
    return [card["id"] for card in client.get("/v1/models").json()["data"]]


def test_local_mode_allows_everything(engine: FakeEngine, keyed_registry: Registry) -> None:
    with gateway_over(engine, keyed_registry) as (url, _app), client_for(url) as client:
        assert client.post("/v1/chat/completions", json={**CHAT, "model": "globex:prod"}).status_code == 200
        assert client.post("/admin/aliases/promote", json={"ref": "acme-bot@2", "alias": "prod"}).status_code == 200
        assert listed(client) == [
            "tiny",
            "acme-bot@1",
            "acme-bot@2",
            "globex@1",
            "acme-bot",
            "acme-bot:prod",
            "globex",
            "globex:prod",
        ]


def test_keyed_mode_access_admin_and_audit(engine: FakeEngine, keyed_registry: Registry) -> None:
    keys = KeyStore(keyed_registry.store, cache_ttl_s=0)
    acme = keys.create("acme", adapters=("acme*",))
    ops = keys.create("ops", admin=True)
    with gateway_over(engine, keyed_registry) as (url, app):
        with client_for(url) as anon:
            missing = anon.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.json()["error"]["code"] == "invalid_api_key"
            assert anon.get("/healthz").status_code == 200
            assert anon.get("/metrics").status_code == 401
        with client_for(url, "lg-000000000000-" + "A" * 43) as wrong:
            assert wrong.get("/v1/models").json()["error"]["message"] == "Invalid API key."
        with client_for(url, acme.secret) as client:
            assert listed(client) == ["tiny", "acme-bot@1", "acme-bot@2", "acme-bot", "acme-bot:prod"]
            listing = client.get("/v1/models")
            assert listing.headers["content-length"] == str(len(listing.content))
            assert client.post("/v1/chat/completions", json={**CHAT, "model": "acme-bot"}).status_code == 200
            assert client.post("/v1/chat/completions", json={**CHAT, "model": "acme-bot:prod"}).status_code == 200
            hidden = client.post("/v1/chat/completions", json={**CHAT, "model": "globex:prod"})
            assert hidden.status_code == 404
            assert hidden.json()["error"] == {
                "message": "The model 'globex:prod' does not exist",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
            assert client.get("/v1/models/globex").json() == hidden.json() | {
                "error": {**hidden.json()["error"], "message": "The model 'globex' does not exist"}
            }
            denied = client.post("/admin/aliases/promote", json={"ref": "acme-bot@2", "alias": "prod"})
            assert denied.status_code == 403
            assert denied.json()["error"]["code"] == "admin_required"
            assert client.get("/metrics").status_code == 403
        with client_for(url, ops.secret) as admin:
            assert admin.post("/admin/aliases/promote", json={"ref": "acme-bot@2", "alias": "prod"}).status_code == 200
            assert "loragate_requests_total" in admin.get("/metrics").text
        events = [(e["who"].split(":")[-1], e["action"], e["target"], e["result"]) for e in admin_events(app, 2)]
    assert events == [
        ("acme", "admin.POST /admin/aliases/promote", None, "denied"),
        ("ops", "admin.POST /admin/aliases/promote", "acme-bot@2", "ok"),
    ]


def test_key_and_adapter_rate_limits_answer_429(engine: FakeEngine, keyed_registry: Registry) -> None:
    keys = KeyStore(keyed_registry.store, cache_ttl_s=0)
    limited = keys.create("acme", rpm=1)
    other = keys.create("other")
    quotas = {"adapters": {"glob*": {"rpm": 1}}}
    with gateway_over(engine, keyed_registry, quotas=quotas) as (url, app):
        with client_for(url, limited.secret) as client:
            assert client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"}).status_code == 200
            refused = client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "60"
            assert refused.json()["error"] == {
                "message": "Rate limit exceeded: rpm=1 for this API key; retry after 60s.",
                "type": "rate_limit_error",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        with client_for(url, other.secret) as client:
            assert client.post("/v1/chat/completions", json={**CHAT, "model": "globex"}).status_code == 200
            shared = client.post("/v1/chat/completions", json={**CHAT, "model": "globex:prod"})
            assert shared.status_code == 429
            assert shared.json()["error"]["message"].startswith("Rate limit exceeded: rpm=1 for this model")
            assert client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"}).status_code == 200
        with client_for(url, "lg-000000000000-" + "A" * 43) as wrong:
            assert wrong.get("/v1/models").status_code == 401
        exposition = app.state.gateway.metrics.render()[0].decode()
    assert 'loragate_rate_limited_total{limit="rpm",scope="key"} 1.0' in exposition
    assert 'loragate_rate_limited_total{limit="rpm",scope="adapter"} 1.0' in exposition
    assert 'loragate_auth_failures_total{reason="unknown"} 1.0' in exposition
    assert 'adapter="",error_code="rate_limit_exceeded",route="chat",status_class="4xx",version=""} 1.0' in exposition
    assert 'adapter="globex",error_code="rate_limit_exceeded",route="chat",status_class="4xx",version="1"} 1.0' in (
        exposition
    )
    assert len(engine.seen) == 3  # refused calls never reach the engine


def test_limits_answer_400_and_431_before_the_engine(engine: FakeEngine, keyed_registry: Registry) -> None:
    limits = {"max_body_bytes": 2000, "max_tokens": 16, "max_json_depth": 4, "max_headers": 20}
    with gateway_over(engine, keyed_registry, limits=limits) as (url, app), client_for(url) as client:
        over = client.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "max_tokens": 17})
        assert over.status_code == 400
        assert over.json()["error"] == {
            "message": "max_tokens is above the gateway limit max_tokens=16",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "limit_exceeded",
        }
        big = client.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "pad": "x" * 3000})
        assert big.status_code == 400
        assert "max_body_bytes=2000" in big.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:
            for _ in range(3):
                yield b" " * 1000

        streamed = client.post("/v1/chat/completions", content=chunks())  # no content-length
        assert streamed.status_code == 400 and "max_body_bytes=2000" in streamed.json()["error"]["message"]
        admin_big = client.post("/admin/adapters/load", content=b'{"model": "' + b"x" * 3000 + b'"}')
        assert admin_big.status_code == 400 and "max_body_bytes=2000" in admin_big.json()["error"]["message"]
        deep = client.post("/v1/chat/completions", content=json.dumps({"model": [[[[["x"]]]]]}))
        assert deep.status_code == 400
        assert "max_json_depth=4" in deep.json()["error"]["message"]
        many = client.get("/healthz", headers={f"x-h{i}": "1" for i in range(25)})
        assert many.status_code == 431
        broken = client.post("/v1/chat/completions", content=b"{not json")
        assert broken.status_code == 400 and broken.json()["error"]["message"].startswith("request body is not valid")
        assert client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"}).status_code == 200
        exposition = app.state.gateway.metrics.render()[0].decode()
    expected = {"max_tokens": 1, "max_body_bytes": 3, "max_json_depth": 1, "max_headers": 1}
    for limit, count in expected.items():
        assert f'loragate_limit_rejections_total{{limit="{limit}"}} {count}.0' in exposition
    assert len(engine.seen) == 1


def test_required_auth_needs_a_store() -> None:
    with pytest.raises(ValueError, match=r"security\.auth=required needs a registry"):
        build_security(SecuritySettings(auth="required"), None)


def test_tokens_per_minute_are_paid_from_the_answers_usage(engine: FakeEngine, keyed_registry: Registry) -> None:
    keys = KeyStore(keyed_registry.store, cache_ttl_s=0)
    limited = keys.create("acme", tpm=10)  # a call costs 5 + 7 = 12 tokens: 2 overdrawn, 12 s to pay back
    with gateway_over(engine, keyed_registry) as (url, _app), client_for(url, limited.secret) as client:
        streamed = client.post("/v1/chat/completions", json={**CHAT, "model": "tiny", "stream": True})
        assert streamed.status_code == 200 and b'"usage"' not in streamed.content  # asked for metrics only
        refused = client.post("/v1/chat/completions", json={**CHAT, "model": "tiny"})
        assert refused.status_code == 429
        assert refused.json()["error"]["message"] == "Rate limit exceeded: tpm=10 for this API key; retry after 12s."


def test_load_by_path_only_inside_roots(
    engine: FakeEngine, keyed_registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(adapter_dirs[0], root / "acme")
    ops = KeyStore(keyed_registry.store, cache_ttl_s=0).create("ops", admin=True)
    with (
        gateway_over(engine, keyed_registry, path_roots=[str(root)]) as (url, app),
        client_for(url, ops.secret) as admin,
    ):
        inside = admin.post("/v1/load_lora_adapter", json={"lora_name": "uploaded", "lora_path": str(root / "acme")})
        assert inside.status_code == 200 and inside.text == "Success: LoRA adapter 'uploaded' added successfully."
        for bad in (str(tmp_path), str(root / ".." / "adapters" / "acme"), "relative/acme"):
            refused = admin.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": bad})
            assert refused.status_code == 403, bad
            assert refused.json()["error"]["code"] == "path_refused"
        results = [(e["action"], e["result"]) for e in admin_events(app, 4)]
    assert (
        results == [("admin.POST /v1/load_lora_adapter", "ok")] + [("admin.POST /v1/load_lora_adapter", "denied")] * 3
    )
    assert any(name.startswith("uploaded@") for name in engine.loaded)


def test_choose_bind_reads_the_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    assert choose_bind(SecuritySettings(), store, "0.0.0.0")[0] == "127.0.0.1"
    assert choose_bind(SecuritySettings(auth="off"), store, "0.0.0.0")[0] == "127.0.0.1"
    assert choose_bind(SecuritySettings(auth="required"), None, "0.0.0.0") == ("0.0.0.0", None)
    KeyStore(store, cache_ttl_s=0).create("acme")
    assert choose_bind(SecuritySettings(), store, "0.0.0.0") == ("0.0.0.0", None)


@pytest.mark.anyio
async def test_before_start_up_the_middleware_answers_503() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("reached the app")

    transport = httpx.ASGITransport(app=RequestHeaders(SecurityMiddleware(app, Live())))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        reply = await client.get("/v1/models")
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "1" and "x-request-id" in reply.headers
    assert reply.json()["error"]["code"] == "starting"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
