"""Quotas: requests per minute, tokens per minute and concurrent requests, per API key and per adapter.

Each (scope, limit) pair is a token bucket that refills continuously at ``limit / 60`` per second with capacity
``limit`` (requests) or a balance that may go negative (tokens: the cost is known only when a response ends, so a
request is admitted while the balance is positive and pays afterwards). A request is admitted only if every
applicable bucket and concurrency slot admits it; otherwise nothing is charged and the caller gets the largest
``retry_after_s``.

Several replicas: the gateway does not share counters between replicas. Each replica enforces
``ceil(limit / replicas)`` of every limit (``QuotaSettings.replicas``, the replica count the deployment declares).
With requests spread evenly over replicas (the Service's default) a client gets its full limit; the total admitted
over all replicas never exceeds ``limit + replicas - 1`` per minute (the rounding); with a skewed spread a client
is refused early, at ``ceil(limit / replicas)`` on the busiest replica. No external store is needed for one replica.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from pydantic import BaseModel, Field


class Limits(BaseModel):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)


class QuotaSettings(BaseModel):
    replicas: int = Field(default=1, ge=1)
    # Adapter name glob -> limits shared by every caller of the matching adapters (first match wins).
    adapters: dict[str, Limits] = Field(default_factory=dict)


def share(limit: int, replicas: int) -> int:
    """This replica's part of a limit enforced across ``replicas`` replicas."""
    return max(1, math.ceil(limit / replicas))


@dataclass(frozen=True)
class Bucket:
    capacity: float
    rate_per_s: float
    balance: float
    stamp: float

    @classmethod
    def full(cls, per_minute: int, now: float) -> Bucket:
        return cls(float(per_minute), per_minute / 60.0, float(per_minute), now)

    def refilled(self, now: float) -> Bucket:
        elapsed = max(0.0, now - self.stamp)
        return Bucket(self.capacity, self.rate_per_s, min(self.capacity, self.balance + elapsed * self.rate_per_s), now)

    def wait_for(self, amount: float) -> float:
        """Seconds until the balance reaches ``amount`` (0 when it already has)."""
        return max(0.0, (amount - self.balance) / self.rate_per_s)


@dataclass(frozen=True)
class QuotaRefusal:
    scope: str  # "key" | "adapter"
    limit: str  # "rpm" | "tpm" | "concurrency"
    value: int
    retry_after_s: float

    @property
    def message(self) -> str:
        owner = "this API key" if self.scope == "key" else "this model"
        return f"Rate limit exceeded: {self.limit}={self.value} for {owner}; retry after {self.retry_after_header}s."

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True)
class Scope:
    kind: str  # "key" | "adapter"
    name: str
    limits: Limits


def decide(
    scopes: list[Scope],
    buckets: Mapping[tuple[str, str, str], Bucket],
    inflight: Mapping[tuple[str, str], int],
    now: float,
    replicas: int,
) -> QuotaRefusal | None:
    """Whether one more request fits every scope; pure, buckets as they are now (refilled here)."""
    refusals: list[QuotaRefusal] = []
    for scope in scopes:
        lim = scope.limits
        if lim.max_concurrency is not None:
            cap = share(lim.max_concurrency, replicas)
            if inflight.get((scope.kind, scope.name), 0) >= cap:
                refusals.append(QuotaRefusal(scope.kind, "concurrency", lim.max_concurrency, 1.0))
        # A request needs one whole request token; tokens per minute only need a balance above zero.
        for label, per_minute, need in (("rpm", lim.rpm, 1.0), ("tpm", lim.tpm, 0.0)):
            if per_minute is None:
                continue
            cap = share(per_minute, replicas)
            bucket = buckets.get((scope.kind, scope.name, label)) or Bucket.full(cap, now)
            bucket = bucket.refilled(now)
            if bucket.balance < need or bucket.balance <= 0:
                refusals.append(QuotaRefusal(scope.kind, label, per_minute, bucket.wait_for(need)))
    return max(refusals, key=lambda r: r.retry_after_s) if refusals else None


def adapter_limits(adapter: str | None, table: Mapping[str, Limits]) -> Limits | None:
    if adapter is None:
        return None
    for pattern, limits in table.items():
        if fnmatchcase(adapter, pattern):
            return limits
    return None


@dataclass
class QuotaLease:
    """One admitted request: pay its tokens with `charge`, free its concurrency slot with `release`."""

    manager: QuotaManager
    scopes: list[Scope]
    released: bool = field(default=False)
    estimate: int = 0  # tokens to charge when the engine never reported a count (prompt characters / 4)

    def charge(self, tokens: int) -> None:
        self.manager.charge_tokens(self.scopes, tokens)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.manager.release(self.scopes)


class QuotaExceeded(Exception):
    def __init__(self, refusal: QuotaRefusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class QuotaManager:
    """This replica's quota state; thread-safe, time from an injected monotonic clock."""

    def __init__(self, settings: QuotaSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str, str], Bucket] = {}
        self._inflight: dict[tuple[str, str], int] = {}

    def scopes_for(self, key_id: str | None, key_limits: Limits | None, adapter: str | None) -> list[Scope]:
        scopes = []
        if key_id is not None and key_limits is not None:
            scopes.append(Scope("key", key_id, key_limits))
        per_adapter = adapter_limits(adapter, self._settings.adapters)
        if adapter is not None and per_adapter is not None:
            scopes.append(Scope("adapter", adapter, per_adapter))
        return scopes

    def admit(self, scopes: list[Scope]) -> QuotaLease:
        """Admit one request or raise `QuotaExceeded`; charges one request and takes a concurrency slot."""
        with self._lock:
            now = self._clock()
            refusal = decide(scopes, self._buckets, self._inflight, now, self._settings.replicas)
            if refusal is not None:
                raise QuotaExceeded(refusal)
            for scope in scopes:
                if scope.limits.rpm is not None:
                    self._debit(scope, "rpm", scope.limits.rpm, 1.0, now)
                if scope.limits.max_concurrency is not None:
                    slot = (scope.kind, scope.name)
                    self._inflight[slot] = self._inflight.get(slot, 0) + 1
        return QuotaLease(self, scopes)

    def charge_tokens(self, scopes: list[Scope], tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            now = self._clock()
            for scope in scopes:
                if scope.limits.tpm is not None:
                    self._debit(scope, "tpm", scope.limits.tpm, float(tokens), now)

    def release(self, scopes: list[Scope]) -> None:
        with self._lock:
            for scope in scopes:
                slot = (scope.kind, scope.name)
                if scope.limits.max_concurrency is not None and self._inflight.get(slot, 0) > 0:
                    self._inflight[slot] -= 1

    def inflight(self, kind: str, name: str) -> int:
        with self._lock:
            return self._inflight.get((kind, name), 0)

    def _debit(self, scope: Scope, label: str, per_minute: int, amount: float, now: float) -> None:
        key = (scope.kind, scope.name, label)
        cap = share(per_minute, self._settings.replicas)
        bucket = (self._buckets.get(key) or Bucket.full(cap, now)).refilled(now)
        self._buckets[key] = Bucket(bucket.capacity, bucket.rate_per_s, bucket.balance - amount, now)
