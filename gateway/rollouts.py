"""Automatic rollback: each gateway judges an alias's rollout candidate against the rollout's policy from the calls
it served itself, and on a breach sets the candidate's weight back to 0 in the registry.

The figures are kept in memory per alias and version over the policy's window (`Window`), so replicas need no
shared state beyond the alias record: each judges its own share of the traffic. The stop is the registry's
compare-and-swap (`Registry.stop_rollout`), audited with the reason and the figures; of replicas that find the
same breach one writes it and the others read it done (audited as `already_done`). `judge` is the pure decision.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from adapters_registry import Registry
from adapters_registry.errors import RegistryError
from adapters_registry.manifest import RolloutPolicy

if TYPE_CHECKING:
    from adapters_registry.aliases import Resolution
    from gateway.adapters import AdapterManager
    from gateway.call import Call

log = logging.getLogger(__name__)

MAX_OUTCOMES = 10_000  # per alias and version: the window's oldest go first beyond it
# Judging reads both versions' windows (a sort of up to MAX_OUTCOMES each): once a candidate has enough calls to be
# judged, an alias is judged again at most this often, so a busy rollout costs no window scan per call.
JUDGE_EVERY_S = 1.0


@dataclass(frozen=True)
class Outcome:
    at: float
    error: bool  # a 5xx answer
    ttft_s: float | None  # streamed calls only
    valid: bool | None  # kept to the contract (None: nothing to check)


@dataclass(frozen=True)
class Figures:
    """What one version served over the window."""

    requests: int
    error_ratio: float
    judged: int  # answers checked against a contract
    contract_validity: float | None
    p99_ttft_s: float | None


@dataclass(frozen=True)
class Breach:
    rule: str  # a bounded metric label: error_ratio | ttft_ratio | contract_validity
    reason: str  # one line, for the audit record and the alias history


def figures(outcomes: list[Outcome]) -> Figures:
    errors = sum(o.error for o in outcomes)
    judged = [o.valid for o in outcomes if o.valid is not None]
    ttfts = sorted(o.ttft_s for o in outcomes if o.ttft_s is not None)
    return Figures(
        requests=len(outcomes),
        error_ratio=errors / len(outcomes) if outcomes else 0.0,
        judged=len(judged),
        contract_validity=sum(judged) / len(judged) if judged else None,
        p99_ttft_s=ttfts[min(len(ttfts) - 1, math.ceil(0.99 * len(ttfts)) - 1)] if ttfts else None,
    )


def judge(policy: RolloutPolicy, candidate: Figures, current: Figures) -> Breach | None:
    """The first rule of `policy` the candidate breaks (None: none, or too few of its requests to judge yet)."""
    if candidate.requests < policy.min_requests:
        return None
    window = f"over {candidate.requests} requests in {policy.window_s:g}s"
    if policy.max_error_ratio is not None and candidate.error_ratio > policy.max_error_ratio:
        return Breach("error_ratio", f"error ratio {candidate.error_ratio:.1%} > {policy.max_error_ratio:.1%} {window}")
    validity = candidate.contract_validity
    if policy.min_contract_validity is not None and validity is not None and validity < policy.min_contract_validity:
        return Breach(
            "contract_validity",
            f"contract validity {validity:.1%} < {policy.min_contract_validity:.1%} "
            f"({candidate.judged} answers checked) {window}",
        )
    mine, theirs = candidate.p99_ttft_s, current.p99_ttft_s
    ttft_ratio = mine / theirs if mine is not None and theirs else None
    if policy.max_ttft_ratio is not None and ttft_ratio is not None and ttft_ratio > policy.max_ttft_ratio:
        return Breach(
            "ttft_ratio",
            f"p99 TTFT {mine:.3f}s is {ttft_ratio:.2f}x the current version's {theirs:.3f}s "
            f"(> {policy.max_ttft_ratio:g}x) {window}",
        )
    return None


class Window:
    """One version's outcomes under one alias over the last `window_s` seconds."""

    def __init__(self) -> None:
        self.outcomes: deque[Outcome] = deque(maxlen=MAX_OUTCOMES)

    def add(self, outcome: Outcome, window_s: float) -> None:
        self.outcomes.append(outcome)
        while self.outcomes and self.outcomes[0].at < outcome.at - window_s:
            self.outcomes.popleft()

    def figures(self, now: float, window_s: float) -> Figures:
        return figures([o for o in self.outcomes if o.at >= now - window_s])


