"""The residency ledger: which adapter version is loaded in which engine, as the gateway last saw it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any


class ResidencyLedger:
    """Which adapter version (by its lora_name, `name@digest12`) is resident in which engine, in least-recently-used
    order.

    `on_change` is called after every change but recency (a placement decision elsewhere may depend on it: the
    gateway's workers get a copy through it)."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._slots: dict[str, int] = {}
        self._lru: dict[str, OrderedDict[str, None]] = {}
        self._pinned: set[str] = set()
        self._on_change = on_change or (lambda: None)

    def watch(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change

    def snapshot(self) -> dict[str, Any]:
        """Slots, residents (least recently used first) and pins, as plain data (what `replace` takes)."""
        return {
            "slots": dict(self._slots),
            "resident": {engine: list(lru) for engine, lru in self._lru.items()},
            "pinned": sorted(self._pinned),
        }

    def replace(self, snapshot: dict[str, Any]) -> None:
        self._slots = {engine: int(n) for engine, n in snapshot["slots"].items()}
        self._lru = {engine: OrderedDict.fromkeys(keys) for engine, keys in snapshot["resident"].items()}
        self._pinned = set(snapshot["pinned"])

    def add_engine(self, engine: str, slots: int) -> None:
        self._slots[engine] = slots
        self._lru.setdefault(engine, OrderedDict())
        self._on_change()

    def remove_engine(self, engine: str) -> None:
        self._slots.pop(engine, None)
        self._lru.pop(engine, None)
        self._on_change()

    def engines(self) -> list[str]:
        return list(self._slots)

    def slots(self, engine: str) -> int:
        return self._slots[engine]

    def resident(self, engine: str) -> list[str]:
        return list(self._lru.get(engine, ()))

    def has(self, engine: str, lora_name: str) -> bool:
        return lora_name in self._lru.get(engine, ())

    def holders(self, lora_name: str) -> list[str]:
        return [engine for engine, lru in self._lru.items() if lora_name in lru]

    def touch(self, engine: str, lora_name: str) -> None:
        if self.has(engine, lora_name):
            self._lru[engine].move_to_end(lora_name)

    def record_loaded(self, engine: str, lora_name: str) -> None:
        lru = self._lru[engine]
        lru[lora_name] = None
        lru.move_to_end(lora_name)
        self._on_change()

    def record_unloaded(self, engine: str, lora_name: str) -> None:
        self._lru.get(engine, OrderedDict()).pop(lora_name, None)
        self._on_change()

    def pin(self, lora_name: str) -> None:
        self._pinned.add(lora_name)
        self._on_change()

    def unpin(self, lora_name: str) -> None:
        self._pinned.discard(lora_name)
        self._on_change()

    def is_pinned(self, lora_name: str) -> bool:
        return lora_name in self._pinned

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    def plan_admit(
        self,
        engine: str,
        lora_name: str,
        busy: Collection[str] = (),
        keep: Collection[str] = (),
        demand: Callable[[str], float] | None = None,
    ) -> tuple[str, ...] | None:
        """Evictions that make room for `lora_name` on `engine` (() when it fits or is there); None when impossible.

        Pinned adapters and `busy` ones (requests in flight) are never evicted; `keep` ones (requests waiting for
        them) only when nothing else can go. Within each, the least in `demand` first (an adapter's recent requests:
        a hot adapter idle for a moment stays), then the least recently used.
        """
        lru = self._lru[engine]
        if lora_name in lru:
            return ()
        overflow = len(lru) + 1 - self._slots[engine]
        if overflow <= 0:
            return ()
        free = [k for k in lru if k not in self._pinned and k not in busy]  # least recently used first
        if demand is not None:
            free.sort(key=demand)  # stable: recency breaks ties
        victims = ([k for k in free if k not in keep] + [k for k in free if k in keep])[:overflow]
        return tuple(victims) if len(victims) == overflow else None
