"""Pure placement decisions: rendezvous hashing and engine choice over a residency ledger (gateway.ledger). No I/O.

Two placements. `place` (v2, the default) keeps each engine's working set inside its GPU slots and gives a hot
adapter more engines as its share of the load grows:
1. An adapter's candidates are the first `replicas` engines of its rendezvous order (its home first); `replicas`
   comes from `replicas_wanted`: one engine per fair share of the current load (the total in flight over the
   engines), at least `replica_min_load` requests, grown at once and shrunk one at a time well below, so a cold
   adapter stays on its home and several gateway replicas that see the same shares pick the same engines.
2. On a candidate, a request is *ready* when the adapter is resident (or being loaded there) and either already in
   the engine's working set (adapters with calls in flight) or the working set has a free GPU slot (`max_loras`):
   vLLM batches at most that many distinct adapters, and a request past them would only wait in vLLM's queue
   behind adapters that never leave. An adapter *closing* on an engine (its slot is being handed to a waiting one)
   takes no new calls there.
3. The least-loaded ready candidate wins, unless a candidate without the adapter is at least two load buckets
   less loaded: a load there is then worth it. An engine beyond the candidates that holds the adapter (an engine
   joined and became its home, or its replica set shrank) is ready like a candidate until it evicts it, so
   neither moves anything already loaded. A load stalls the whole engine (vLLM adds an adapter inside its engine
   loop), so it is priced as the engine's last load time x the requests running there, and budgeted: one load at
   a time per engine, at most `max_loading_fraction` of the engines loading at once.
4. When no candidate can take it (`spill`), a ready engine beyond them, the next ones in its rendezvous order
   first; a load there only once the wait it would end (waited x queued) costs more than its stall.
5. Otherwise the request waits in the gateway (`Hold`), where gateway.dispatch serves the waiting adapters in turn.

`choose_engine` (v1, `routing.placement: v1`) places an adapter, in order of preference:
1. an engine that already holds it and is not overloaded;
2. an engine with room for it (a free slot before one that must evict), least-loaded first;
3. an overloaded engine that holds it;
4. an overloaded engine with room.
Loads are compared in buckets of `load_bucket`; within a bucket the rendezvous (highest-random-weight) order of
the adapter decides, so several gateway replicas that see the same engines pick the same one without talking to
each other, and an engine joining or leaving only moves the adapters whose first choice it is.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from gateway.ledger import ResidencyLedger


@dataclass(frozen=True)
class Policy:
    overload_threshold: int = 8  # v1 only
    max_queue: int = 256
    load_bucket: int = 4
    placement: str = "v2"
    replica_min_load: float = 4.0  # v2: an adapter needs this many requests in flight before it gets a 2nd engine
    shrink_ratio: float = 0.5  # v2: a replica goes when demand fits in one fewer at this fraction of a share
    replica_hold_s: float = 10.0  # v2: at most one replica fewer per adapter this often
    slot_wait_s: float = 0.5  # v2: a request waiting this long for a GPU slot gets one handed over
    max_loading_fraction: float = 0.5  # v2: engines loading an adapter at once, as a fraction of the engines
    stall_bucket_s: float = 1.0  # v2: load prices (seconds x requests stalled) within this tie
    working_set_cap: bool = True  # v2: at most max_loras adapters with calls in flight per engine
    working_set_slack: int = 0  # v2: ... plus this many, whose requests wait in vLLM's queue, ready for a free slot
    spill: bool = True  # v2: when every candidate is full, an engine beyond them with room
    min_load_s: float = 0.1  # v2: the load time assumed of an engine that has not loaded anything yet
    evict: str = "lru"  # which resident adapter a load evicts: "lru", or "demand" (least wanted lately, then LRU)


@dataclass(frozen=True)
class EngineLoad:
    engine: str
    healthy: bool = True
    inflight: int = 0  # requests this gateway has in flight there
    waiting: int = 0  # vllm:num_requests_waiting at the last scrape

    @property
    def queue(self) -> int:
        return self.inflight + self.waiting


@dataclass(frozen=True)
class Placement:
    engine: str
    load: bool = False  # the adapter must be loaded there first
    evict: tuple[str, ...] = ()  # unload these (least recently used first) to make room


class Refusal(Enum):
    NO_ENGINE = "no healthy engine"
    BUSY = "every engine's queue is full"
    NO_SLOT = "no engine has a free or evictable adapter slot"


class Hold(Enum):
    """v2: why a request waits in the gateway for now."""

    SLOT = "every candidate engine's GPU slots hold other adapters"
    LOADING = "the candidate engines are loading other adapters (load budget)"
    RESIDENT = "no candidate engine has a free or evictable adapter slot"


@dataclass(frozen=True)
class EngineView:
    """v2: one engine as placement sees it."""

    engine: str
    healthy: bool = True
    queue: int = 0  # requests in flight from this gateway + vLLM's waiting ones
    running: int = 0  # vLLM's running requests (what a load stalls)
    gpu_slots: int = 1  # vLLM max_loras: distinct adapters in one batch
    active: frozenset[str] = frozenset()  # adapters with calls in flight (or placed) here
    closing: frozenset[str] = frozenset()  # adapters that take no new calls here (their slot goes to another)
    loading: str | None = None  # the adapter being loaded here now
    load_s: float = 0.0  # the engine's recent adapter load time
    promised: str | None = None  # the waiting adapter this engine's next free GPU slot is handed to


def _score(engine: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{engine}\x00{key}".encode()).digest()[:8], "big")


# asked for every engine at every decision for an adapter; a hash, so pure (request ids, which spread base-model
# requests, go through _score uncached: each is asked once)
rendezvous_score = functools.lru_cache(maxsize=1 << 16)(_score)


def rendezvous_order(engines: Iterable[str], lora_name: str) -> list[str]:
    return sorted(engines, key=lambda engine: rendezvous_score(engine, lora_name), reverse=True)


@functools.lru_cache(maxsize=1 << 13)
def rendezvous_rank(engines: tuple[str, ...], lora_name: str) -> tuple[int, ...]:
    """The positions of `engines` in the adapter's rendezvous order, best first (cached: placement asks it for every
    waiting adapter at every pass, and the engines change rarely)."""
    return tuple(sorted(range(len(engines)), key=lambda i: rendezvous_score(engines[i], lora_name), reverse=True))


def choose_engine(
    lora_name: str | None,
    loads: Sequence[EngineLoad],
    ledger: ResidencyLedger,
    policy: Policy,
    *,
    busy: Mapping[str, Collection[str]] | None = None,
    spread_key: str = "",
) -> Placement | Refusal:
    """Where to send a request for adapter `lora_name` (None: the base model).

    `spread_key` breaks ties among equally loaded engines for base-model requests (a request id spreads them).
    """
    busy = busy or {}
    live = [load for load in loads if load.healthy]
    if not live:
        return Refusal.NO_ENGINE
    open_ = [load for load in live if load.queue < policy.max_queue]
    if not open_:
        return Refusal.BUSY

    def rank(load: EngineLoad, hash_key: str) -> tuple[int, int]:
        return load.queue // policy.load_bucket, -rendezvous_score(load.engine, hash_key)

    if lora_name is None:
        return Placement(min(open_, key=lambda load: (load.queue, -_score(load.engine, spread_key))).engine)

    def overloaded(load: EngineLoad) -> bool:
        return load.queue >= policy.overload_threshold

    holders = [load for load in open_ if ledger.has(load.engine, lora_name)]
    calm_holders = [load for load in holders if not overloaded(load)]
    if calm_holders:
        return Placement(min(calm_holders, key=lambda load: rank(load, lora_name)).engine)

    rooms: list[tuple[EngineLoad, tuple[str, ...]]] = []
    for load in open_:
        if load in holders:
            continue
        plan = ledger.plan_admit(load.engine, lora_name, busy.get(load.engine, ()))
        if plan is not None:
            rooms.append((load, plan))

    def room_rank(item: tuple[EngineLoad, tuple[str, ...]]) -> tuple[int, int, int]:
        load, evict = item
        return (len(evict) > 0, *rank(load, lora_name))

    calm_rooms = [item for item in rooms if not overloaded(item[0])]
    if calm_rooms:
        load, evict = min(calm_rooms, key=room_rank)
        return Placement(load.engine, load=True, evict=evict)
    if holders:
        return Placement(min(holders, key=lambda load: rank(load, lora_name)).engine)
    if rooms:
        load, evict = min(rooms, key=room_rank)
        return Placement(load.engine, load=True, evict=evict)
    return Refusal.NO_SLOT


def replicas_wanted(demand: float, total: float, engines: int, current: int, policy: Policy) -> int:
    """v2: how many engines an adapter with `demand` requests in flight or waiting should be on (`current` now).

    A share is one engine's part of the whole load (`total` over `engines`), never below `replica_min_load`; the
    adapter gets one engine per share it fills, at once, and gives one back only when its demand fits in one fewer
    at `shrink_ratio` of a share (the caller spaces the shrinks out by `replica_hold_s`)."""
    if engines <= 0:
        return 1
    share = max(total / engines, policy.replica_min_load)
    want = min(max(math.ceil(demand / share - 1e-9), 1), engines)
    current = min(max(current, 1), engines)
    if want >= current:
        return want
    if demand < (current - 1) * share * policy.shrink_ratio:
        return current - 1
    return current


def candidates(lora_name: str, engines: Sequence[EngineView], replicas: int, pinned: bool) -> list[EngineView]:
    """v2: the engines an adapter may be served on: the first `replicas` of its rendezvous order over the healthy
    engines (all of them for a pinned adapter, which every engine holds)."""
    live = [view for view in engines if view.healthy]
    ordered = [live[i] for i in rendezvous_rank(tuple(view.engine for view in live), lora_name)]
    return ordered if pinned else ordered[: max(replicas, 1)]


def place(
    lora_name: str | None,
    engines: Sequence[EngineView],
    ledger: ResidencyLedger,
    policy: Policy,
    *,
    replicas: int = 1,
    spread_key: str = "",
    waited_s: float = 0.0,
    queued: int = 1,
    keep: Collection[str] = (),
    demand: Callable[[str], float] | None = None,
) -> Placement | Hold | Refusal:
    """v2: where a request for adapter `lora_name` (None: the base model) goes now, or why it waits (`waited_s`: how
    long the oldest request for it has waited, `queued`: how many wait; `keep`: adapters a load evicts last, those
    with requests waiting for them; `demand`: each adapter's recent requests, the least wanted evicted first)."""
    live = [view for view in engines if view.healthy]
    if not live:
        return Refusal.NO_ENGINE
    open_ = [view for view in live if view.queue < policy.max_queue]
    if not open_:
        return Refusal.BUSY
    if lora_name is None:
        return Placement(min(open_, key=lambda v: (v.queue, -_score(v.engine, spread_key))).engine)

    def bucket(view: EngineView) -> tuple[int, int]:
        return view.queue // policy.load_bucket, -rendezvous_score(view.engine, lora_name)

    def slot_free(view: EngineView) -> bool:
        if not policy.working_set_cap:
            return lora_name not in view.closing
        if lora_name in view.active:
            return lora_name not in view.closing
        return len(view.active) < view.gpu_slots and view.promised in (None, lora_name)

    budget = max(1, math.floor(len(live) * policy.max_loading_fraction))
    loading_now = sum(1 for view in live if view.loading is not None)
    holds: set[Hold] = set()

    def choose(chosen: list[EngineView], spilling: bool) -> Placement | None:
        ready = [v for v in chosen if (ledger.has(v.engine, lora_name) or v.loading == lora_name) and slot_free(v)]
        loadable: list[tuple[EngineView, tuple[str, ...]]] = []
        for view in chosen:
            if view in ready or ledger.has(view.engine, lora_name) or view.loading == lora_name:
                continue
            if spilling and waited_s * max(queued, 1) < max(view.load_s, policy.min_load_s) * (view.running + 1):
                continue  # a load beyond the candidates only once the wait it ends costs more than the stall
            if not slot_free(view):
                holds.add(Hold.SLOT)
                continue
            if view.loading is not None or loading_now >= budget:
                holds.add(Hold.LOADING)
                continue
            evict = ledger.plan_admit(view.engine, lora_name, view.active, keep, demand)
            if evict is not None:
                loadable.append((view, evict))
            else:
                holds.add(Hold.RESIDENT)
        if any(not slot_free(v) for v in chosen if ledger.has(v.engine, lora_name) or v.loading == lora_name):
            holds.add(Hold.SLOT)

        def load_rank(item: tuple[EngineView, tuple[str, ...]]) -> tuple[int, int, int, int]:
            view, evict = item
            stall = view.load_s * (view.running + 1)
            return len(evict) > 0, int(stall // policy.stall_bucket_s), *bucket(view)

        best_ready = min(ready, key=bucket) if ready else None
        best_load = min(loadable, key=load_rank) if loadable else None
        if best_ready is not None and (spilling or best_load is None):
            return Placement(best_ready.engine)
        if best_load is not None and (best_ready is None or bucket(best_load[0])[0] + 1 < bucket(best_ready)[0]):
            return Placement(best_load[0].engine, load=True, evict=best_load[1])
        return Placement(best_ready.engine) if best_ready is not None else None

    pinned = ledger.is_pinned(lora_name)
    ordered = candidates(lora_name, live, len(live), pinned)
    first = max(replicas, 1) if not pinned else len(ordered)
    chosen = [view for view in ordered[:first] if view.queue < policy.max_queue]
    # An engine beyond the candidates that holds the adapter already serves it without a load (what an engine
    # that joined, or a shrunk replica set, left there): it stays in the choice until it is evicted
    held = [
        v
        for v in ordered[first:]
        if v.queue < policy.max_queue and (ledger.has(v.engine, lora_name) or v.loading == lora_name)
    ]
    placed = choose(chosen + held, spilling=False)
    if placed is None and policy.spill:
        # Every candidate is full: another engine with room, the adapter's next ones in rendezvous order first
        placed = choose([view for view in ordered[first:] if view.queue < policy.max_queue], spilling=True)
    if placed is not None:
        return placed
    for hold in (Hold.LOADING, Hold.SLOT):
        if hold in holds:
            return hold
    return Hold.RESIDENT
