"""`max_registered_loras` above the engine's `--max-cpu-loras`: the gateway keeps more adapters registered on the
real vLLM (CPU) engine than its CPU cache holds, vLLM drops and reloads them inside its steps, and every answer is
still the adapter's own."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters_registry.registry import open_registry
from gateway.app import create_app
from gateway.engine_process import EngineProcess, free_port
from gateway.settings import load_settings
from tests.fixtures.gateway import derive_adapter, served
from tests.harness import wait_until

pytestmark = pytest.mark.integration
PROMPT = [{"role": "user", "content": "Name three colours"}]


def engine_adapters(url: str) -> set[str]:
    cards = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {card["id"] for card in cards if card.get("parent")}


def answer(url: str, model: str) -> str:
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def test_more_adapters_registered_than_the_cpu_cache_holds_answer_as_themselves(
    vllm_engine: EngineProcess,
    adapter_dirs: list[Path],
    registry_template: Path,
    tmp_path: Path,
) -> None:
    shutil.copytree(registry_template, tmp_path / "registry")
    registry = open_registry(tmp_path / "registry")
    names = [f"reg-{i}" for i in range(6)]
    keys = [
        registry.push(derive_adapter(adapter_dirs[i % 2], tmp_path / name, seed=300 + i), name, "tiny").engine_name
        for i, name in enumerate(names)
    ]
    before = engine_adapters(vllm_engine.url)  # what other tests' gateways left on the shared engine
    budget = len(before) + 6  # the engine's CPU cache holds 4: all six of ours stay registered
    port = free_port()
    settings = load_settings(
        mode="external",
        base_name="tiny",
        port=port,
        registry=str(tmp_path / "registry"),
        external={"urls": [vllm_engine.url], "max_loras": 2, "max_cpu_loras": 4, "max_registered_loras": budget},
        health_interval_s=1.0,
        drain_grace_s=5.0,
    )
    with served(create_app(settings), port, "registered-gateway") as url:

        def healthy() -> bool:
            engines = httpx.get(f"{url}/admin/engines", timeout=10).json()["engines"]
            return bool(engines) and all(e["healthy"] for e in engines)

        wait_until(healthy, 120, "the gateway's engine healthy", interval_s=0.2, ignoring=(httpx.HTTPError,))
        (engine,) = httpx.get(f"{url}/admin/engines", timeout=10).json()["engines"]
        assert (engine["slots"], engine["cpu_slots"]) == (budget, 4)

        first = {name: answer(url, name) for name in names}
        assert set(keys) <= engine_adapters(vllm_engine.url)  # six registered, though vLLM caches four
        # Every one again: the first ones were dropped from vLLM's CPU cache and are reloaded inside its steps
        assert {name: answer(url, name) for name in names} == first
        for name, key in zip(names, keys, strict=True):
            assert answer(vllm_engine.url, key) == first[name]  # the engine itself, by the version's own name
        assert len(set(first.values())) > 1  # distinct adapters, distinct answers: a mix-up would show
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "loragate_adapter_evictions_total{" not in metrics  # nothing unloaded
        loads = [
            sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "loragate_adapter_loads_total"
        ]
        assert loads == [1.0] * 6  # one load each through the runtime API, none repeated
