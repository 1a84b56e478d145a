"""Placement decisions: residency ledger, LRU eviction, pins, overload, rendezvous agreement."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.ledger import ResidencyLedger
from gateway.routing import (
    EngineLoad,
    Placement,
    Policy,
    Refusal,
    choose_engine,
    rendezvous_order,
    rendezvous_score,
)

POLICY = Policy(overload_threshold=4, max_queue=10, load_bucket=2)


def ledger(slots: int = 2, **resident: list[str]) -> ResidencyLedger:
    led = ResidencyLedger()
    for engine in ("e0", "e1"):
        led.add_engine(engine, slots)
        for key in resident.get(engine, []):
            led.record_loaded(engine, key)
    return led


@pytest.mark.parametrize(
    ("resident", "pinned", "busy", "key", "expected"),
    [
        ([], [], [], "a", ()),  # empty: fits
        (["a", "b"], [], [], "a", ()),  # already there
        (["x"], [], [], "a", ()),  # one free slot
        (["x", "y"], [], [], "a", ("x",)),  # full: least recently used goes
        (["x", "y"], ["x"], [], "a", ("y",)),  # pinned never evicted
        (["x", "y"], [], ["x"], "a", ("y",)),  # busy never evicted
        (["x", "y"], ["x"], ["y"], "a", None),  # nothing evictable
        (["x", "y", "z"], [], [], "a", ("x", "y")),  # over capacity (a peer loaded more): evict down to fit
    ],
)
def test_plan_admit(
    resident: list[str], pinned: list[str], busy: list[str], key: str, expected: tuple[str, ...] | None
) -> None:
    led = ledger(e0=resident)
    for k in pinned:
        led.pin(k)
    assert led.plan_admit("e0", key, busy) == expected


def test_ledger_lru_order_follows_touch_and_unload() -> None:
    led = ledger(e0=["x", "y"])
    led.touch("e0", "x")
    assert led.resident("e0") == ["y", "x"]
    assert led.plan_admit("e0", "a") == ("y",)
    led.touch("e0", "missing")
    led.record_unloaded("e0", "y")
    led.record_unloaded("e9", "y")
    assert led.resident("e0") == ["x"] and led.holders("x") == ["e0"] and led.holders("y") == []
    led.pin("x")
    assert led.pinned == frozenset({"x"})
    led.unpin("x")
    led.remove_engine("e1")
    assert led.engines() == ["e0"] and led.slots("e0") == 2 and led.resident("e1") == []


def loads(q0: int = 0, q1: int = 0, h0: bool = True, h1: bool = True) -> list[EngineLoad]:
    return [EngineLoad("e0", h0, inflight=q0), EngineLoad("e1", h1, waiting=q1)]


FIRST = rendezvous_order(["e0", "e1"], "a")[0]
SECOND = "e1" if FIRST == "e0" else "e0"


@pytest.mark.parametrize(
    ("case", "engines", "resident", "expected"),
    [
        ("holder wins", loads(), {"e1": ["a"]}, Placement("e1")),
        ("less loaded holder", loads(1, 3), {"e0": ["a"], "e1": ["a"]}, Placement("e0")),
        ("overloaded holder passed over", loads(0, 5), {"e1": ["a"]}, Placement("e0", load=True)),
        ("free slot before eviction", loads(), {"e0": ["x", "y"]}, Placement("e1", load=True)),
        ("evict when no free slot", loads(), {"e0": ["x", "y"], "e1": ["z"]}, Placement("e1", load=True)),
        ("rendezvous decides a tie", loads(), {}, Placement(FIRST, load=True)),
        (
            "same bucket: rendezvous still decides",
            loads(1, 0) if FIRST == "e0" else loads(0, 1),
            {},
            Placement(FIRST, load=True),
        ),
        ("other bucket: least loaded", loads(3, 0) if FIRST == "e0" else loads(0, 3), {}, Placement(SECOND, load=True)),
        ("unhealthy holder skipped", loads(h1=False), {"e1": ["a"]}, Placement("e0", load=True)),
        ("all overloaded: holder", loads(5, 6), {"e1": ["a"]}, Placement("e1")),
        ("all overloaded, no holder: room", loads(5, 6), {}, Placement("e0", load=True)),
        ("no engine", loads(h0=False, h1=False), {}, Refusal.NO_ENGINE),
        ("queues full", loads(10, 12), {"e0": ["a"]}, Refusal.BUSY),
    ],
)
def test_choose_engine(
    case: str, engines: list[EngineLoad], resident: dict[str, list[str]], expected: Placement | Refusal
) -> None:
    assert choose_engine("a", engines, ledger(**resident), POLICY) == expected, case


def test_choose_engine_evicts_least_recent_and_respects_busy_and_pins() -> None:
    led = ledger(e0=["x", "y"], e1=["p", "q"])
    led.pin("p")
    assert choose_engine("a", loads(), led, POLICY, busy={"e0": {"x", "y"}}) == Placement("e1", True, ("q",))
    assert choose_engine("a", loads(), led, POLICY, busy={"e0": {"x", "y"}, "e1": {"q"}}) is Refusal.NO_SLOT


def test_base_requests_go_to_the_least_loaded_engine() -> None:
    assert choose_engine(None, loads(3, 1), ledger(), POLICY) == Placement("e1")
    spread = Counter(
        choose_engine(None, loads(), ledger(), POLICY, spread_key=f"r{i}").engine  # type: ignore[union-attr]
        for i in range(200)
    )
    assert set(spread) == {"e0", "e1"}


def test_rendezvous_moves_only_the_leaving_engines_share() -> None:
    keys = [f"adapter-{i}" for i in range(300)]
    engines = ["e0", "e1", "e2", "e3"]
    before = {k: rendezvous_order(engines, k)[0] for k in keys}
    after = {k: rendezvous_order([e for e in engines if e != "e2"], k)[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "e2"}
    joined = {k: rendezvous_order([*engines, "e4"], k)[0] for k in keys}
    assert {k for k in keys if joined[k] != before[k]} == {k for k in keys if joined[k] == "e4"}
    assert rendezvous_score("e0", "a") == rendezvous_score("e0", "a") != rendezvous_score("e1", "a")


def test_two_gateways_with_the_same_view_agree() -> None:
    views = [ledger(e0=["x"]), ledger(e0=["x"])]
    for key in ("a", "b", "c", "d"):
        first, second = (choose_engine(key, loads(1, 0), view, POLICY) for view in views)
        assert first == second
