"""`model` -> registry version (a `Resolution`: one version, or two while an alias rolls one out), answered from
memory on the request path.

A name seen before is answered at once; once its answer is older than `ttl_s` it is refreshed in the background
while the old answer still serves, so a request never waits on the registry for a name it has seen. A name not
seen before waits for one lookup, shared by every request that asks for it meanwhile. A name the registry does not
know is remembered for `missing_ttl_s` (a bad name cannot hammer the registry; a new push is servable that soon).
While the registry is unreachable, the answers it gave stand in. A move made through this gateway (promote,
rollback, reload) drops the names it touches at once; a move made elsewhere (another replica, the CLI) is seen
within `ttl_s` plus one lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters_registry import Registry
from adapters_registry.aliases import Resolution
from adapters_registry.errors import NotFoundError, RegistryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    answer: Resolution | NotFoundError
    at: float


class Resolver:
    def __init__(
        self, registry: Registry, *, ttl_s: float = 2.0, missing_ttl_s: float = 1.0, max_entries: int = 10_000
    ) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self.missing_ttl_s = missing_ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Resolution | NotFoundError]] = {}
        self.on_forget: Callable[[str | None], None] = lambda name: None  # gateway workers forget it too
        # (name, version): a refresh found that a reference stopped serving a version (a rollout stopped or done
        # by the CLI or another replica); the gateway unloads it where nothing serves it any more
        self.on_dropped: Callable[[str, int], None] = lambda name, version: None

    async def resolve(self, model: str) -> Resolution:
        """What `model` serves; NotFoundError, or another RegistryError when the registry cannot say."""
        entry = self._entries.get(model)
        if entry is not None:
            age = time.monotonic() - entry.at
            if isinstance(entry.answer, Resolution):
                if age > self.ttl_s and model not in self._pending:
                    self._start(model)  # refresh behind the answer we already have
                return entry.answer
            if age <= self.missing_ttl_s:
                raise entry.answer
        # shielded: a request that gives up waiting must not cancel the lookup the others wait on
        answer = await asyncio.shield(self._pending.get(model) or self._start(model))
        if isinstance(answer, NotFoundError):
            raise answer
        return answer

    def _start(self, model: str) -> asyncio.Future[Resolution | NotFoundError]:
        future = asyncio.ensure_future(self._lookup(model))
        self._pending[model] = future
        future.add_done_callback(lambda done: self._settled(model, done))
        return future

    def _settled(self, model: str, done: asyncio.Future[Resolution | NotFoundError]) -> None:
        self._pending.pop(model, None)
        if not done.cancelled():
            done.exception()  # retrieved: a refresh nobody waited for must not warn "never retrieved"

    async def _lookup(self, model: str) -> Resolution | NotFoundError:
        try:
            answer: Resolution | NotFoundError = await asyncio.to_thread(self.registry.resolve_split, model)
        except NotFoundError as exc:
            answer = exc
        except RegistryError as exc:
            known = self._entries.get(model)
            if known is not None and isinstance(known.answer, Resolution):
                age = time.monotonic() - known.at
                log.warning("registry lookup of %s failed (%s); serving the answer from %.0fs ago", model, exc, age)
                return known.answer
            raise
        known = self._entries.get(model)
        if known is not None and isinstance(known.answer, Resolution) and isinstance(answer, Resolution):
            for version in sorted(known.answer.versions() - answer.versions()):
                self.on_dropped(known.answer.current.name, version)
        self._entries[model] = _Entry(answer, time.monotonic())
        self._entries.move_to_end(model)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return answer

    def forget(self, name: str | None = None) -> None:
        """Drop what is known about adapter `name` (every reference to it), or about everything."""
        self.on_forget(name)
        if name is None:
            self._entries.clear()
            return
        for model in [m for m in self._entries if m == name or m.startswith((f"{name}@", f"{name}:"))]:
            del self._entries[model]
