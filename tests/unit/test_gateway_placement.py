"""Placement v2 (gateway.routing.place, replicas_wanted) and the dispatcher that drives it (gateway.dispatch)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from prometheus_client import CollectorRegistry

from gateway.dispatch import Ask, Decision, Dispatcher
from gateway.ledger import ResidencyLedger
from gateway.metrics import GatewayMetrics
from gateway.routing import EngineView, Hold, Placement, Policy, Refusal, place, rendezvous_order, replicas_wanted

POLICY = Policy(max_queue=10, load_bucket=2, replica_min_load=4, slot_wait_s=1.0, max_loading_fraction=0.5)
ENGINES = ("e0", "e1", "e2", "e3")
HOME, SECOND, THIRD, FOURTH = rendezvous_order(ENGINES, "a")


def ledger(cpu_slots: int = 3, **resident: list[str]) -> ResidencyLedger:
    led = ResidencyLedger()
    for engine in ENGINES:
        led.add_engine(engine, cpu_slots)
        for key in resident.get(engine, []):
            led.record_loaded(engine, key)
    return led


def view(engine: str, **kw: object) -> EngineView:
    fields: dict[str, object] = {"gpu_slots": 2, **kw}
    for name in ("active", "closing"):
        if name in fields:
            fields[name] = frozenset(fields[name])  # type: ignore[arg-type]
    return EngineView(engine, **fields)  # type: ignore[arg-type]


def views(**per_engine: dict[str, object]) -> list[EngineView]:
    return [view(engine, **per_engine.get(engine, {})) for engine in ENGINES]


@pytest.mark.parametrize(
    ("case", "engines", "resident", "replicas", "expected"),
    [
        ("cold adapter: loaded on its home", views(), {}, 1, Placement(HOME, load=True)),
        ("resident on its home", views(), {HOME: ["a"]}, 1, Placement(HOME)),
        # a copy beyond the candidates (left by an engine that joined, or a replica set that shrank) serves without
        # a load until it is evicted, unless the home is two load buckets lighter
        ("resident beyond the candidates: served there", views(), {SECOND: ["a"]}, 1, Placement(SECOND)),
        (
            "resident beyond the candidates, home far lighter: loaded on its home",
            views(**{SECOND: {"queue": 12}}),
            {SECOND: ["a"]},
            1,
            Placement(HOME, load=True),
        ),
        (
            "home's GPU slots hold two other adapters: wait",
            views(**{HOME: {"active": {"x", "y"}}}),
            {HOME: ["a", "x", "y"]},
            1,
            Hold.SLOT,
        ),
        (
            "in the working set already: joins it even when the slots are full",
            views(**{HOME: {"active": {"a", "y"}}}),
            {HOME: ["a", "y"]},
            1,
            Placement(HOME),
        ),
        (
            "closing on its home: no new calls there",
            views(**{HOME: {"active": {"a", "y"}, "closing": {"a"}}}),
            {HOME: ["a", "y"]},
            1,
            Hold.SLOT,
        ),
        (
            "a free slot promised to another adapter",
            views(**{HOME: {"active": {"y"}, "promised": "w"}}),
            {HOME: ["a", "y"]},
            1,
            Hold.SLOT,
        ),
        (
            "two replicas: the less loaded one, within a bucket the holder",
            views(**{HOME: {"queue": 1}, SECOND: {"queue": 0}}),
            {HOME: ["a"], SECOND: ["a"]},
            2,
            Placement(HOME),
        ),
        (
            "two replicas, both hold it: a bucket less loaded wins",
            views(**{HOME: {"queue": 5}, SECOND: {"queue": 1}}),
            {HOME: ["a"], SECOND: ["a"]},
            2,
            Placement(SECOND),
        ),
        (
            "two replicas, only home holds it, second one bucket lighter: no load",
            views(**{HOME: {"queue": 3}, SECOND: {"queue": 0}}),
            {HOME: ["a"]},
            2,
            Placement(HOME),
        ),
        (
            "two replicas, second two buckets lighter: load it there",
            views(**{HOME: {"queue": 5}, SECOND: {"queue": 0}}),
            {HOME: ["a"]},
            2,
            Placement(SECOND, load=True),
        ),
        (
            "home full and not holding: the second replica loads",
            views(**{HOME: {"active": {"x", "y"}}}),
            {},
            2,
            Placement(SECOND, load=True),
        ),
        (
            "a load running on home: the request waits for the budget",
            views(**{HOME: {"loading": "z"}}),
            {},
            1,
            Hold.LOADING,
        ),
        (
            "home is loading this adapter: the request joins the load",
            views(**{HOME: {"loading": "a", "active": {"a"}}}),
            {},
            1,
            Placement(HOME),
        ),
        (
            "load budget (half of 4 engines) spent elsewhere",
            views(**{THIRD: {"loading": "z"}, FOURTH: {"loading": "q"}}),
            {},
            1,
            Hold.LOADING,
        ),
        (
            "load prices: the engine with fewer running requests to stall",
            views(**{HOME: {"load_s": 1.0, "running": 4}, SECOND: {"load_s": 1.0, "running": 0}}),
            {},
            2,
            Placement(SECOND, load=True),
        ),
        (
            "a free CPU slot before an eviction",
            views(),
            {HOME: ["x", "y", "z"]},
            2,
            Placement(SECOND, load=True),
        ),
        (
            "CPU cache full of busy adapters: nowhere to load",
            views(**{HOME: {"active": {"x"}, "gpu_slots": 4}}),
            {HOME: ["x", "y", "z"]},
            1,
            Placement(HOME, load=True, evict=("y",)),
        ),
        (
            "unhealthy home: the next engine is home",
            views(**{HOME: {"healthy": False}}),
            {},
            1,
            Placement(SECOND, True),
        ),
        ("no healthy engine", [view(e, healthy=False) for e in ENGINES], {}, 1, Refusal.NO_ENGINE),
        ("every queue full", [view(e, queue=10) for e in ENGINES], {HOME: ["a"]}, 1, Refusal.BUSY),
    ],
)
def test_place(
    case: str,
    engines: list[EngineView],
    resident: dict[str, list[str]],
    replicas: int,
    expected: Placement | Hold | Refusal,
) -> None:
    assert place("a", engines, ledger(**resident), POLICY, replicas=replicas) == expected, case


def test_place_waits_when_no_cpu_slot_can_be_freed() -> None:
    led = ledger(cpu_slots=2, **{HOME: ["x", "y"]})
    engines = views(**{HOME: {"active": {"x", "y"}, "gpu_slots": 4}})
    assert place("a", engines, led, POLICY) is Hold.RESIDENT


def test_a_pinned_adapter_may_go_to_any_engine() -> None:
    led = ledger(**{e: ["a"] for e in ENGINES})
    led.pin("a")
    engines = views(**{HOME: {"queue": 8}, SECOND: {"queue": 8}, THIRD: {"queue": 8}})
    assert place("a", engines, led, POLICY) == Placement(FOURTH)


def test_base_requests_take_the_least_loaded_engine_and_never_wait() -> None:
    engines = views(**{e: {"queue": 3, "active": {"x", "y"}} for e in ENGINES if e != THIRD})
    assert place(None, engines, ledger(), POLICY) == Placement(THIRD)


@pytest.mark.parametrize(
    ("demand", "total", "engines", "current", "expected"),
    [
        (1, 1, 4, 1, 1),  # a lone request: its home
        (4, 4, 4, 1, 1),  # the minimum share (4) is not exceeded
        (5, 5, 4, 1, 2),  # past it: a second engine
        (64, 128, 4, 1, 2),  # half the load over 4 engines: 2 shares of 32
        (96, 128, 4, 2, 3),  # grows at once
        (128, 128, 4, 1, 4),  # everything: every engine
        (500, 500, 4, 1, 4),  # never more than the engines
        (40, 128, 4, 2, 2),  # 1.25 shares: stays at 2 (hysteresis)
        (15, 128, 4, 2, 1),  # below half a share: one fewer
        (70, 128, 4, 4, 4),  # 2.2 shares: 3 would do, but not below half a share each: stays
        (40, 128, 4, 4, 3),  # one at a time
        (3, 0, 4, 1, 1),  # no load at all (a stale total)
        (10, 10, 0, 1, 1),  # no engine yet
    ],
)
def test_replicas_wanted(demand: float, total: float, engines: int, current: int, expected: int) -> None:
    assert replicas_wanted(demand, total, engines, current, POLICY) == expected


# -- the dispatcher ------------------------------------------------------------------------------------------------


@dataclass
class FakeEngine:
    id: str
    healthy: bool = True
    inflight: int = 0
    waiting: int = 0
    running: int = 0
    max_loras: int = 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A dispatcher over fake engines; the test plays the adapter manager (leases, loads, releases)."""

    def __init__(self, engines: int = 2, gpu_slots: int = 1, policy: Policy = POLICY, cpu_slots: int = 4) -> None:
        self.engines = {f"e{i}": FakeEngine(f"e{i}", max_loras=gpu_slots) for i in range(engines)}
        self.ledger = ResidencyLedger()
        for engine in self.engines:
            self.ledger.add_engine(engine, cpu_slots)
        self.clock = Clock()
        self.dispatcher = Dispatcher(self.ledger, policy, lambda: list(self.engines.values()), self.clock)
        self.placed: list[tuple[str, str | None, Decision]] = []

    def ask(self, key: str | None, request_id: str = "") -> Decision | None:
        def on_ready(decision: Decision) -> None:
            self._take(request_id, key, decision)

        decision = self.dispatcher.offer(Ask(key, request_id or f"r{len(self.placed)}", on_ready))
        if decision is not None:
            self._take(request_id, key, decision)
        return decision

    def _take(self, request_id: str, key: str | None, decision: Decision) -> None:
        self.placed.append((request_id, key, decision))
        if isinstance(decision, Placement):
            self.engines[decision.engine].inflight += 1
            if decision.load and key is not None:
                self.ledger.record_loaded(decision.engine, key)
                self.dispatcher.load_done(decision.engine, key, 0.5)

    def done(self, engine: str, key: str | None) -> None:
        self.engines[engine].inflight -= 1
        self.dispatcher.release(engine, key)

    def order(self) -> list[str]:
        return [request_id for request_id, _, _ in self.placed]


