"""The gateway against two real vLLM (CPU) engines it starts itself, through the official openai client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from adapters_registry.manifest import AdapterManifest
from gateway.engine_process import group_members
from gateway.routing import rendezvous_order
from tests.fixtures.gateway import GatewayUnderTest, derive_adapter
from tests.harness import wait_until
from training.tiny_model import build_random_adapter

pytestmark = pytest.mark.integration
HELLO = [{"role": "user", "content": "Hello there"}]


def client(gw: GatewayUnderTest) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=120)


def chat(gw: GatewayUnderTest, model: str, **kw: Any) -> str:
    reply = client(gw).chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=0, **kw)
    return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def pushed(gateway: GatewayUnderTest, adapter_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Adapters registered once for this module: a0 (2 versions: a0@1, a0@2) and ten distinct `many-<i>`."""
    root = tmp_path_factory.mktemp("gw-adapters")
    reg = gateway.registry
    versions = {
        "a0@1": reg.push(adapter_dirs[0], "a0", "tiny"),
        "a0@2": reg.push(adapter_dirs[1], "a0", "tiny"),
    }
    reg.promote("a0@1", "prod")
    many = [
        reg.push(derive_adapter(adapter_dirs[0], root / f"m{i}", seed=100 + i), f"many-{i}", "tiny") for i in range(10)
    ]
    return versions, many


def engine_by_id(gw: GatewayUnderTest, engine_id: str) -> dict[str, Any]:
    return next(e for e in gw.engines() if e["id"] == engine_id)


def test_chat_completion_and_headers_match_vllm_directly(gateway: GatewayUnderTest, pushed: Any) -> None:
    versions, _ = pushed
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="a0@1", messages=HELLO, max_tokens=12, temperature=0, extra_headers={"x-request-id": "req-42"}
    )
    assert raw.headers["x-loragate-adapter"] == "a0@1"
    assert raw.headers["x-request-id"] == "req-42"
    via_gateway = raw.parse()
    engine = engine_by_id(gateway, raw.headers["x-loragate-engine"])
    assert versions["a0@1"].engine_name in [r["engine_name"] for r in engine["resident"]]
    direct = openai.OpenAI(base_url=f"{engine['url']}/v1", api_key="unused").chat.completions.create(
        model=versions["a0@1"].engine_name, messages=HELLO, max_tokens=12, temperature=0
    )
    assert via_gateway.choices[0].message.content == direct.choices[0].message.content
    assert via_gateway.usage is not None and via_gateway.usage.completion_tokens == direct.usage.completion_tokens

    base = client(gateway).completions.with_raw_response.create(
        model="tiny", prompt="Once", max_tokens=8, temperature=0
    )
    assert base.headers["x-loragate-adapter"] == "tiny"
    assert re.fullmatch(r"[0-9a-f]{32}", base.headers["x-request-id"])
    completion = base.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert chat(gateway, "tiny") != chat(gateway, "a0@1")


