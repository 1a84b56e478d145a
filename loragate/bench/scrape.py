"""The gateway's adapter counters, read from a target's `/metrics` before, during and after a run.

A target that is a list of URLs is scraped at each and the counters added (two gateway replicas count as one
gateway); a target whose `/metrics` has no `loragate_` series (a bare vLLM engine, a hosted API) has no gateway
numbers. Only the series named in `COUNTERS` are kept, summed over their labels, plus loads per engine.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

COUNTERS = {
    "loads": "loragate_adapter_loads_total",
    "evictions": "loragate_adapter_evictions_total",
    "load_failures": "loragate_adapter_load_failures_total",
    "load_seconds_sum": "loragate_adapter_load_seconds_sum",
    "load_seconds_count": "loragate_adapter_load_seconds_count",
}
_SAMPLE = re.compile(r"^(loragate_[a-z_]+)(\{[^}]*\})?\s+(\S+)")
_ENGINE = re.compile(r'engine="([^"]*)"')


@dataclass(frozen=True)
class Counters:
    values: Mapping[str, float] = field(default_factory=dict)  # COUNTERS key -> sum over labels
    loads_by_engine: Mapping[str, float] = field(default_factory=dict)

    def minus(self, earlier: Counters) -> Counters:
        return Counters(
            {key: self.values.get(key, 0.0) - earlier.values.get(key, 0.0) for key in COUNTERS},
            {
                engine: count - earlier.loads_by_engine.get(engine, 0.0)
                for engine, count in self.loads_by_engine.items()
                if count != earlier.loads_by_engine.get(engine, 0.0)
            },
        )


def parse_counters(text: str) -> Counters | None:
    """The adapter counters of one exposition; None when it has no `loragate_` series at all."""
    names = {name: key for key, name in COUNTERS.items()}
    values = dict.fromkeys(COUNTERS, 0.0)
    by_engine: dict[str, float] = {}
    seen = False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        seen = True
        key = names.get(match.group(1))
        if key is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        values[key] += value
        if key == "loads" and (engine := _ENGINE.search(match.group(2) or "")):
            by_engine[engine.group(1)] = by_engine.get(engine.group(1), 0.0) + value
    return Counters(values, by_engine) if seen else None


def add(parts: Sequence[Counters | None]) -> Counters | None:
    present = [part for part in parts if part is not None]
    if not present:
        return None
    by_engine: dict[str, float] = {}
    for part in present:
        for engine, count in part.loads_by_engine.items():
            by_engine[engine] = by_engine.get(engine, 0.0) + count
    return Counters({key: sum(part.values.get(key, 0.0) for part in present) for key in COUNTERS}, by_engine)


async def scrape(session: aiohttp.ClientSession, roots: Sequence[str], headers: Mapping[str, str]) -> Counters | None:
    """The counters summed over `roots`; a URL that cannot be scraped counts as one without gateway metrics."""

    async def one(root: str) -> Counters | None:
        try:
            async with session.get(
                f"{root}/metrics", headers=dict(headers), timeout=aiohttp.ClientTimeout(total=10)
            ) as response:
                if response.status != 200:
                    return None
                return parse_counters(await response.text())
        except (aiohttp.ClientError, TimeoutError):
            return None

    return add(await asyncio.gather(*(one(root) for root in roots)))