def test_a_cold_adapter_is_not_starved_by_a_hot_one_on_its_engine() -> None:
    """One engine, one GPU slot: the hot adapter holds it with a stream of calls; the cold request waits, then
    gets the slot handed over after slot_wait_s, and the hot adapter's new calls wait meanwhile."""
    h = Harness(engines=1, gpu_slots=1)
    assert isinstance(h.ask("hot", "h0"), Placement)
    assert h.ask("cold", "c0") is None  # its only engine's slot is taken
    h.ask("hot", "h1")  # queued behind the cold one, but its turn comes at once: it is in the working set
    assert h.order() == ["h0", "h1"]
    h.clock.now += 1.0
    h.dispatcher.pump()  # overdue: the hot adapter is closing on e0
    assert h.dispatcher.closing["e0"] == {"hot"} and h.dispatcher.promised == {"e0": "cold"}
    h.ask("hot", "h2")  # no new calls for a closing adapter
    h.done("e0", "hot")
    assert h.order() == ["h0", "h1"]
    h.done("e0", "hot")  # the last hot call ends: the slot goes to the cold request, then the hot one waits
    assert h.order() == ["h0", "h1", "c0"]
    assert h.dispatcher.active("e0") == {"cold"} and not h.dispatcher.closing["e0"] and not h.dispatcher.promised
    h.done("e0", "cold")
    assert h.order() == ["h0", "h1", "c0", "h2"]


