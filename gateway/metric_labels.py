"""Label values of the gateway's metrics and how they stay bounded: plain decisions, no I/O, no Prometheus objects.

- `adapter` is a registry adapter name, `""` for the base model, or `"other"`: past `max_adapter_labels` distinct
  adapters the least-used are folded into `"other"` (with `version=""`), and model names that resolved to nothing
  are counted there too (`fold_decision`; `AdapterLabels` keeps the usage it decides on). No request ids, key ids
  or user text ever become label values.
- `error_code`, load-failure `reason` and restart `reason` are slugged and capped at `MAX_REASON_LABELS` values
  (`BoundedSlugs`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

BASE_LABEL = ""
OTHER_LABEL = "other"
MAX_REASON_LABELS = 32


@dataclass(frozen=True)
class FoldDecision:
    label: str
    promote: bool = False
    demote: str | None = None


def fold_decision(adapter: str, usage: Mapping[str, float], labelled: frozenset[str], limit: int) -> FoldDecision:
    """Which label `adapter` gets. A newcomer takes a free label slot; when none is free it replaces the least-used
    labelled adapter only once it has more than twice that one's usage (hysteresis against flapping)."""
    if adapter in labelled:
        return FoldDecision(adapter)
    if len(labelled) < limit:
        return FoldDecision(adapter, promote=True)
    if not labelled:
        return FoldDecision(OTHER_LABEL)
    least = min(labelled, key=lambda name: (usage.get(name, 0.0), name))
    if usage.get(adapter, 0.0) > 2 * usage.get(least, 0.0):
        return FoldDecision(adapter, promote=True, demote=least)
    return FoldDecision(OTHER_LABEL)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "unknown"


def validity_label(output_valid: bool | None) -> str:
    if output_valid is None:
        return "none"
    return "valid" if output_valid else "invalid"


def time_per_output_token(latency_s: float, ttft_s: float | None, completion_tokens: int | None) -> float | None:
    """Decode time per token after the first one; needs a measured TTFT and at least two output tokens."""
    if ttft_s is None or completion_tokens is None or completion_tokens < 2:
        return None
    return max(latency_s - ttft_s, 0.0) / (completion_tokens - 1)


_SLUG = re.compile(r"[^a-z0-9_]+")


def slug(value: str) -> str:
    return _SLUG.sub("_", value.strip().lower()).strip("_")[:48] or "unknown"


class AdapterLabels:
    """Folding state: decayed request counts per adapter and the set of adapters that have their own label."""

    def __init__(self, limit: int, decay_every: int) -> None:
        self.limit = limit
        self.decay_every = decay_every
        self.usage: dict[str, float] = {}
        self.labelled: set[str] = set()
        self._requests = 0

    def count(self, adapter: str) -> None:
        self.usage[adapter] = self.usage.get(adapter, 0.0) + 1.0
        self._requests += 1
        if self._requests % self.decay_every == 0:
            self.usage = {name: score / 2 for name, score in self.usage.items() if score >= 0.5}

    def decide(self, adapter: str) -> FoldDecision:
        decision = fold_decision(adapter, self.usage, frozenset(self.labelled), self.limit)
        if decision.promote:
            self.labelled.add(adapter)
        if decision.demote is not None:
            self.labelled.discard(decision.demote)
        return decision

    def current(self, adapter: str) -> str:
        return adapter if adapter in self.labelled else OTHER_LABEL


class BoundedSlugs:
    """Caps a free-form label (error code, reason) at `limit` distinct values; later ones become "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        label = slug(value)
        if label in self.seen:
            return label
        if len(self.seen) < self.limit:
            self.seen.add(label)
            return label
        return OTHER_LABEL
