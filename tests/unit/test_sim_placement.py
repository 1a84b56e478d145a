"""The placement simulator's own rules (benchmarks/sim_placement.py): a run of limited duration measured as
`loragate bench` measures one, and loads slowed by the other engines on the same device."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sim_placement", ROOT / "benchmarks" / "sim_placement.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_placement"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def scenario(sim: ModuleType, **changes: object) -> object:
    base = sim.Scenario(engines=2, adapters=8, clients=8, requests=400, prompt_tokens=(16, 16), output_tokens=(8, 8))
    return replace(base, **changes)


COSTS = dict(step_s=0.01, per_seq_s=0.001, per_lora_s=0.002, prefill_token_s=0.0, load_s=0.5, max_num_seqs=256)


def test_a_window_sends_nothing_after_its_duration_and_cuts_what_is_left(sim: ModuleType) -> None:
    costs = sim.Costs(**COSTS)
    # one slot and one CPU slot per engine over 8 adapters: round-robin loads before nearly every batch, so requests
    # are still waiting when the drain ends
    window = scenario(sim, duration_s=3.0, drain_s=0.5, max_loras=1, max_cpu_loras=1, requests=10_000)
    row = sim.simulate("round-robin", window, costs)
    assert row["cut"] > 0
    assert row["last_sent_s"] < 3.0
    unbounded = sim.simulate("round-robin", replace(window, duration_s=None, requests=400), costs)
    assert unbounded["last_sent_s"] > 3.5  # the same clients keep sending without a window
    assert row["simulated_s"] == pytest.approx(3.5)
    assert row["requests_per_s"] == pytest.approx(row["requests"] / 3.5)
    # a cut request's TTFT counts the time it waited, up to the cut: the p99 reaches the drain's end
    assert row["ttft_p99_s"] > 0.5


def test_a_window_that_drains_in_time_ends_at_the_last_answer(sim: ModuleType) -> None:
    costs = sim.Costs(**COSTS)
    row = sim.simulate("round-robin", scenario(sim, duration_s=2.0, drain_s=30.0, base_share=1.0), costs)
    assert row["cut"] == 0 and row["loads"] == 0
    assert 2.0 <= row["simulated_s"] < 2.5  # the last batch started before 2 s ends 8 steps later


def test_loads_slow_with_busy_neighbours_on_the_device(sim: ModuleType) -> None:
    costs = sim.Costs(**COSTS, load_neighbour_s=0.1, load_neighbour_lora_s=1.0)
    alone = sim.simulate("round-robin", scenario(sim, engines_per_device=1, requests=200), costs)
    shared = sim.simulate("round-robin", scenario(sim, engines_per_device=2, requests=200), costs)
    assert alone["load_p50_s"] == pytest.approx(0.5)
    assert shared["load_p50_s"] > 0.5
    assert shared["requests_per_s"] < alone["requests_per_s"]


def test_a_load_is_priced_by_what_each_neighbour_runs(sim: ModuleType) -> None:
    costs = sim.Costs(**COSTS, load_neighbour_s=0.1, load_neighbour_lora_s=1.0)
    engines = [sim.Engine(sim.Sim(), f"e{i}", costs, scenario(sim), lambda request: None) for i in range(3)]
    engine, base, lora = engines
    engine.neighbours = [base, lora]
    assert engine.load_time() == pytest.approx(0.5)  # neighbours idle
    base.batch = [sim.Request(0, 0, None, 16, 8)]
    lora.batch = [sim.Request(1, 0, "adapter-00001", 16, 8), sim.Request(2, 0, None, 16, 8)]
    assert engine.load_time() == pytest.approx(0.5 + 0.1 + 1.0)


def test_a_request_s_way_in_delays_its_first_token_without_stalling_the_engine(sim: ModuleType) -> None:
    quick = sim.simulate("round-robin", scenario(sim, base_share=1.0, clients=2, requests=40), sim.Costs(**COSTS))
    slow_in = sim.Costs(**COSTS, request_s=0.3)
    slow = sim.simulate("round-robin", scenario(sim, base_share=1.0, clients=2, requests=40), slow_in)
    assert slow["ttft_p50_s"] == pytest.approx(quick["ttft_p50_s"] + 0.3)
    assert slow["e2e_p99_s"] == pytest.approx(quick["e2e_p99_s"] + 0.3)


@pytest.mark.parametrize("placement", ["v2", "affinity"])
def test_prewarmed_engines_load_less_and_serve_more(sim: ModuleType, placement: str) -> None:
    costs = sim.Costs(**COSTS)
    # 8 adapters over 2 engines of 4 CPU slots each: a prewarmed engine holds some from the start
    cold = scenario(sim, max_loras=2, max_cpu_loras=4, requests=200)
    warm = replace(cold, prewarm=True)
    cold_row, warm_row = sim.simulate(placement, cold, costs), sim.simulate(placement, warm, costs)
    assert warm_row["loads"] < cold_row["loads"]
    assert warm_row["requests_per_s"] > cold_row["requests_per_s"]


@pytest.mark.parametrize(("placement", "placer"), [("v2", "Gateway"), ("round-robin", "RoundRobin")])
def test_prewarm_fills_each_home_or_every_engine_most_popular_first_up_to_its_cpu_slots(
    sim: ModuleType, monkeypatch: pytest.MonkeyPatch, placement: str, placer: str
) -> None:
    """The gateway's placements start with each engine holding its rendezvous share (what adapters.prewarm loads);
    round-robin with every engine holding the most popular (what a warm pool behind a Service holds)."""
    from gateway.routing import rendezvous_order

    warm = scenario(sim, engines=2, adapters=40, max_cpu_loras=3, prewarm=True)
    names = sim.adapter_names(warm)
    ids = ["e000", "e001"]
    held: dict[str, list[str]] = {engine: [] for engine in ids}
    for name in names:
        home = rendezvous_order(ids, name)[0]
        if len(held[home]) < 3:
            held[home].append(name)
    expected = held if placement == "v2" else {engine: names[:3] for engine in ids}
    # the simulated engines after set-up, before the first request
    captured: dict[str, list[str]] = {}
    cls = getattr(sim, placer)
    original = cls.__init__

    def spy(self: object, clock: object, engines: dict[str, ModuleType], *rest: object) -> None:
        captured.update({engine_id: list(engine.cache) for engine_id, engine in engines.items()})
        original(self, clock, engines, *rest)

    monkeypatch.setattr(cls, "__init__", spy)
    sim.simulate(placement, replace(warm, requests=10), sim.Costs(**COSTS))
    assert captured == expected
    assert all(len(cache) == 3 for cache in captured.values())


def test_the_gateways_api_calls_delay_its_loads_without_stalling_the_engine(sim: ModuleType) -> None:
    """`api_call_s`: each runtime-API call of a gateway load (the load, and an unload plus a listing per eviction)
    adds wall time after the engine's stall; the engine stalls for `load_s` alone, as for round-robin's in-step loads.
    One engine, one client, two adapters taking turns in one CPU slot: every request is a load with one eviction."""
    one = scenario(sim, engines=1, adapters=2, zipf=0.0, base_share=0.0, clients=1, requests=200, max_cpu_loras=1)
    plain = sim.simulate("v2", one, sim.Costs(**COSTS))
    slow = sim.simulate("v2", one, sim.Costs(**COSTS, api_call_s=0.1))
    assert slow["loads"] == plain["loads"] > 50
    assert slow["stalled_s"] == pytest.approx(plain["stalled_s"])
    assert slow["ttft_p99_s"] == pytest.approx(plain["ttft_p99_s"] + 0.3, abs=0.01)  # (1 + 2 x 1 eviction) calls
    assert slow["requests_per_s"] < plain["requests_per_s"]


def test_registered_beyond_the_cpu_cache_the_gateway_holds_more_than_the_engine_caches(
    sim: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`max_registered_loras`: the prewarmed gateway's ledger holds each engine's share up to the registered count,
    the engine's cache only its CPU slots (the most popular); a request for one registered but not cached is loaded
    inside the engine's step, so the engine loads more than when the gateway knows its cache exactly."""
    warm = scenario(sim, engines=2, adapters=40, max_loras=2, max_cpu_loras=3, prewarm=True, requests=600)
    registered = replace(warm, max_registered_loras=8)
    captured: dict[str, tuple[list[str], list[str]]] = {}
    original = sim.Gateway.__init__

    def spy(self: Any, clock: object, engines: dict[str, Any], *rest: object) -> None:
        original(self, clock, engines, *rest)
        captured.update({e.id: (list(e.cache), self.ledger.resident(e.id)) for e in engines.values()})

    monkeypatch.setattr(sim.Gateway, "__init__", spy)
    row = sim.simulate("v2", registered, sim.Costs(**COSTS))
    for cache, resident in captured.values():
        assert len(cache) == 3 and len(resident) == 8 and set(cache) <= set(resident)
        assert resident[-3:] == cache  # the cached ones are the most recently used in the ledger
    monkeypatch.setattr(sim.Gateway, "__init__", original)
    exact = sim.simulate("v2", warm, sim.Costs(**COSTS))
    assert row["loads"] > exact["loads"]