@pytest.mark.parametrize(
    ("policy", "in_flight"),
    [
        (POLICY, 2),  # the cap: max_loras adapters in flight on an engine; the next waits in the gateway
        (replace(POLICY, working_set_slack=1), 3),  # one more may be in flight (its requests wait in vLLM's queue)
        (replace(POLICY, working_set_cap=False), 4),  # no cap: vLLM's scheduler alone keeps a batch to max_loras
    ],
)
def test_the_working_set_cap_its_slack_and_none(policy: Policy, in_flight: int) -> None:
    h = Harness(engines=1, gpu_slots=2, policy=policy)
    placed = [isinstance(h.ask(key, f"{key}0"), Placement) for key in "abcd"]
    assert placed == [True] * in_flight + [False] * (4 - in_flight)
    if in_flight < 4:
        h.done("e0", "a")  # a call ends: the first waiting adapter takes its place
        assert h.order() == [f"{key}0" for key in "abcd"[: in_flight + 1]]


def test_waiting_adapters_are_served_in_turn() -> None:
    """One slot, adapters x (3 waiting) and y (1 waiting, queued after them): y is served second, not fourth."""
    h = Harness(engines=1, gpu_slots=1)
    h.ask("busy", "b")
    for request_id, key in (("x1", "x"), ("x2", "x"), ("x3", "x"), ("y1", "y")):
        assert h.ask(key, request_id) is None
    h.done("e0", "busy")  # x1 takes the slot; x2 and x3 join x's working set at once
    assert h.order() == ["b", "x1", "x2", "x3"]
    h.clock.now += 1.0
    h.dispatcher.pump()
    for _ in range(3):
        h.done("e0", "x")
    assert h.order()[-1] == "y1"


