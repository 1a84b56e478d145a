"""The gateway's side of placement: which requests are placed where, and which wait (synchronous, no I/O).

The adapter manager (gateway.adapters) asks `offer` for every request and does the loads and the HTTP; the
placement simulator (benchmarks/sim_placement.py) drives the same object with simulated time, so what it measures
is this code. Decisions come from gateway.routing (`place` for v2, `choose_engine` for v1). What the dispatcher
keeps:
- the calls in flight per engine and adapter (an engine's working set; never evicted while busy);
- each adapter's demand (requests in flight or waiting here) and its replica count (gateway.routing.replicas_wanted);
- the requests that wait, one FIFO per adapter, served in turn (one per adapter per pass), so a hot adapter's queue
  cannot starve a cold adapter's single request; each pass first sorts the engines into open, blocked and full
  (`_Openings`), so placement is asked only for the adapters one of them could take;
- slot hand-overs: a request that waited `slot_wait_s` for a GPU slot on its candidates marks the least busy
  adapter of one of them *closing* there; that adapter takes no new calls there, and when its last call ends the
  slot goes to the waiting one;
- the load in progress per engine and each engine's last load time (the price of the next one).
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from gateway.ledger import ResidencyLedger
from gateway.routing import (
    EngineLoad,
    EngineView,
    Hold,
    Placement,
    Policy,
    Refusal,
    candidates,
    choose_engine,
    place,
    rendezvous_rank,
    rendezvous_score,
    replicas_wanted,
)

Decision = Placement | Refusal
DEMAND_TAU_S = 5.0  # smoothing of an adapter's demand for shrinking its replicas (growth follows it at once)


class EngineState(Protocol):
    """What the dispatcher reads of an engine (gateway.supervisor.Engine has it)."""

    @property
    def id(self) -> str: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def inflight(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...

    @property
    def max_loras(self) -> int: ...


class Ask:
    """One request that wants an engine; `on_ready` gets its decision if it had to wait."""

    __slots__ = ("arrived", "exclude", "held", "lora_name", "on_ready", "request_id")

    def __init__(
        self,
        lora_name: str | None,
        request_id: str,
        on_ready: Callable[[Decision], None],
        exclude: frozenset[str] = frozenset(),
        arrived: float = 0.0,
    ) -> None:
        self.lora_name = lora_name
        self.request_id = request_id
        self.on_ready = on_ready
        self.exclude = exclude
        self.arrived = arrived
        self.held: Hold | None = None


@dataclass
class _Demand:
    count: int = 0  # requests in flight or waiting here
    smooth: float = 0.0  # the same, smoothed over DEMAND_TAU_S
    at: float = 0.0
    replicas: int = 1
    shrunk_at: float = -math.inf

    def advance(self, now: float) -> None:
        if now > self.at:
            self.smooth += (self.count - self.smooth) * (1 - math.exp(-(now - self.at) / DEMAND_TAU_S))
            self.at = now


class _Openings:
    """The engines as one pass of `Dispatcher.pump` finds them, to tell at once which waiting adapters placement
    could not place (`hold`), so that it is asked only for the others: with thousands of adapters waiting over a
    hundred engines, asking it for each one at every event is what a dispatcher would spend its time on.

    Engines are `open` (a free GPU slot, a load may start there), `blocked` (a free slot, but it is loading or the
    load budget is spent) or `full` (every slot taken, or the free one promised to a waiting adapter), each with the
    stall a load there would cost (what a spill beyond an adapter's candidates is weighed against). `joinable`:
    adapters placement could place without a load (running and not closing somewhere, resident or loading on an
    engine with a free slot, promised one)."""

    __slots__ = (
        "blocked",
        "budget",
        "cheapest",
        "dispatcher",
        "engines",
        "full",
        "joinable",
        "live",
        "loads",
        "open",
        "taking",
    )

    def __init__(self, dispatcher: Dispatcher, live: list[EngineState]) -> None:
        self.dispatcher = dispatcher
        self.engines = {engine.id: engine for engine in live}
        self.live = tuple(self.engines)
        self.budget = max(1, math.floor(len(live) * dispatcher.policy.max_loading_fraction))
        self.loads = sum(1 for engine in live if engine.id in dispatcher.loading)
        self.joinable: set[str] = set()
        self.taking: set[str] = set()  # engines placement considers (their queue below max_queue)
        self.open: dict[str, float] = {}
        self.blocked: dict[str, float] = {}
        self.full: dict[str, float] = {}
        self.cheapest: dict[int, float] = {}
        for engine in live:
            self._classify(engine)

    def _classify(self, engine: EngineState) -> None:
        dispatcher = self.dispatcher
        busy, closing = dispatcher.busy[engine.id], dispatcher.closing[engine.id]
        self.joinable.update(lora_name for lora_name in busy if lora_name not in closing)
        if engine.inflight + engine.waiting >= dispatcher.policy.max_queue:
            return  # placement leaves it out
        self.taking.add(engine.id)
        stall = max(dispatcher.load_s.get(engine.id, 0.0), dispatcher.policy.min_load_s) * (engine.running + 1)
        promised = dispatcher.promised.get(engine.id)
        slots = engine.max_loras + dispatcher.policy.working_set_slack
        if len(busy) >= slots or promised is not None:
            self.full[engine.id] = stall
            if promised is not None and len(busy) < slots:
                self.joinable.add(promised)
            return
        self.joinable.update(dispatcher.ledger.resident(engine.id))
        loading = dispatcher.loading.get(engine.id)
        if loading is not None:
            self.joinable.add(loading)
        if self.loads < self.budget and loading is None:
            self.open[engine.id] = stall
        else:
            self.blocked[engine.id] = stall

    def took(self, engine_id: str, load: bool) -> None:
        """A placement of this pass went to `engine_id` (starting a load there): what it took is taken from here too,
        so the adapters after it in the pass are not asked about an engine that is no longer open."""
        if load:
            self.loads += 1
            if self.loads >= self.budget:
                self.blocked.update(self.open)
                self.open.clear()
        for group in (self.open, self.blocked, self.full):
            group.pop(engine_id, None)
        self.cheapest.clear()
        self.taking.discard(engine_id)
        engine = self.engines.get(engine_id)
        if engine is not None:
            self._classify(engine)

    def hold(self, ask: Ask, queued: int, now: float) -> Hold | None:
        """Why placement would hold `ask` (the head of its adapter's queue of `queued`), or None: it may place it,
        ask it. The same answer as gateway.routing.place's, from its rules: a candidate engine that is open, or,
        past the wait a load's stall is worth (`waited x queued`), an open engine beyond them, may take it."""
        lora_name = ask.lora_name
        dispatcher = self.dispatcher
        if lora_name is None or lora_name in self.joinable or dispatcher.ledger.is_pinned(lora_name):
            return None
        if not self.taking:
            return None  # every queue is full: placement refuses it
        worth = (now - ask.arrived) * max(queued, 1)  # the wait a load beyond the candidates would end
        spill = dispatcher.policy.spill
        demand = dispatcher._demand.get(lora_name)
        floor = dispatcher.policy.replica_min_load
        if demand is not None and demand.replicas == 1 and demand.count <= floor and demand.smooth <= floor:
            # One engine, its home, however the load is shared (a share is never below replica_min_load): the
            # common case of a cold adapter, answered from the groups' lowest stalls instead of a scan
            home = dispatcher._home(lora_name, self.live)
            if home in self.open or (spill and self._cheapest(self.open) <= worth):
                return None
            if home in self.blocked or (spill and self._cheapest(self.blocked) <= worth):
                return Hold.LOADING
            if home in self.full or (spill and self._cheapest(self.full) <= worth):
                return Hold.SLOT
            return self._resident_hold(lora_name)
        replicas = dispatcher._replicas(lora_name, now, len(self.live))
        ranks = rendezvous_rank(self.live, lora_name)[:replicas]
        chosen = {self.live[i] for i in ranks}
        if not chosen.isdisjoint(self.open):
            return None

        def beyond(engines: dict[str, float]) -> bool:
            return spill and any(stall <= worth and e not in chosen for e, stall in engines.items())

        if beyond(self.open):
            return None
        if not chosen.isdisjoint(self.blocked) or beyond(self.blocked):
            return Hold.LOADING
        if not chosen.isdisjoint(self.full) or beyond(self.full):
            return Hold.SLOT
        return self._resident_hold(lora_name)

    def _resident_hold(self, lora_name: str) -> Hold:
        if any(e in self.full for e in self.dispatcher.ledger.holders(lora_name)):
            return Hold.SLOT  # resident where every slot is taken
        return Hold.RESIDENT

    def _cheapest(self, group: dict[str, float]) -> float:
        """The lowest stall in `group` (inf when empty), remembered until a placement changes the groups."""
        key = id(group)
        cheapest = self.cheapest.get(key)
        if cheapest is None:
            cheapest = self.cheapest[key] = min(group.values(), default=math.inf)
        return cheapest


class Dispatcher:
    def __init__(
        self,
        ledger: ResidencyLedger,
        policy: Policy,
        engines: Callable[[], Iterable[EngineState]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.policy = policy
        self.engines = engines
        self.clock = clock
        self.busy: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.closing: defaultdict[str, set[str]] = defaultdict(set)
        self.promised: dict[str, str] = {}  # engine -> the waiting adapter its next free GPU slot goes to
        self.loading: dict[str, str] = {}
        self.load_s: dict[str, float] = {}
        self.waiting: OrderedDict[str, deque[Ask]] = OrderedDict()
        self._demand: defaultdict[str | None, _Demand] = defaultdict(_Demand)
        self._total = _Demand()
        self.handovers = 0  # slot hand-overs started (a metric)
        self._freed = False  # a placement ended a promise: that engine's free slots are open to any adapter
        self._homes: dict[str, str] = {}  # adapter -> the first engine of its rendezvous order over _homes_for
        self._homes_for: tuple[str, ...] = ()

    # -- the requests ------------------------------------------------------------------------------------------------
    def offer(self, ask: Ask) -> Decision | None:
        """Place `ask` now (its reservation is made), or queue it (None): `on_ready` then gets its decision, maybe
        before this returns. With v2, a request for an adapter joins the queue when others wait (its turn comes)."""
        now = self.clock()
        ask.arrived = ask.arrived or now
        self._count(ask.lora_name, +1, now)
        if ask.lora_name is None or not self.waiting or self.policy.placement != "v2":
            decision = self._decide(ask, now)
            if not isinstance(decision, Hold):
                return self._settle(ask, decision, now)
            ask.held = decision
            self._enqueue(ask)
            return None
        self._enqueue(ask)
        self.pump()
        return None

    def _enqueue(self, ask: Ask) -> None:
        assert ask.lora_name is not None  # the base model never waits
        self.waiting.setdefault(ask.lora_name, deque()).append(ask)

    def cancel(self, ask: Ask) -> None:
        """A waiting request gave up (its deadline passed, or its client went away)."""
        lora_name = ask.lora_name
        queue = self.waiting.get(lora_name) if lora_name is not None else None
        if lora_name is not None and queue is not None and ask in queue:
            queue.remove(ask)
            if not queue:
                del self.waiting[lora_name]
                for engine, promised in list(self.promised.items()):
                    if promised == lora_name:
                        del self.promised[engine]
            self._count(lora_name, -1, self.clock())

    def release(self, engine: str, lora_name: str | None) -> None:
        """A placed call ended."""
        self._count(lora_name, -1, self.clock())
        if lora_name is not None:
            busy = self.busy[engine]
            busy[lora_name] -= 1
            if busy[lora_name] <= 0:
                del busy[lora_name]
                self.closing[engine].discard(lora_name)
        if self.waiting:
            self.pump()

    def load_done(self, engine: str, lora_name: str, seconds: float | None) -> None:
        """The load placement asked for on `engine` ended (seconds None: it failed, or there was no room after all)."""
        if self.loading.get(engine) == lora_name:
            del self.loading[engine]
        if seconds is not None:
            last = self.load_s.get(engine)
            self.load_s[engine] = seconds if last is None else 0.5 * last + 0.5 * seconds
        if self.waiting:
            self.pump()

    def moved(self, lora_name: str, source: str, target: str) -> None:
        """A call placed on `source` went to `target` instead (a worker's load, made by the primary elsewhere)."""
        if source == target:
            return
        busy = self.busy[source]
        busy[lora_name] -= 1
        if busy[lora_name] <= 0:
            del busy[lora_name]
        self.busy[target][lora_name] += 1

    # -- views -------------------------------------------------------------------------------------------------------
    def active(self, engine: str) -> set[str]:
        return {lora_name for lora_name, count in self.busy[engine].items() if count > 0}

    def slots_wanted(self) -> int:
        """GPU slots the working sets need: each adapter once per engine it has calls on, and once more for each
        waiting adapter that has calls nowhere (the autoscaling signal: divided by one engine's max_loras, the
        engines they need)."""
        running = {lora_name for busy in self.busy.values() for lora_name in busy}
        return sum(len(busy) for busy in self.busy.values()) + sum(
            1 for lora_name in self.waiting if lora_name not in running
        )

    def wanted(self) -> Collection[str]:
        """Adapters with requests waiting here: a load evicts them last."""
        return self.waiting.keys()

    def eviction_weight(self) -> Callable[[str], float] | None:
        """What a load ranks the adapters it may evict by (`ResidencyLedger.plan_admit`'s `demand`), per the policy."""
        return self.demand if self.policy.evict == "demand" else None

    def demand(self, lora_name: str) -> float:
        """An adapter's recent requests (in flight or waiting here, smoothed over DEMAND_TAU_S; at least those now):
        what a load weighs its evictions by."""
        demand = self._demand.get(lora_name)
        if demand is None:
            return 0.0
        demand.advance(self.clock())
        return max(demand.count, demand.smooth)

    def waiting_requests(self) -> int:
        return sum(len(queue) for queue in self.waiting.values())

    def replicas(self, lora_name: str) -> int:
        return self._demand[lora_name].replicas

    def views(self, exclude: frozenset[str] = frozenset()) -> list[EngineView]:
        return [
            EngineView(
                e.id,
                e.healthy and e.id not in exclude,
                e.inflight + e.waiting,
                e.running,
                e.max_loras + self.policy.working_set_slack,
                frozenset(self.busy[e.id]),
                frozenset(self.closing[e.id]),
                self.loading.get(e.id),
                self.load_s.get(e.id, 0.0),
                self.promised.get(e.id),
            )
            for e in self.engines()
        ]

    # -- the waiting requests ----------------------------------------------------------------------------------------
    def pump(self) -> None:
        """Place waiting requests, one per adapter per pass in turn, until a pass places none (that last pass also
        brings every head's `held` up to date, which slot hand-overs read)."""
        while self.waiting:
            now = self.clock()
            placed = False
            self._freed, openings = False, self._openings()
            views: list[EngineView] | None = None  # the engines as placement sees them, until a placement changes them
            for lora_name in list(self.waiting):
                queue = self.waiting.get(lora_name)
                if not queue:
                    continue
                ask = queue[0]
                if openings is not None and not ask.exclude:
                    hold = openings.hold(ask, len(queue), now)
                    if hold is not None:
                        ask.held = hold  # no engine could take it now: no need to ask placement
                        continue
                if views is None or ask.exclude:
                    views = self.views(ask.exclude)
                decision = self._decide(ask, now, views)
                if ask.exclude:
                    views = None
                if isinstance(decision, Hold):
                    ask.held = decision
                    continue
                queue.popleft()
                if not queue:
                    del self.waiting[lora_name]
                else:
                    self.waiting.move_to_end(lora_name)
                placed = True
                views = None
                ask.on_ready(self._settle(ask, decision, now))
                if self._freed:
                    self._freed, openings = False, self._openings()
                elif openings is not None and isinstance(decision, Placement):
                    openings.took(decision.engine, decision.load)
            if not placed:
                self._hand_over(now)
                return

    def _openings(self) -> _Openings | None:
        """What the engines offer the waiting adapters now, for a pass of `pump` (None: no prefilter; ask placement
        for every one)."""
        if self.policy.placement != "v2" or not self.policy.working_set_cap:
            return None
        live = [engine for engine in self.engines() if engine.healthy]
        return _Openings(self, live) if live else None

    def _hand_over(self, now: float) -> None:
        """Give a GPU slot to the adapter that has waited longest for one past `slot_wait_s`."""
        if self.policy.placement != "v2":
            return
        heads = [q[0] for q in self.waiting.values() if q and q[0].held is Hold.SLOT and q[0].lora_name is not None]
        overdue = [ask for ask in heads if now - ask.arrived >= self.policy.slot_wait_s]
        if not overdue:
            return
        ask = min(overdue, key=lambda a: a.arrived)
        assert ask.lora_name is not None
        views = self.views(ask.exclude)
        options: list[tuple[int, str, str]] = []
        for view in candidates(ask.lora_name, views, self.replicas(ask.lora_name), ask.lora_name in self.ledger.pinned):
            if self.closing[view.engine] or view.engine in self.promised or len(view.active) < view.gpu_slots:
                continue  # a slot is already on its way there
            busy = self.busy[view.engine]
            victims = [k for k in busy if k != ask.lora_name]
            if victims:
                victim = min(victims, key=lambda k: (busy[k], k))
                options.append((busy[victim], view.engine, victim))
        if options:
            _, engine, victim = min(options)
            self.closing[engine].add(victim)
            self.promised[engine] = ask.lora_name
            self.handovers += 1

    # -- internals ---------------------------------------------------------------------------------------------------
    def _decide(self, ask: Ask, now: float, views: list[EngineView] | None = None) -> Placement | Refusal | Hold:
        if ask.lora_name is None:  # the base model: only the engines' queues matter (v1 and v2 alike)
            exclude = ask.exclude
            loads = [EngineLoad(e.id, e.healthy and e.id not in exclude, e.inflight, e.waiting) for e in self.engines()]
            return choose_engine(None, loads, self.ledger, self.policy, spread_key=ask.request_id)
        if views is None:
            views = self.views(ask.exclude)
        if self.policy.placement != "v2":
            loads = [EngineLoad(v.engine, v.healthy, v.queue) for v in views]
            busy = self.busy
            decision = choose_engine(
                ask.lora_name, loads, self.ledger, self.policy, busy=busy, spread_key=ask.request_id
            )
            return Hold.RESIDENT if decision is Refusal.NO_SLOT else decision
        return place(
            ask.lora_name,
            views,
            self.ledger,
            self.policy,
            replicas=self._replicas(ask.lora_name, now),
            spread_key=ask.request_id,
            waited_s=now - ask.arrived,
            keep=self.waiting.keys(),
            queued=len(self.waiting.get(ask.lora_name, ())),
            demand=self.eviction_weight(),
        )

    def _settle(self, ask: Ask, decision: Decision, now: float) -> Decision:
        if isinstance(decision, Refusal):
            self._count(ask.lora_name, -1, now)
            return decision
        if ask.lora_name is not None:
            self.busy[decision.engine][ask.lora_name] += 1
            for engine in [e for e, promised in self.promised.items() if promised == ask.lora_name]:
                del self.promised[engine]  # placed (there or elsewhere): the promise is kept or void
                self._freed = True  # the engine's other free slots are anyone's again: a pass's openings grew
            if decision.load:
                self.loading[decision.engine] = ask.lora_name
        return decision

    def _count(self, lora_name: str | None, delta: int, now: float) -> None:
        demand = self._demand[lora_name]
        demand.advance(now)
        demand.count += delta
        self._total.advance(now)
        self._total.count += delta
        if lora_name is not None and demand.count <= 0 and demand.smooth < 0.05 and demand.replicas == 1:
            del self._demand[lora_name]  # forget idle adapters (thousands may pass through)

    def _home(self, lora_name: str, live: tuple[str, ...]) -> str:
        """The first engine of the adapter's rendezvous order over `live`, remembered while the engines stay."""
        if (live is not self._homes_for and live != self._homes_for) or len(self._homes) > 1 << 16:
            self._homes, self._homes_for = {}, live
        home = self._homes.get(lora_name)
        if home is None:
            home = self._homes[lora_name] = max(live, key=lambda engine: rendezvous_score(engine, lora_name))
        return home

    def _replicas(self, lora_name: str, now: float, live: int | None = None) -> int:
        demand = self._demand[lora_name]
        demand.advance(now)
        self._total.advance(now)
        if live is None:
            live = sum(1 for engine in self.engines() if engine.healthy)
        level = max(demand.count, demand.smooth)
        total = max(self._total.count, self._total.smooth)
        want = replicas_wanted(level, total, live, demand.replicas, self.policy)
        if want < demand.replicas:
            if now - demand.shrunk_at < self.policy.replica_hold_s:
                return demand.replicas
            demand.shrunk_at = now
        demand.replicas = want
        return want