def test_streaming_with_usage_equals_the_whole_answer(gateway: GatewayUnderTest, pushed: Any) -> None:
    whole = client(gateway).chat.completions.create(model="a0@2", messages=HELLO, max_tokens=16, temperature=0)
    stream = client(gateway).chat.completions.create(
        model="a0@2",
        messages=HELLO,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage is not None and whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)

    plain = list(client(gateway).chat.completions.create(model="a0@2", messages=HELLO, max_tokens=4, stream=True))
    assert plain and all(chunk.choices and chunk.usage is None for chunk in plain)  # usage only when asked for

    text = "".join(
        c.choices[0].text
        for c in client(gateway).completions.create(
            model="tiny", prompt="Once", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    direct = client(gateway).completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=0)
    assert text == direct.choices[0].text


def test_models_list_lineage_and_status(gateway: GatewayUnderTest, pushed: Any) -> None:
    versions, _ = pushed
    chat(gateway, "a0@1")
    cards = {m.id: m.model_extra or {} for m in client(gateway).models.list().data}
    assert cards["tiny"]["parent"] is None and cards["tiny"]["root"] == "tiny"
    v1 = cards["a0@1"]
    assert (v1["parent"], v1["root"], v1["version"], v1["digest"]) == ("tiny", "a0@1", 1, versions["a0@1"].digest)
    assert v1["aliases"] == ["a0:prod"] and v1["status"] == "loaded"
    assert cards["a0@2"]["aliases"] == [] and cards["a0@2"]["version"] == 2
    # as in vLLM, an adapter's parent is the base; what a name or alias resolves to is loragate's own field
    assert (cards["a0"]["parent"], cards["a0"]["ref"], cards["a0"]["resolves_to"]) == ("tiny", "a0@2", "a0@2")
    assert (cards["a0:prod"]["parent"], cards["a0:prod"]["resolves_to"]) == ("tiny", "a0@1")
    assert cards["many-9@1"]["status"] in {"registered", "loaded"}
    assert all(card["parent"] == "tiny" for model_id, card in cards.items() if model_id != "tiny")

    listed = {m.id: m for m in client(gateway).models.list().data}
    for model_id, card in listed.items():  # the SDK's models.retrieve gives each listed entry by its id
        assert client(gateway).models.retrieve(model_id) == card
    by_digest = client(gateway).models.retrieve(f"a0@{versions['a0@1'].digest[:19]}")
    assert (by_digest.id, (by_digest.model_extra or {})["resolves_to"]) == (
        f"a0@{versions['a0@1'].digest[:19]}",
        "a0@1",
    )
    with pytest.raises(openai.NotFoundError) as missing:
        client(gateway).models.retrieve("no-such-adapter")
    assert missing.value.code == "model_not_found"


def test_errors_use_the_openai_envelope(
    gateway: GatewayUnderTest, pushed: Any, tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        chat(gateway, "no-such-adapter")
    assert missing.value.code == "model_not_found"
    assert missing.value.response.headers["x-loragate-adapter"] == "none"
    with pytest.raises(openai.NotFoundError):
        chat(gateway, "a0@99")

    refused_before = requests_seen(gateway, route="chat", error_code="invalid_request")
    bad = httpx.post(f"{gateway.base_url}/chat/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert requests_seen(gateway, route="chat", error_code="invalid_request") == refused_before + 1
    no_model = httpx.post(f"{gateway.base_url}/chat/completions", json={"messages": HELLO}, timeout=10)
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"

    wide = gateway.registry.push(build_random_adapter(tiny_model, tmp_path / "r32", seed=7, r=32), "wide", "tiny")
    refused_before = requests_seen(gateway, route="chat", error_code="adapter_refused", adapter="wide")
    with pytest.raises(openai.BadRequestError) as refused:
        chat(gateway, "wide")
    assert refused.value.code == "adapter_refused"
    assert "rank 32, above the engines' max_lora_rank 16" in str(refused.value.message)
    assert wide.engine_name not in {r["engine_name"] for e in gateway.engines() for r in e["resident"]}
    # counted under its own label; not offered in /v1/models; retrieve says why
    assert requests_seen(gateway, route="chat", error_code="adapter_refused", adapter="wide") == refused_before + 1
    assert not [m.id for m in client(gateway).models.list().data if m.id.startswith("wide")]
    card = client(gateway).models.retrieve("wide").model_extra or {}
    assert card["status"] == "refused" and "rank 32" in card["refusal"]

    upstream = client(gateway).chat.completions.with_raw_response  # vLLM's own 400, passed through
    with pytest.raises(openai.BadRequestError) as passed:
        upstream.create(model="tiny", messages=HELLO, max_tokens=100_000)
    assert passed.value.status_code == 400
    assert passed.value.response.json()["error"]["message"]


def test_adapter_loads_on_first_use_and_alias_promotion_switches_weights(
    gateway: GatewayUnderTest, pushed: Any
) -> None:
    versions, _ = pushed
    reg = gateway.registry
    reg.promote("a0@1", "canary")
    first = chat(gateway, "a0:canary")
    assert first == chat(gateway, "a0@1")
    reg.promote("a0@2", "canary")  # elsewhere (the CLI, another replica): seen within adapters.resolve_ttl_s

    def answered_by_a0_2() -> Any:
        raw = client(gateway).chat.completions.with_raw_response.create(
            model="a0:canary", messages=HELLO, max_tokens=12, temperature=0
        )
        if raw.headers["x-loragate-adapter"] == "a0@2":
            return raw
        assert raw.headers["x-loragate-adapter"] == "a0@1"  # until then, the version it pointed at
        return None

    ttl_s = gateway.settings.adapters.resolve_ttl_s
    raw = wait_until(answered_by_a0_2, ttl_s + 3, "a0:canary answered by a0@2", interval_s=0.2)
    assert raw.parse().choices[0].message.content == chat(gateway, "a0@2") != first
    resident = {r["engine_name"] for e in gateway.engines() for r in e["resident"]}
    assert versions["a0@2"].engine_name in resident
    # through this gateway's admin API: the next request already answers with the version it points at now
    moved = httpx.post(f"{gateway.url}/admin/aliases/promote", json={"ref": "a0@1", "alias": "canary"}, timeout=30)
    assert moved.status_code == 200
    assert chat(gateway, "a0:canary") == first


def test_ten_adapters_at_once_on_four_slots(gateway: GatewayUnderTest, pushed: Any) -> None:
    _, many = pushed
    expected = {m.ref: chat(gateway, m.ref) for m in many}
    assert len(set(expected.values())) > 1

    async def one(api: openai.AsyncOpenAI, manifest: AdapterManifest) -> tuple[str, str]:
        reply = await api.chat.completions.create(model=manifest.ref, messages=HELLO, max_tokens=12, temperature=0)
        return manifest.ref, reply.choices[0].message.content or ""

    async def all_at_once() -> dict[str, str]:
        async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=300) as api:
            return dict(await asyncio.gather(*(one(api, m) for m in many)))

    assert asyncio.run(all_at_once()) == expected
    for engine in gateway.engines():
        assert len(engine["resident"]) <= 2


def engine_metric(engine_url: str, name: str) -> float:
    """Sum of one vLLM metric over its label sets."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


def requests_seen(gateway: GatewayUnderTest, **labels: str) -> float:
    """loragate_requests_total summed over the series whose labels include `labels`."""
    return gateway.metric("loragate_requests_total", **labels)


# Runs in its own process, so a pulse's length does not depend on this process's GIL (shared with the gateway's
# threads), and real-time, so runnable engine threads cannot starve its wake-up: a pulse stretched by the scheduler
# (seen: 0.6-2.3 s under the full suite) lets a tiny model run through its whole answer.
PULSER = """
import contextlib, os, signal, sys, time

pids = [int(pid) for pid in sys.argv[1:]]
with contextlib.suppress(PermissionError):
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))