def test_a_request_that_gives_up_leaves_the_queue() -> None:
    h = Harness(engines=1, gpu_slots=1)
    h.ask("busy", "b")
    ask = Ask("x", "x1", lambda decision: pytest.fail("a cancelled request was placed"))
    assert h.dispatcher.offer(ask) is None
    h.dispatcher.cancel(ask)
    assert not h.dispatcher.waiting
    h.done("e0", "busy")
    assert h.order() == ["b"]


def test_a_hot_adapter_spreads_and_shrinks_back_after_the_hold() -> None:
    h = Harness(engines=4, gpu_slots=4, policy=Policy(replica_min_load=2, replica_hold_s=10.0, load_bucket=1))
    for i in range(16):
        assert isinstance(h.ask("hot", f"h{i}"), Placement)  # a lighter engine is loaded 2 requests apart
    engines = {decision.engine for _, _, decision in h.placed if isinstance(decision, Placement)}
    assert len(engines) == 4 and h.dispatcher.replicas("hot") == 4
    for _, _, decision in h.placed:
        assert isinstance(decision, Placement)
        h.done(decision.engine, "hot")
    h.clock.now += 60.0  # idle long enough for the smoothed demand to fall

    def one(request_id: str) -> int:
        decision = h.ask("hot", request_id)
        assert isinstance(decision, Placement)
        h.done(decision.engine, "hot")
        return h.dispatcher.replicas("hot")

    assert one("late") == 3  # one fewer...
    assert one("later") == 3  # ...and not again within replica_hold_s
    h.clock.now += 11.0
    assert one("latest") == 2


def test_loads_are_budgeted_and_priced() -> None:
    """Four engines, half may load at once: a burst of 4 cold adapters with different homes loads 2, the others
    wait for the budget and go when a load ends."""
    h = Harness(engines=4, gpu_slots=2)
    homes: dict[str, str] = {}
    keys = []
    for i in range(400):
        key = f"k{i}"
        home = rendezvous_order(list(h.engines), key)[0]
        if home not in homes.values():
            homes[key] = home
            keys.append(key)
        if len(keys) == 4:
            break

    def hold_loads(decision: Decision, key: str) -> None:
        h.placed.append((key, key, decision))

    asks = [Ask(key, key, lambda d, k=key: hold_loads(d, k)) for key in keys]  # type: ignore[misc]
    results = [h.dispatcher.offer(ask) for ask in asks]
    started = [r for r in results if isinstance(r, Placement)]
    assert len(started) == 2 and all(p.load for p in started)
    assert sum(r is None for r in results) == 2 and {a.held for a in asks[2:]} == {Hold.LOADING}
    first = started[0]
    h.ledger.record_loaded(first.engine, keys[0])
    h.dispatcher.load_done(first.engine, keys[0], 2.0)  # a load ended: the next one may start
    assert len(h.placed) == 1 and h.dispatcher.load_s[first.engine] == 2.0


def test_v1_placement_is_still_available() -> None:
    h = Harness(engines=2, gpu_slots=1, policy=Policy(placement="v1"))
    h.ask("x", "x1")
    h.ask("y", "y1")
    h.ask("z", "z1")  # v1 ignores GPU slots: placed at once
    assert h.order() == ["x1", "y1", "z1"]


