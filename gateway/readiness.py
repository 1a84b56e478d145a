"""Readiness's view of the registry: checked in the background at most every `interval_s`, and counted as reachable
for `grace_s` after the last check that succeeded.

A probe never waits for the registry once a first answer is known: it starts a check when the last one is older
than `interval_s` (and none is in flight) and answers from what is known. So `/readyz` costs the registry one
cheap request (`ObjectStore.probe`, a LIST of at most one key) per interval whatever the probe rate, and a hung
registry never makes a probe hang. Only a registry that has been unreachable for longer than `grace_s`, or that
never answered since the gateway started, makes the gateway unready.

Why GRACE_S = 300 s: without the registry the engines keep serving the base and every adapter already loaded, the
registry answers each known reference from its last-known resolution for the same 300 s (`STALE_RESOLVE_S`), and
adapters already in the local cache can be loaded again; only adapters never fetched fail. Kubernetes takes a pod
out of its Service after `failureThreshold x periodSeconds` of failed probes (the chart: 3 x 5 s = 15 s), so a
registry blip failing readiness would take every replica out at once, turning a partial outage (cold adapters)
into a total one. Five minutes outlasts the usual blips (an S3 endpoint's 503 bursts, a MinIO or NFS restart, a
network flap); past that, the outage is real and readiness says so, and by then last-known resolutions expire too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from starlette.datastructures import State

from adapters_registry import Registry
from adapters_registry.registry import STALE_RESOLVE_S

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 10.0  # at most one registry request per this many seconds, however often probes come
CHECK_TIMEOUT_S = 5.0  # a check that has not answered by then counts as failed (it may still finish later)
GRACE_S = STALE_RESOLVE_S  # see the module docstring


class RegistryReadiness:
    def __init__(
        self,
        *,
        interval_s: float = CHECK_INTERVAL_S,
        timeout_s: float = CHECK_TIMEOUT_S,
        grace_s: float = GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.clock = clock
        self.checks = 0  # registry requests made, for tests and /readyz's body
        self._location: str | None = None
        self._started: float | None = None
        self._last_ok: float | None = None
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._answered = asyncio.Event()

    def _reset(self, location: str) -> None:
        self._location, self._started, self._last_ok, self._last_error = location, None, None, None
        self._answered = asyncio.Event()

    async def problem(self, registry: Registry) -> str | None:
        """None while the registry counts as reachable; otherwise the reason, as one line."""
        if registry.location != self._location:  # a reload switched registries: what we knew is about another
            self._reset(registry.location)
        now = self.clock()
        if self._task is None and (self._started is None or now - self._started >= self.interval_s):
            self._started = now
            self._task = asyncio.create_task(self._check(registry, self._answered))
        if not self._answered.is_set():  # nothing known yet: the first answer is worth waiting for, within bounds
            try:
                await asyncio.wait_for(self._answered.wait(), self.timeout_s)
            except TimeoutError:
                return f"registry unreachable: no answer within {self.timeout_s:g}s"
        if self._last_ok is None:
            return f"registry unreachable: {self._last_error}"
        down_for = self.clock() - self._last_ok
        if self._last_error is not None and down_for > self.grace_s:
            return (
                f"registry unreachable for {down_for:.0f}s (grace {self.grace_s:g}s after the last success): "
                f"{self._last_error}"
            )
        return None

    async def settled(self) -> None:
        """Wait until no check is in flight (for tests and shutdown)."""
        while (task := self._task) is not None:
            await asyncio.wait({task})

    async def _check(self, registry: Registry, answered: asyncio.Event) -> None:
        location = registry.location
        self.checks += 1
        job = asyncio.ensure_future(asyncio.to_thread(registry.store.probe))
        try:
            done, _ = await asyncio.wait({job}, timeout=self.timeout_s)
            if not done and location == self._location:
                self._failed(f"no answer within {self.timeout_s:g}s")
                answered.set()
            await asyncio.wait({job})  # no second check while this one still holds a thread
            if location != self._location:
                return  # a reload switched registries meanwhile
            if (exc := job.exception()) is not None:
                if done:
                    self._failed(f"{type(exc).__name__}: {exc}")
            else:
                if self._last_error is not None:
                    log.warning("registry %s reachable again", location)
                self._last_ok, self._last_error = self.clock(), None
        finally:
            answered.set()
            self._task = None

    def _failed(self, reason: str) -> None:
        if self._last_error is None:
            log.warning("registry check failed: %s (still ready for %gs after the last success)", reason, self.grace_s)
        self._last_error = reason


def registry_readiness(state: State) -> RegistryReadiness:
    """The app's one `RegistryReadiness` (made by the first probe; a test may install its own beforehand)."""
    readiness: RegistryReadiness | None = getattr(state, "registry_readiness", None)
    if readiness is None:
        readiness = state.registry_readiness = RegistryReadiness()
    return readiness