def gateway_actor() -> str:
    """Who a gateway's own registry writes are audited as: `gateway:<host>` (the replica, on Kubernetes the pod)."""
    return f"gateway:{socket.gethostname()}"


async def retired(adapters: AdapterManager, name: str, version: int, *, unload: bool = True) -> None:
    """A version lost its weight: this gateway resolves the alias afresh and (`unload`) unloads the version where
    no alias serves it any more (`AdapterManager.retire`)."""
    adapters.resolver.forget(name)
    if unload:
        await adapters.retire(name, version)


class RolloutWatch:
    """An observer of finished calls (gateway.call.Observer): it judges every candidate call of an alias whose
    rollout has a policy (once it has `min_requests`, at most every JUDGE_EVERY_S per alias), and stops the rollout
    on a breach (in the background, once at a time per alias)."""

    def __init__(
        self,
        registry: Callable[[], Registry],
        who: str,
        *,
        on_stopped: Callable[[str, int], Awaitable[object]] | None = None,
        on_rollback: Callable[[str, str, str], object] = lambda alias, version, rule: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry  # the gateway's current one (an admin reload replaces it)
        self.who = who
        self.on_stopped = on_stopped  # (name, version): the candidate lost its weight here (forget it, unload it)
        self.on_rollback = on_rollback  # (alias ref, version, rule): this gateway's write stopped it (the metric)
        self.clock = clock
        self.windows: dict[tuple[str, int], Window] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._judged: dict[str, float] = {}  # alias ref -> when it was last judged

    def __call__(self, call: Call) -> None:
        rollout: Resolution | None = call.rollout
        if rollout is None or rollout.candidate is None or rollout.policy is None or call.manifest is None:
            return
        if call.status == 499:  # the caller hung up: says nothing about the version
            return
        policy, now = rollout.policy, self.clock()
        version = call.manifest.version
        outcome = Outcome(now, call.status >= 500, call.ttft_s, call.output_valid)
        self.windows.setdefault((rollout.ref, version), Window()).add(outcome, policy.window_s)
        if version != rollout.candidate.version or rollout.ref in self._stopping:
            return
        if len(self.windows[(rollout.ref, version)].outcomes) < policy.min_requests:  # too few, however counted
            return
        if now - self._judged.get(rollout.ref, -math.inf) < JUDGE_EVERY_S:
            return
        self._judged[rollout.ref] = now
        candidate = self.windows[(rollout.ref, version)].figures(now, policy.window_s)
        current = self.windows.get((rollout.ref, rollout.current.version), Window()).figures(now, policy.window_s)
        breach = judge(policy, candidate, current)
        if breach is not None:
            task = asyncio.get_running_loop().create_task(self._stop(rollout, breach, candidate, current))
            self._stopping[rollout.ref] = task
            task.add_done_callback(lambda _: self._stopping.pop(rollout.ref, None))

    async def _stop(self, rollout: Resolution, breach: Breach, candidate: Figures, current: Figures) -> None:
        assert rollout.candidate is not None
        name, version = rollout.candidate.name, rollout.candidate.version
        alias = rollout.ref.partition(":")[2]
        shown = {"candidate": asdict(candidate), "current": asdict(current)}
        try:
            state = await asyncio.to_thread(
                self.registry().stop_rollout, name, alias, version, self.who, breach.reason, shown
            )
        except RegistryError as exc:  # the store is down, say: the next candidate call tries again
            log.error(
                "rollout of %s on %s not stopped (%s): %s", rollout.candidate.ref, rollout.ref, breach.reason, exc
            )
            return
        result = "stopped" if state is not None else "already_done"
        event: dict[str, Any] = {
            "event": "rollout_rollback",
            "alias": rollout.ref,
            "version": version,
            "rule": breach.rule,
            "reason": breach.reason,
            "result": result,
            "figures": shown,
            "by": self.who,
        }
        log.warning("%s", json.dumps(event, separators=(",", ":")))
        if state is not None:
            self.on_rollback(rollout.ref, str(version), breach.rule)
        for key in [key for key in self.windows if key[0] == rollout.ref]:
            del self.windows[key]  # a rollout restored later is judged afresh
        if self.on_stopped is not None:
            await self.on_stopped(name, version)

    async def aclose(self) -> None:
        for task in list(self._stopping.values()):
            task.cancel()
        await asyncio.gather(*self._stopping.values(), return_exceptions=True)