def test_slot_pressure_counts_working_sets_and_waiting_adapters() -> None:
    """The autoscaling signal: one slot per adapter per engine it runs on, plus one per waiting adapter that runs
    nowhere (so 3 on a one-slot engine asked for three adapters at once: three engines' worth)."""
    h = Harness(engines=1, gpu_slots=1)
    assert (h.dispatcher.slots_wanted(), h.dispatcher.waiting_requests()) == (0, 0)
    h.ask("a", "a0")
    h.ask("b", "b0")
    h.ask("c", "c0")
    h.ask("c", "c1")
    assert (h.dispatcher.slots_wanted(), h.dispatcher.waiting_requests()) == (3, 3)
    h.ask("a", "a1")  # joins a's working set at once: no more slots wanted
    assert h.order() == ["a0", "a1"] and h.dispatcher.slots_wanted() == 3
    h.done("e0", "a")
    h.done("e0", "a")  # the slot goes to b
    assert h.order()[-1] == "b0" and (h.dispatcher.slots_wanted(), h.dispatcher.waiting_requests()) == (2, 2)


def test_slot_pressure_is_exported_at_scrape_time() -> None:
    metrics = GatewayMetrics(registry=CollectorRegistry())
    h = Harness(engines=1, gpu_slots=1)
    metrics.watch_dispatcher(h.dispatcher)
    h.ask("a", "a0")
    h.ask("b", "b0")
    text = metrics.render()[0].decode()
    assert "loragate_adapter_slots_wanted 2.0" in text and "loragate_waiting_requests 1.0" in text
    h.done("e0", "a")
    text = metrics.render()[0].decode()
    assert "loragate_adapter_slots_wanted 1.0" in text and "loragate_waiting_requests 0.0" in text


@pytest.mark.parametrize(
    ("busy", "keep", "expected"),
    [
        ((), (), ("x",)),  # least recently used first
        ((), ("x",), ("y",)),  # requests wait for x: y goes instead
        ((), ("x", "y"), ("x",)),  # everything is wanted: least recently used again
        (("y",), ("x",), ("x",)),  # y is busy, so the kept one goes after all
        (("x", "y"), (), None),  # busy adapters never go
    ],
)
def test_a_load_evicts_adapters_with_waiting_requests_last(
    busy: tuple[str, ...], keep: tuple[str, ...], expected: tuple[str, ...] | None
) -> None:
    residency = ledger(cpu_slots=2, e0=["x", "y"])
    assert residency.plan_admit("e0", "a", busy, keep) == expected


