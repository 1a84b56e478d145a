"""The engines behind the gateway: vLLM children (managed mode) or URLs/DNS (external mode), and their health.

Each engine has one watcher task: wait for `/health` (deadline, fail fast on exit), announce it ready (the adapter
manager re-loads what it held), then poll `/health` and `/metrics` every `health_interval_s`. A managed engine
that dies is restarted with exponential backoff until `max_restarts` is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from gateway.engine_metrics import parse_engine_metrics
from gateway.engine_process import EngineProcess, engine_spec, free_port, with_cpu_binding
from gateway.settings import Settings
from gateway.upstream import ERRORS, Upstream

log = logging.getLogger(__name__)

EngineHook = Callable[["Engine"], Awaitable[None]]
EngineListener = Callable[["Engine"], None]


def _ignore(engine: Engine) -> None:
    pass


@dataclass
class Engine:
    id: str
    url: str
    max_loras: int
    slots: int  # adapters the gateway keeps registered there (engines.max_registered_loras, else its CPU slots)
    max_lora_rank: int
    process: EngineProcess | None = None
    healthy: bool = False
    inflight: int = 0
    waiting: int = 0
    running: int = 0
    restarts: int = 0
    gave_up: bool = False
    warming: bool = False  # loading its share of the prewarm adapters before it takes traffic
    last_error: str | None = None
    cpu_slots: int = 0  # vLLM's --max-cpu-loras (0: the same as slots)
    gpu_adapters: frozenset[str] | None = None  # engine names vLLM reports as running (None: not reported)
    started_at: float = field(default_factory=time.monotonic)


class EngineHealth(Protocol):
    """The engines a proxy sends to, and where it reports what it saw (the supervisor; a worker's view of it)."""

    engines: dict[str, Engine]

    def report_failure(self, engine_id: str, error: str) -> None: ...

    def probe_now(self, engine_id: str) -> None: ...


def backoff_s(restarts: int, base_s: float, max_s: float) -> float:
    return float(min(max_s, base_s * 2 ** max(0, restarts - 1)))


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        *,
        model_path: str | None,
        served_name: str,
        on_ready: EngineHook,
        on_down: EngineHook,
        on_tick: EngineHook,
        on_added: EngineListener = _ignore,
        on_removed: EngineListener = _ignore,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.model_path = model_path
        self.served_name = served_name
        self.engines: dict[str, Engine] = {}
        self._on_ready = on_ready
        self._on_down = on_down
        self._on_tick = on_tick
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._discovery: asyncio.Task[None] | None = None
        self._wake: dict[str, asyncio.Event] = {}
        self._on_added = on_added
        self._on_removed = on_removed

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if s.mode == "managed":
            assert self.model_path is not None
            log_dir = s.engines.log_dir or Path.home() / ".loragate" / "logs"
            shared = engine_spec(s.engines, model=self.model_path, served_model_name=self.served_name, port=0)
            for index in range(s.engines.count):
                spec = replace(
                    shared,
                    port=free_port(),
                    extra_env=with_cpu_binding(shared.extra_env, index, s.engines.count),
                )
                process = EngineProcess(spec, log_dir / f"engine-{index}-{spec.port}.log")
                process.start()
                log.info(
                    "engine-%s: started vLLM pid %s on %s (log %s, CPU cores %s)",
                    index,
                    process.pid,
                    spec.url,
                    process.log_path,
                    spec.extra_env.get("VLLM_CPU_OMP_THREADS_BIND", "vLLM's own"),
                )
                self._add(
                    Engine(
                        f"engine-{index}",
                        spec.url,
                        s.engines.max_loras,
                        s.engines.slots,
                        s.engines.max_lora_rank,
                        process=process,
                        cpu_slots=s.engines.cpu_slots,
                    )
                )
        else:
            for url in s.external.urls:
                self._add(self._external_engine(url.rstrip("/")))
            if s.external.discovery_host or s.external.discovery_file:
                await self._discover_once()
                self._discovery = asyncio.create_task(self._discover_loop(), name="engine-discovery")

    def _external_engine(self, url: str) -> Engine:
        ext = self.settings.external
        return Engine(url, url, ext.max_loras, ext.slots, ext.max_lora_rank, cpu_slots=ext.cpu_slots)

    def _add(self, engine: Engine) -> None:
        self.engines[engine.id] = engine
        self._wake[engine.id] = asyncio.Event()
        self._on_added(engine)
        self._tasks[engine.id] = asyncio.create_task(self._watch(engine), name=f"watch-{engine.id}")

    async def _remove(self, engine_id: str) -> None:
        engine = self.engines.pop(engine_id)
        task = self._tasks.pop(engine_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        engine.healthy = False
        self._on_removed(engine)

    async def stop(self) -> None:
        if self._discovery:
            self._discovery.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        processes = [engine.process for engine in self.engines.values() if engine.process]
        await asyncio.gather(*(asyncio.to_thread(process.stop) for process in processes))
        for engine in self.engines.values():
            engine.healthy = False

    # -- health ------------------------------------------------------------------------------------------------------
    def report_failure(self, engine_id: str, error: str) -> None:
        """A request could not reach the engine: stop routing to it until the watcher sees it healthy again."""
        engine = self.engines.get(engine_id)
        if engine is None or not engine.healthy:
            return
        log.warning("%s: request failed (%s); marking it unhealthy", engine_id, error)
        engine.healthy = False
        engine.last_error = error
        self._wake[engine_id].set()

    def probe_now(self, engine_id: str) -> None:
        """Something looked wrong (a dropped connection): run the engine's health check now, not at the next tick."""
        if (wake := self._wake.get(engine_id)) is not None:
            wake.set()

    async def _probe(self, engine: Engine) -> bool:
        try:
            health = await self.upstream.get(f"{engine.url}/health", timeout_s=5.0)
            if health.status != 200:
                engine.last_error = f"/health answered {health.status}"
                return False
            metrics = await self.upstream.get(f"{engine.url}/metrics", timeout_s=5.0)
            if metrics.status == 200:
                seen = parse_engine_metrics(metrics.text)
                engine.running, engine.waiting, engine.gpu_adapters = seen.running, seen.waiting, seen.running_adapters
            return True
        except ERRORS as exc:
            engine.last_error = f"{type(exc).__name__}: {exc}"
            return False

    async def _wait_healthy(self, engine: Engine, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if engine.process is not None and not engine.process.running():
                engine.last_error = f"vLLM exited with status {engine.process.returncode()}"
                log.error("%s: %s:\n%s", engine.id, engine.last_error, engine.process.log_tail(20))
                return False
            if await self._probe(engine):
                return True
            await asyncio.sleep(0.5)
        engine.last_error = f"not healthy after {timeout_s:.0f}s"
        return False

    async def _watch(self, engine: Engine) -> None:
        s = self.settings
        timeout = s.engines.start_timeout_s if engine.process else 30.0
        while True:
            if await self._wait_healthy(engine, timeout):
                try:
                    await self._on_ready(engine)
                except Exception:
                    log.exception("%s: re-loading adapters failed", engine.id)
                engine.healthy = True
                engine.last_error = None
                log.info("%s: healthy at %s", engine.id, engine.url)
                await self._poll(engine)
                await self._on_down(engine)
            if engine.process is None:
                timeout = 30.0
                await asyncio.sleep(s.health_interval_s)
                continue
            if engine.restarts >= s.engines.max_restarts:
                engine.gave_up = True
                log.error("%s: restart budget (%s) spent; leaving it down", engine.id, s.engines.max_restarts)
                await asyncio.to_thread(engine.process.stop, 5.0)
                return
            engine.restarts += 1
            delay = backoff_s(engine.restarts, s.engines.restart_backoff_s, s.engines.restart_backoff_max_s)
            log.warning(
                "%s: restarting vLLM in %.1fs (restart %s of %s)",
                engine.id,
                delay,
                engine.restarts,
                s.engines.max_restarts,
            )
            await asyncio.to_thread(engine.process.stop, 5.0)
            await asyncio.sleep(delay)
            engine.process.start()
            engine.started_at = time.monotonic()
            timeout = s.engines.start_timeout_s

    async def _poll(self, engine: Engine) -> None:
        """Return when the engine stops being healthy."""
        failures = 0
        wake = self._wake[engine.id]
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.settings.health_interval_s)
            wake.clear()
            if engine.process is not None and not engine.process.running():
                engine.last_error = f"vLLM exited with status {engine.process.returncode()}"
                log.error("%s: %s", engine.id, engine.last_error)
                engine.healthy = False
                return
            if await self._probe(engine):
                failures = 0
                engine.healthy = True
                try:
                    await self._on_tick(engine)
                except Exception:
                    log.exception("%s: reconciling resident adapters failed", engine.id)
                continue
            failures += 1
            engine.healthy = False
            if failures >= 3 or (engine.process is not None and not engine.process.running()):
                log.error("%s: unhealthy (%s)", engine.id, engine.last_error)
                return

    # -- external discovery --------------------------------------------------------------------------------------------
    async def _discover_once(self) -> None:
        ext = self.settings.external
        found: set[str] = set()
        try:
            if ext.discovery_host:
                found |= await self._resolve_dns(ext.discovery_host)
            if ext.discovery_file:
                found |= read_engine_file(ext.discovery_file)
        except OSError as exc:
            log.warning("discovery failed (%s); keeping the %s known engines", exc, len(self.engines))
            return
        static = {url.rstrip("/") for url in ext.urls}
        for url in sorted(found - self.engines.keys()):
            log.info("discovery: engine %s joined", url)
            self._add(self._external_engine(url))
        for url in sorted(self.engines.keys() - found - static):
            log.info("discovery: engine %s left", url)
            await self._remove(url)

    async def _resolve_dns(self, host: str) -> set[str]:
        ext = self.settings.external
        infos = await asyncio.get_running_loop().getaddrinfo(host, ext.discovery_port, type=socket.SOCK_STREAM)
        urls = set()
        for _family, _type, _proto, _canon, addr in infos:
            ip = str(addr[0])
            urls.add(f"{ext.discovery_scheme}://{f'[{ip}]' if ':' in ip else ip}:{ext.discovery_port}")
        return urls

    async def _discover_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.external.discovery_interval_s)
            await self._discover_once()


def read_engine_file(path: Path) -> set[str]:
    """Engine URLs listed one per line; blank lines and `#` comments are ignored."""
    urls = set()
    for line in path.read_text().splitlines():
        url = line.split("#", 1)[0].strip()
        if url:
            urls.add(url.rstrip("/"))
    return urls
