"""Keys, access, quotas, the admin surface and input limits on a keyed gateway over the real vLLM (CPU) engine.

Clients: the official `openai` SDK (retries off, so a 429 surfaces as `openai.RateLimitError`) and httpx.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.engine_process import EngineProcess
from tests.fixtures.security import MAX_BODY_BYTES, MAX_TOKENS, KeyedGateway, wait_ready
from tests.harness import wait_until

pytestmark = pytest.mark.integration

HELLO: list[Any] = [{"role": "user", "content": "Hello"}]


def client(gw: KeyedGateway, role: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.keys[role] if role else "lg-none", max_retries=0, timeout=120)


def chat(gw: KeyedGateway, role: str, model: str, **kw: Any) -> str:
    reply = client(gw, role).chat.completions.create(model=model, messages=HELLO, max_tokens=4, temperature=0, **kw)
    return reply.choices[0].message.content or ""


def test_key_limited_to_acme_sees_and_calls_only_acme(keyed_gateway: KeyedGateway) -> None:
    acme = client(keyed_gateway, "acme")
    ids = {m.id for m in acme.models.list().data}
    assert "acme-support" in ids and "tiny" in ids
    assert not any(i.startswith("globex") for i in ids)
    everyone = {m.id for m in client(keyed_gateway, "all").models.list().data}
    assert {"globex", "acme-support", "tiny"} <= everyone
    assert chat(keyed_gateway, "acme", "acme-support") != ""
    assert acme.models.retrieve("acme-support").id == "acme-support"
    for hidden in ("globex", "globex@1", "globex:latest", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as refused:
            acme.chat.completions.create(model=hidden, messages=HELLO, max_tokens=4)
        with pytest.raises(openai.NotFoundError) as retrieved:
            acme.models.retrieve(hidden)
        assert (
            refused.value.body
            == retrieved.value.body
            == {
                "message": f"The model '{hidden}' does not exist",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        )
    assert chat(keyed_gateway, "all", "globex") != ""


@pytest.mark.parametrize(
    ("role", "message"),
    [
        ("revoked", "This API key has been revoked."),
        ("expired", "This API key has expired."),
        (None, "Invalid API key."),
    ],
)
def test_revoked_expired_and_unknown_keys_get_401(keyed_gateway: KeyedGateway, role: str | None, message: str) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        client(keyed_gateway, role).chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert refused.value.status_code == 401
    assert isinstance(refused.value.body, dict) and refused.value.body["message"] == message
    with pytest.raises(openai.AuthenticationError):
        client(keyed_gateway, role).models.list()


def test_revocation_takes_effect_on_the_next_request(keyed_gateway: KeyedGateway) -> None:
    created = keyed_gateway.security.keys.create("short-lived")
    keyed_gateway.keys["short-lived"] = created.secret
    assert chat(keyed_gateway, "short-lived", "tiny") != ""
    keyed_gateway.security.keys.revoke(created.record.key_id)
    with pytest.raises(openai.AuthenticationError):
        chat(keyed_gateway, "short-lived", "tiny")


def test_rpm_limit_gives_rate_limit_error_with_retry_after(keyed_gateway: KeyedGateway) -> None:
    assert chat(keyed_gateway, "rpm", "tiny") != ""
    with pytest.raises(openai.RateLimitError) as refused:
        chat(keyed_gateway, "rpm", "tiny")
    retry_after = int(refused.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "rate_limit_exceeded"
    metrics = httpx.get(f"{keyed_gateway.url}/metrics", headers=keyed_gateway.headers("admin"), timeout=30).text
    assert 'loragate_rate_limited_total{limit="rpm",scope="key"}' in metrics


def test_concurrency_limit_gives_rate_limit_error(keyed_gateway: KeyedGateway, vllm_engine: EngineProcess) -> None:
    """While one call of a max-concurrency=1 key is in flight, the next one is refused at once."""
    key_id = keyed_gateway.security.keys.find("one-at-a-time").key_id
    quotas = keyed_gateway.security.quotas
    answers: list[str] = []
    pgid = vllm_engine.pid
    assert pgid is not None
    os.killpg(pgid, signal.SIGSTOP)  # hold the engine so the first call stays in flight
    try:
        first = threading.Thread(target=lambda: answers.append(chat(keyed_gateway, "conc", "tiny")))
        first.start()
        wait_until(lambda: quotas.inflight("key", key_id), 60, "the first call in the gateway", interval_s=0.05)
        with pytest.raises(openai.RateLimitError) as refused:
            chat(keyed_gateway, "conc", "tiny")
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["message"] == "Rate limit exceeded: concurrency=1 for this API key; retry after 1s."
        assert refused.value.response.headers["retry-after"] == "1"
    finally:
        os.killpg(pgid, signal.SIGCONT)
    first.join(timeout=120)
    assert len(answers) == 1 and answers[0] != ""
    assert quotas.inflight("key", key_id) == 0
    wait_ready(keyed_gateway.url, keyed_gateway.keys["admin"], 120)  # in case a health check saw the paused engine
    assert chat(keyed_gateway, "conc", "tiny") != ""


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/load_lora_adapter", {"lora_name": "acme-support"}),
        ("/v1/unload_lora_adapter", {"lora_name": "acme-support"}),
        ("/v1/load_lora_adapter", {"lora_name": "acme-pushed", "lora_path": "PATH_ROOT/acme-uploaded"}),
        ("/admin/adapters/load", {"model": "acme-support"}),
        ("/admin/adapters/unload", {"model": "acme-support"}),
        ("/admin/adapters/pin", {"model": "acme-support"}),
        ("/admin/registry/reload", {}),
        ("/admin/aliases/promote", {"ref": "acme-support@1", "alias": "prod"}),
        ("/admin/aliases/rollback", {"name": "acme-support", "alias": "prod"}),
    ],
)
def test_non_admin_key_cannot_load_unload_push_promote_or_pin(
    keyed_gateway: KeyedGateway, path: str, body: dict[str, str]
) -> None:
    versions = len(keyed_gateway.registry.list_adapters())
    aliases = keyed_gateway.registry.aliases("acme-support")
    if "lora_path" in body:
        body = {**body, "lora_path": body["lora_path"].replace("PATH_ROOT", str(keyed_gateway.path_root))}
    reply = httpx.post(f"{keyed_gateway.url}{path}", json=body, headers=keyed_gateway.headers("acme"), timeout=60)
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "admin_required"
    assert len(keyed_gateway.registry.list_adapters()) == versions
    assert keyed_gateway.registry.aliases("acme-support") == aliases
    events = keyed_gateway.security.audit.read()
    assert events[-1]["action"] == f"admin.POST {path}" and events[-1]["result"] == "denied"
    assert events[-1]["who"].endswith(":acme")


def test_admin_loads_by_path_only_inside_roots(keyed_gateway: KeyedGateway) -> None:
    admin = keyed_gateway.headers("admin")
    versions = len(keyed_gateway.registry.list_adapters())
    outside = {"lora_name": "acme-outside", "lora_path": str(keyed_gateway.outside_dir)}
    sneaky = {"lora_name": "acme-outside", "lora_path": f"{keyed_gateway.path_root}/../outside"}
    for body in (outside, sneaky):
        reply = httpx.post(f"{keyed_gateway.url}/v1/load_lora_adapter", json=body, headers=admin, timeout=60)
        assert reply.status_code == 403
        assert reply.json()["error"]["code"] == "path_refused"
    assert len(keyed_gateway.registry.list_adapters()) == versions
    inside = {"lora_name": "acme-uploaded", "lora_path": str(keyed_gateway.path_root / "acme-uploaded")}
    reply = httpx.post(f"{keyed_gateway.url}/v1/load_lora_adapter", json=inside, headers=admin, timeout=120)
    assert reply.status_code == 200, reply.text
    assert [m.ref for m in keyed_gateway.registry.list_adapters("acme-uploaded")] == ["acme-uploaded@1"]
    assert chat(keyed_gateway, "acme", "acme-uploaded") != ""
    events = [
        (e["who"].split(":")[-1], e["action"], e["target"], e["result"]) for e in keyed_gateway.security.audit.read()
    ]
    assert events[-4:] == [  # a refused load names what it was refused for
        ("ops", "admin.POST /v1/load_lora_adapter", "acme-outside", "denied"),
        ("ops", "admin.POST /v1/load_lora_adapter", "acme-outside", "denied"),
        ("ops", "registry.push", "acme-uploaded@1", "ok"),  # the registry write, attributed to the admin key
        ("ops", "admin.POST /v1/load_lora_adapter", "acme-uploaded", "ok"),
    ]


def test_oversize_body_and_max_tokens_get_400_naming_the_limit(keyed_gateway: KeyedGateway) -> None:
    everyone = client(keyed_gateway, "all")
    with pytest.raises(openai.BadRequestError) as refused:
        everyone.chat.completions.create(model="tiny", messages=HELLO, max_tokens=MAX_TOKENS + 1)
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["message"] == f"max_tokens is above the gateway limit max_tokens={MAX_TOKENS}"
    assert refused.value.body["param"] == "max_tokens"
    big: Any = [{"role": "user", "content": "x" * MAX_BODY_BYTES}]
    with pytest.raises(openai.BadRequestError) as refused:
        everyone.chat.completions.create(model="tiny", messages=big, max_tokens=4)
    assert isinstance(refused.value.body, dict)
    assert (
        refused.value.body["message"]
        == f"request body is larger than the gateway limit max_body_bytes={MAX_BODY_BYTES}"
    )
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(openai.BadRequestError, match="max_json_depth=32"):
        everyone.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, extra_body={"deep": deep})


def test_probes_open_and_metrics_need_an_admin_key(keyed_gateway: KeyedGateway) -> None:
    assert httpx.get(f"{keyed_gateway.url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{keyed_gateway.url}/metrics", timeout=10).status_code == 401
    assert (
        httpx.get(f"{keyed_gateway.url}/metrics", headers=keyed_gateway.headers("acme"), timeout=10).status_code == 403
    )
    assert (
        httpx.get(f"{keyed_gateway.url}/admin/engines", headers=keyed_gateway.headers("acme"), timeout=10).status_code
        == 403
    )


def test_admin_promotes_and_rolls_back_an_alias(keyed_gateway: KeyedGateway, adapter_dirs: list[Path]) -> None:
    admin = keyed_gateway.headers("admin")
    url = keyed_gateway.url
    second = keyed_gateway.registry.push(adapter_dirs[0], "globex", "tiny")
    for ref in ("globex@1", second.ref):
        promoted = httpx.post(f"{url}/admin/aliases/promote", json={"ref": ref, "alias": "canary"}, headers=admin)
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["ref"] == ref
    assert keyed_gateway.registry.aliases("globex")["canary"] == second.version
    back = httpx.post(f"{url}/admin/aliases/rollback", json={"name": "globex", "alias": "canary"}, headers=admin)
    assert back.status_code == 200, back.text
    assert keyed_gateway.registry.aliases("globex")["canary"] == 1
    unknown = httpx.post(f"{url}/admin/aliases/promote", json={"ref": "globex@99", "alias": "canary"}, headers=admin)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    moves = [
        (e["who"].split(":")[-1], e["action"], e["result"])
        for e in keyed_gateway.security.audit.read()
        if e["action"] in ("registry.promote", "registry.rollback")
    ]
    assert moves[-4:] == [
        ("ops", "registry.promote", "ok"),
        ("ops", "registry.promote", "ok"),
        ("ops", "registry.rollback", "ok"),
        ("ops", "registry.promote", "error"),
    ]


def test_a_pin_given_at_start_is_loaded_once_the_engine_is_ready(keyed_gateway: KeyedGateway) -> None:
    """`adapters.pinned` in the settings: resolved once an engine says what it serves (it used to crash the start
    with "above the engines' max_lora_rank 0"), then resident and gating readiness."""
    admin = keyed_gateway.headers("admin")
    engines = httpx.get(f"{keyed_gateway.url}/admin/engines", headers=admin, timeout=10).json()["engines"]
    resident = [r for engine in engines for r in engine["resident"] if r["pinned"]]
    assert [r["ref"] for r in resident] == ["acme-support@1"]
    assert httpx.get(f"{keyed_gateway.url}/readyz", timeout=10).status_code == 200