@pytest.mark.parametrize(
    ("demand", "keep", "expected"),
    [
        ({"x": 3.0, "y": 0.2}, (), ("y",)),  # x is older but wanted more lately: y goes
        ({"x": 0.0, "y": 0.0}, (), ("x",)),  # a tie: least recently used
        ({"x": 3.0, "y": 0.2}, ("y",), ("x",)),  # waiting requests still come first
    ],
)
def test_a_load_evicts_the_least_wanted_adapter(
    demand: dict[str, float], keep: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    residency = ledger(cpu_slots=2, e0=["x", "y"])
    assert residency.plan_admit("e0", "a", (), keep, demand.__getitem__) == expected


def test_a_hot_adapter_idle_for_a_moment_is_not_the_one_evicted() -> None:
    """One engine, two CPU slots: hot ran six calls for 3 s, cold one call after it; a third adapter's load evicts
    cold with routing.evict: demand, though hot was used less recently (with the default, lru: hot)."""
    for evict, victim in (("demand", "cold"), ("lru", "hot")):
        h = Harness(engines=1, gpu_slots=2, cpu_slots=2, policy=Policy(evict=evict))
        for i in range(6):
            h.ask("hot", f"h{i}")
        h.clock.now += 3.0
        for _ in range(6):
            h.done("e0", "hot")
        h.clock.now += 1.0
        h.ask("cold", "c0")
        h.clock.now += 0.5
        h.done("e0", "cold")
        h.clock.now += 1.0
        decision = h.ask("third", "t0")
        assert isinstance(decision, Placement) and decision.evict == (victim,), (evict, decision)
        assert h.dispatcher.demand("hot") > h.dispatcher.demand("cold") > 0


def test_place_passes_the_waiting_adapters_to_the_eviction_plan() -> None:
    residency = ledger(cpu_slots=2, **{HOME: ["x", "y"]})
    assert place("a", views(), residency, POLICY) == Placement(HOME, load=True, evict=("x",))
    assert place("a", views(), residency, POLICY, keep={"x"}) == Placement(HOME, load=True, evict=("y",))


# -- the pass prefilter (gateway.dispatch._Openings) ---------------------------------------------------------------


def drive(
    dispatcher: Dispatcher, engines: dict[str, FakeEngine], ledger_: ResidencyLedger, clock: Clock, seed: int
) -> None:
    """Random traffic through `dispatcher` as the adapter manager makes it: requests for Zipf-like adapters and the
    base model, calls that end, loads that take a while (so engines are seen loading) and end, time passing."""
    rng = random.Random(seed)
    inflight: list[tuple[str, str | None]] = []
    loads: list[tuple[str, str]] = []

    def take(lora_name: str | None, decision: Decision) -> None:
        if not isinstance(decision, Placement):
            return
        engines[decision.engine].inflight += 1
        engines[decision.engine].running = engines[decision.engine].inflight
        inflight.append((decision.engine, lora_name))
        for victim in decision.evict:
            ledger_.record_unloaded(decision.engine, victim)
        if decision.load and lora_name is not None:
            loads.append((decision.engine, lora_name))

    for i in range(400):
        roll = rng.random()
        if roll < 0.45:
            lora_name = None if rng.random() < 0.05 else f"a{min(int(rng.paretovariate(0.8)), 40)}"
            ask = Ask(lora_name, f"r{i}", lambda d, k=lora_name: take(k, d))  # type: ignore[misc]
            decision = dispatcher.offer(ask)
            if decision is not None:
                take(lora_name, decision)
        elif roll < 0.75 and inflight:
            engine, lora_name = inflight.pop(rng.randrange(len(inflight)))
            engines[engine].inflight -= 1
            engines[engine].running = engines[engine].inflight
            dispatcher.release(engine, lora_name)
        elif roll < 0.9 and loads:
            engine, lora_name = loads.pop(rng.randrange(len(loads)))
            ledger_.record_loaded(engine, lora_name)
            dispatcher.load_done(engine, lora_name, rng.uniform(0.05, 2.0))
        else:
            clock.now += rng.uniform(0.0, 1.5)
            dispatcher.pump()


def test_the_pass_prefilter_holds_exactly_what_placement_would_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every adapter the prefilter skips is one `place` holds, for the same reason; random traffic over random
    engine shapes and policies. Asked against the engines as they are when it answers (a pass's openings only grow
    stale towards asking placement more, which is checked too)."""
    from gateway.dispatch import _Openings

    seen: Counter[Hold] = Counter()
    asked = 0
    hold_of = _Openings.hold

    def checked(self: _Openings, ask: Ask, queued: int, now: float) -> Hold | None:
        nonlocal asked
        held = hold_of(self, ask, queued, now)
        asked += 1
        fresh = self.dispatcher._openings()
        now_held = hold_of(fresh, ask, queued, now) if fresh is not None else None
        if held is not None and fresh is not None and fresh.taking:  # (none taking: the queues filled up in the pass)
            assert now_held is not None, "a stale pass skipped an adapter placement could place now"
        if now_held is not None:
            assert self.dispatcher._decide(ask, now) == now_held, (ask.lora_name, now_held)
            seen[now_held] += 1
        return held

    monkeypatch.setattr(_Openings, "hold", checked)
    rng = random.Random(7)
    for seed in range(20):
        n, gpu_slots = rng.choice([2, 3, 4, 8]), rng.choice([1, 2, 4])
        policy = Policy(
            max_queue=rng.choice([3, 6, 256]),
            load_bucket=rng.choice([1, 4]),
            replica_min_load=rng.choice([2.0, 4.0]),
            slot_wait_s=rng.choice([0.2, 1.0]),
            max_loading_fraction=rng.choice([0.25, 0.5, 1.0]),
            spill=rng.random() < 0.8,
            min_load_s=rng.choice([0.1, 1.0]),
            working_set_slack=rng.choice([0, 0, 1, 2]),
        )
        engines = {f"e{i}": FakeEngine(f"e{i}", max_loras=gpu_slots) for i in range(n)}
        residency = ResidencyLedger()
        for engine in engines:
            residency.add_engine(engine, gpu_slots + rng.choice([0, 1, 4]))
        if rng.random() < 0.2:
            residency.pin("a1")
            for engine in engines:
                residency.record_loaded(engine, "a1")
        clock = Clock()
        dispatcher = Dispatcher(residency, policy, lambda e=engines: list(e.values()), clock)  # type: ignore[misc]
        drive(dispatcher, engines, residency, clock, seed)
    assert asked > 1000 and all(seen[hold] > 20 for hold in Hold), (asked, seen)