def send(signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


send(signal.SIGSTOP)
print("stopped 0", flush=True)
for command in sys.stdin:
    word, _, seconds = command.strip().partition(" ")
    if word != "pulse":
        break
    start = time.monotonic()
    send(signal.SIGCONT)
    time.sleep(float(seconds or 0.001))
    send(signal.SIGSTOP)
    print(f"stopped {time.monotonic() - start}", flush=True)
send(signal.SIGCONT)
"""


class StoppedEngines:
    """Keeps every engine's core and workers (not the API servers) SIGSTOPped; each `pulse()` lets them run briefly.
    A tiny model races through hundreds of tokens a second: only this puts a hang-up before the answer's end."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.pulses: list[float] = []  # how long each pulse let the engines run, in seconds
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PULSER, *map(str, pids)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._stopped()

    def _stopped(self) -> float:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("stopped "), f"the pulser process failed: {line!r}"
        return float(line.split()[1])

    def pulse(self, seconds: float = 0.001) -> None:
        """Returns once the engines ran for about `seconds` and are stopped again."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"pulse {seconds}\n")
        self.proc.stdin.flush()
        self.pulses.append(self._stopped())

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            for pid in self.pids:  # whatever happened to the pulser, leave no engine stopped
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


@contextmanager
def stopped_engines(gateway: GatewayUnderTest) -> Iterator[StoppedEngines]:
    pids = [pid for e in gateway.engines() for pid in group_members(e["pid"]) if pid != e["pid"]]
    assert pids, "vLLM runs its engine core in child processes"
    engines = StoppedEngines(pids)
    try:
        yield engines
    finally:
        engines.close()


def test_client_disconnect_aborts_the_upstream_request(gateway: GatewayUnderTest) -> None:
    max_tokens = 480
    body = {
        "model": "tiny",
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    counters = ("vllm:generation_tokens_total", "vllm:request_success_total")
    before = {e["url"]: {name: engine_metric(e["url"], name) for name in counters} for e in gateway.engines()}
    disconnects = requests_seen(gateway, route="completions", error_code="client_disconnected")

    def engine_busy() -> bool:
        return bool(
            engine_metric(engine_url, "vllm:num_requests_running")
            + engine_metric(engine_url, "vllm:num_requests_waiting")
        )

    first_chunk: dict[str, Any] = {}

    def read_first_chunk_and_hang_up() -> None:
        with httpx.stream("POST", f"{gateway.base_url}/completions", json=body, timeout=120) as response:
            first_chunk.update(status=response.status_code, engine=response.headers.get("x-loragate-engine"))
            first_chunk["bytes"] = next(response.iter_raw())

    with stopped_engines(gateway) as engines:
        client = threading.Thread(target=read_first_chunk_and_hang_up)
        client.start()

        def first_chunk_through() -> bool:
            # The engines run in short pulses until it is: 1 ms at first, doubled every 25 pulses up to 32 ms, so a
            # machine busy enough that 1 ms windows hand the engine no CPU (seen in CI: no first chunk in 120 s)
            # still gets there; one 32 ms window is far from the ~1 s the whole answer takes.
            if not client.is_alive():
                return True
            engines.pulse(min(0.032, 0.001 * 2 ** (len(engines.pulses) // 25)))
            client.join(0.1)
            return False

        wait_until(
            first_chunk_through,
            120,
            lambda: f"the first chunk through the pulses ({len(engines.pulses)} pulses, {sum(engines.pulses):.2f} s)",
            interval_s=0,
        )
        assert first_chunk.get("status") == 200, first_chunk
        engine_url = engine_by_id(gateway, first_chunk["engine"])["url"]
        # The engines stay stopped: the gateway notices the hang-up itself and closes its upstream connection.
        wait_until(lambda: not gateway.state.inflight(), 30, "the gateway noticing the hang-up", interval_s=0.05)
        ran = f"engines ran {len(engines.pulses)} pulses, the longest {max(engines.pulses):.3f} s"
        recorded = requests_seen(gateway, route="completions", error_code="client_disconnected")
        assert recorded == disconnects + 1, (ran, requests_seen(gateway, route="completions", status_class="2xx"))
    # Running again, vLLM notices the closed connection on its next write and aborts the request.
    wait_until(lambda: not engine_busy(), 120, "the request leaving the engine", interval_s=0.05)
    generated = engine_metric(engine_url, counters[0]) - before[engine_url][counters[0]]
    assert 0 < generated < max_tokens  # stopped early: aborted, not finished
    assert engine_metric(engine_url, counters[1]) == before[engine_url][counters[1]]  # never counted as finished


def test_vllm_runtime_endpoints_register_and_load(gateway: GatewayUnderTest, adapter_dirs: list[Path]) -> None:
    load = httpx.post(
        f"{gateway.base_url}/load_lora_adapter",
        json={"lora_name": "vllm-tool", "lora_path": str(adapter_dirs[1])},
        timeout=120,
    )
    assert (load.status_code, load.text) == (200, "Success: LoRA adapter 'vllm-tool' added successfully.")
    assert load.headers["x-loragate-adapter"] == "vllm-tool@1"
    assert chat(gateway, "vllm-tool") == chat(gateway, "a0@2")  # same files as a0@2
    # vLLM's answers, case by case (its tests/entrypoints/openai/test_lora_adapters.py)
    twice = httpx.post(
        f"{gateway.base_url}/load_lora_adapter",
        json={"lora_name": "vllm-tool", "lora_path": str(adapter_dirs[0])},
        timeout=120,
    )
    assert twice.status_code == 400 and "has already been loaded" in twice.json()["error"]["message"]
    inplace = httpx.post(
        f"{gateway.base_url}/load_lora_adapter",
        json={"lora_name": "vllm-tool", "lora_path": str(adapter_dirs[0]), "load_inplace": True},
        timeout=120,
    )
    assert inplace.status_code == 200 and inplace.headers["x-loragate-adapter"] == "vllm-tool@2"
    assert chat(gateway, "vllm-tool") == chat(gateway, "a0@1")  # the new files: a0@1's
    unload = httpx.post(f"{gateway.base_url}/unload_lora_adapter", json={"lora_name": "vllm-tool"}, timeout=60)
    assert (unload.status_code, unload.text) == (200, "Success: LoRA adapter 'vllm-tool' removed successfully.")
    again = httpx.post(f"{gateway.base_url}/unload_lora_adapter", json={"lora_name": "vllm-tool"}, timeout=60)
    assert again.status_code == 404
    assert again.json()["error"]["message"] == "The lora adapter 'vllm-tool' cannot be found."
    missing = httpx.post(
        f"{gateway.base_url}/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"}, timeout=60
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Loading lora x failed: No adapter found for /nonexistent"
    cases = [
        ({"lora_name": "x"}, 400, "Both 'lora_name' and 'lora_path' must be provided."),
        ({"lora_name": "tiny", "lora_path": str(adapter_dirs[0])}, 400, "conflicts with a served base model"),
    ]
    for body, status, message in cases:
        reply = httpx.post(f"{gateway.base_url}/load_lora_adapter", json=body, timeout=60)
        assert reply.status_code == status and message in reply.json()["error"]["message"], body
    nameless = httpx.post(f"{gateway.base_url}/unload_lora_adapter", json={}, timeout=60)
    assert nameless.status_code == 400
    assert nameless.json()["error"]["message"] == "'lora_name' needs to be provided to unload a LoRA adapter."


def test_pinned_adapter_is_resident_everywhere_and_gates_readiness(gateway: GatewayUnderTest, pushed: Any) -> None:
    versions, _ = pushed
    key = versions["a0@1"].engine_name
    pinned = httpx.post(f"{gateway.url}/admin/adapters/pin", json={"model": "a0:prod"}, timeout=120)
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["ref"] == "a0@1"
    try:
        for engine in gateway.engines():
            assert {"engine_name": key, "ref": "a0@1", "pinned": True} in engine["resident"]
        ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
        assert (ready.status_code, ready.json()["problems"]) == (200, [])
        refused = httpx.post(f"{gateway.url}/admin/adapters/unload", json={"model": "a0@1"}, timeout=10)
        assert (refused.status_code, refused.json()["error"]["message"]) == (400, "a0@1 is pinned; unpin it first")
    finally:
        unpinned = httpx.post(f"{gateway.url}/admin/adapters/unpin", json={"model": "a0@1"}, timeout=10)
    assert unpinned.status_code == 200
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).json() == {"status": "ok"}


def test_prewarm_fills_each_engines_free_slots_with_its_rendezvous_share(
    gateway: GatewayUnderTest, pushed: Any
) -> None:
    _, many = pushed
    for engine in gateway.engines():  # nothing is in flight between tests: free every slot the registry can name
        for resident in engine["resident"]:
            if resident["ref"] is not None and not resident["pinned"]:
                body = {"model": resident["ref"], "engine": engine["id"]}
                assert httpx.post(f"{gateway.url}/admin/adapters/unload", json=body, timeout=60).status_code == 200
    engines = gateway.engines()
    free = {e["id"]: e["slots"] - len(e["resident"]) for e in engines}
    assert all(free.values()), free
    ids = [e["id"] for e in engines]
    expected = {
        engine_id: [m.ref for m in many if rendezvous_order(ids, m.engine_name)[0] == engine_id][: free[engine_id]]
        for engine_id in ids
    }
    assert all(expected.values()), expected  # ten adapters over two engines: each is home to some

    warmed = httpx.post(f"{gateway.url}/admin/adapters/prewarm", json={"models": ["many-*", "tiny"]}, timeout=300)
    assert warmed.status_code == 200, warmed.text
    assert warmed.json() == {"loaded": expected}
    for engine in gateway.engines():
        listed = httpx.get(f"{engine['url']}/v1/models", timeout=10).json()["data"]
        on_engine = {card["id"] for card in listed if card.get("parent")}
        in_ledger = {r["ref"] for r in engine["resident"]}
        assert set(expected[engine["id"]]) <= in_ledger
        assert {m.engine_name for m in many if m.ref in expected[engine["id"]]} <= on_engine
        assert not engine["warming"]
    # Full now (or held elsewhere): a second pass loads nothing and evicts nothing
    again = httpx.post(f"{gateway.url}/admin/adapters/prewarm", json={"models": ["many-*"]}, timeout=300)
    assert again.json() == {"loaded": {engine_id: [] for engine_id in ids}}
    raw = client(gateway).chat.completions.with_raw_response.create(
        model=expected[ids[0]][0], messages=HELLO, max_tokens=4, temperature=0
    )
    assert raw.headers["x-loragate-engine"] == ids[0]  # placement finds it on its home

    before = {e["id"]: [r["ref"] for r in e["resident"]] for e in gateway.engines()}
    cases = [
        ({"models": ["no-such-adapter"]}, 404, "model_not_found"),
        ({"models": ["many-*", ""]}, 400, "invalid_request_error"),
        ({}, 400, "invalid_request_error"),  # no list given and none configured
    ]
    for body, status, kind in cases:
        reply = httpx.post(f"{gateway.url}/admin/adapters/prewarm", json=body, timeout=60)
        error = reply.json()["error"]
        assert reply.status_code == status, (body, reply.text)
        assert kind in (error["code"], error["type"]) and "\n" not in error["message"], error
    assert {e["id"]: [r["ref"] for r in e["resident"]] for e in gateway.engines()} == before  # nothing loaded


def test_adapter_unloaded_behind_the_gateways_back_is_reloaded(gateway: GatewayUnderTest, pushed: Any) -> None:
    versions, _ = pushed
    key = versions["a0@2"].engine_name
    loaded = httpx.post(f"{gateway.url}/admin/adapters/load", json={"model": "a0@2"}, timeout=120).json()
    engine = engine_by_id(gateway, loaded["engine"])
    dropped = httpx.post(f"{engine['url']}/v1/unload_lora_adapter", json={"lora_name": key}, timeout=30)
    assert dropped.status_code == 200
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="a0@2", messages=HELLO, max_tokens=12, temperature=0
    )
    assert raw.headers["x-loragate-adapter"] == "a0@2"
    served_by = engine_by_id(gateway, raw.headers["x-loragate-engine"])
    assert key in {r["engine_name"] for r in served_by["resident"]}
    listed = httpx.get(f"{served_by['url']}/v1/models", timeout=10).json()["data"]
    assert key in {card["id"] for card in listed}


def test_engine_killed_mid_traffic_comes_back_with_its_adapters(gateway: GatewayUnderTest, pushed: Any) -> None:
    """The killed engine restarts with what it held, the adapter pinned through the admin API first (a pin used
    to be lost here: the ledger still said resident, so nothing re-loaded it), and /readyz recovers on its own."""
    versions, _ = pushed
    victim, survivor = gateway.engines()
    for model, engine in (("a0@1", victim["id"]), ("many-0", survivor["id"])):
        loaded = httpx.post(f"{gateway.url}/admin/adapters/load", json={"model": model, "engine": engine}, timeout=60)
        assert loaded.status_code == 200, loaded.text
    pinned = httpx.post(f"{gateway.url}/admin/adapters/pin", json={"model": "a0@2"}, timeout=120)
    assert pinned.status_code == 200, pinned.text
    pin_key = versions["a0@2"].engine_name
    try:
        held = {r["engine_name"] for r in engine_by_id(gateway, victim["id"])["resident"]}
        assert {versions["a0@1"].engine_name, pin_key} <= held
        restarts = victim["restarts"]

        os.killpg(victim["pid"], signal.SIGKILL)
        answers = [chat(gateway, "many-0") for _ in range(6)]  # served by the survivor while the victim is down
        assert len(set(answers)) == 1
        assert chat(gateway, "a0@1")  # moved to the survivor (retried or re-placed), not failed

        def back_with_its_adapters() -> dict[str, Any] | None:
            now = engine_by_id(gateway, victim["id"])
            back = now["healthy"] and now["restarts"] == restarts + 1
            return now if back and pin_key in {r["engine_name"] for r in now["resident"]} else None

        now = wait_until(back_with_its_adapters, 400, "the engine back with its adapters", interval_s=1)
        assert now is not None
        assert held <= {r["engine_name"] for r in now["resident"]}
        direct = httpx.get(f"{now['url']}/v1/models", timeout=10).json()["data"]
        assert held <= {card["id"] for card in direct if card.get("parent")}  # vLLM itself holds them again
        assert now["pid"] != victim["pid"]
        readyz = f"{gateway.url}/readyz"
        wait_until(lambda: httpx.get(readyz, timeout=10).status_code == 200, 60, "/readyz 200 again", interval_s=0.5)
    finally:
        assert httpx.post(f"{gateway.url}/admin/adapters/unpin", json={"model": "a0@2"}, timeout=10).status_code == 200


def test_a_rollout_splits_an_alias_by_split_key_and_answers_name_the_version(
    gateway: GatewayUnderTest, pushed: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """`promote a0@2 --alias rollout --weight 10` through the admin API: a0@2 is loaded where a0@1 is first (a warm
    flip: no request pays its load); of 400 callers (each its own split key), 10% +/- 5 points get a0@2, each always
    the same version, and the answer says which one answered. (Last in the module: the alias it leaves behind would
    show in the others' /v1/models.)"""
    versions, _ = pushed
    gateway.registry.promote("a0@1", "rollout")

    def ask(key: str) -> tuple[str, str]:
        answer = httpx.post(
            f"{gateway.base_url}/chat/completions",
            json={"model": "a0:rollout", "messages": HELLO, "max_tokens": 1},
            headers={"x-loragate-split-key": key},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        return answer.headers["x-loragate-adapter"], answer.json()["model"]

    def resident(lora_name: str) -> list[str]:
        return sorted(e["id"] for e in gateway.engines() if lora_name in [r["engine_name"] for r in e["resident"]])

    def loads() -> float:
        return gateway.metric("loragate_adapter_loads_total", adapter="a0", version="2")

    assert ask("warm-up")[0] == "a0@1"
    holders = resident(versions["a0@1"].engine_name)
    if resident(versions["a0@2"].engine_name):
        assert httpx.post(f"{gateway.url}/admin/adapters/unload", json={"model": "a0@2"}, timeout=60).status_code == 200
    assert holders and not resident(versions["a0@2"].engine_name)
    before = loads()
    moved = httpx.post(
        f"{gateway.url}/admin/aliases/promote", json={"ref": "a0@2", "alias": "rollout", "weight": 10}, timeout=120
    )
    assert moved.status_code == 200, moved.text
    assert (moved.json()["serves"], moved.json()["split"]) == ("a0@1 (90%), a0@2 (10%)", {"version": 2, "weight": 10})
    # A warm flip: loaded where a0@1 is before any request could go to it, and no request after pays a load
    assert moved.json()["warmed_on"] == holders and resident(versions["a0@2"].engine_name) == holders
    assert loads() == before + len(holders)
    picks = gateway.registry.resolve_split("a0:rollout")
    canaries = [key for key in (f"canary-{i}" for i in range(200)) if picks.pick(f"header:{key}").version == 2][:10]
    assert len(canaries) == 10 and {ask(key)[0] for key in canaries} == {"a0@2"}
    assert loads() == before + len(holders)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [f"user-{i}" for i in range(400)]))
    candidate = [ref for ref, _ in answers].count("a0@2") / len(answers)
    assert 0.05 <= candidate <= 0.15, candidate
    assert {ref: model for ref, model in answers} == {v.ref: v.engine_name for v in versions.values()}
    for i in (0, 1, 2, 3):
        assert {ask(f"user-{i}") for _ in range(3)} == {answers[i]}  # a caller sticks to its version
    card = client(gateway).models.retrieve("a0:rollout").model_dump()
    assert (card["resolves_to"], card["split"]) == ("a0@1", {"candidate": "a0@2", "weight": 10})
    undone = httpx.post(f"{gateway.url}/admin/aliases/rollback", json={"name": "a0", "alias": "rollout"}, timeout=30)
    assert (undone.status_code, undone.json()["serves"]) == (200, "a0@1")
    assert {ask(f"user-{i}")[0] for i in range(40)} == {"a0@1"}
    # a version this gateway would refuse (rank 32 over the engines' 16) is refused before the alias moves, audited
    wide = gateway.registry.push(build_random_adapter(tiny_model, tmp_path / "r32", seed=8, r=32), "a0", "tiny")
    refused = httpx.post(
        f"{gateway.url}/admin/aliases/promote", json={"ref": wide.ref, "alias": "rollout", "weight": 10}, timeout=30
    )
    assert (refused.status_code, refused.json()["error"]["code"]) == (400, "adapter_refused"), refused.text
    assert gateway.registry.alias_records("a0")["rollout"].split is None
    audited = [e for e in gateway.state.security.audit.read() if e["action"] == "registry.promote"][-1]
    assert (audited["target"], audited["result"]) == (f"{wide.ref} -> :rollout", "error")
