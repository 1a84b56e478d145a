"""Pure placement decisions: rendezvous hashing and engine choice over a residency ledger (gateway.ledger). No I/O.

Placement of an adapter, in order of preference:
1. an engine that already holds it and is not overloaded;
2. an engine with room for it (a free slot before one that must evict), least-loaded first;
3. an overloaded engine that holds it;
4. an overloaded engine with room.
Loads are compared in buckets of `load_bucket`; within a bucket the rendezvous (highest-random-weight) order of
the adapter decides, so several gateway replicas that see the same engines pick the same one without talking to
each other, and an engine joining or leaving only moves the adapters whose first choice it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from gateway.ledger import ResidencyLedger


@dataclass(frozen=True)
class Policy:
    overload_threshold: int = 8
    max_queue: int = 256
    load_bucket: int = 4


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


def rendezvous_score(engine: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{engine}\x00{key}".encode()).digest()[:8], "big")


def rendezvous_order(engines: Iterable[str], key: str) -> list[str]:
    return sorted(engines, key=lambda engine: rendezvous_score(engine, key), reverse=True)


def choose_engine(
    key: str | None,
    loads: Sequence[EngineLoad],
    ledger: ResidencyLedger,
    policy: Policy,
    *,
    busy: Mapping[str, Collection[str]] | None = None,
    spread_key: str = "",
) -> Placement | Refusal:
    """Where to send a request for adapter `key` (None: the base model).

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

    if key is None:
        return Placement(min(open_, key=lambda load: (load.queue, -rendezvous_score(load.engine, spread_key))).engine)

    def overloaded(load: EngineLoad) -> bool:
        return load.queue >= policy.overload_threshold

    holders = [load for load in open_ if ledger.has(load.engine, key)]
    calm_holders = [load for load in holders if not overloaded(load)]
    if calm_holders:
        return Placement(min(calm_holders, key=lambda load: rank(load, key)).engine)

    rooms: list[tuple[EngineLoad, tuple[str, ...]]] = []
    for load in open_:
        if load in holders:
            continue
        plan = ledger.plan_admit(load.engine, key, busy.get(load.engine, ()))
        if plan is not None:
            rooms.append((load, plan))

    def room_rank(item: tuple[EngineLoad, tuple[str, ...]]) -> tuple[int, int, int]:
        load, evict = item
        return (len(evict) > 0, *rank(load, key))

    calm_rooms = [item for item in rooms if not overloaded(item[0])]
    if calm_rooms:
        load, evict = min(calm_rooms, key=room_rank)
        return Placement(load.engine, load=True, evict=evict)
    if holders:
        return Placement(min(holders, key=lambda load: rank(load, key)).engine)
    if rooms:
        load, evict = min(rooms, key=room_rank)
        return Placement(load.engine, load=True, evict=evict)
    return Refusal.NO_SLOT
