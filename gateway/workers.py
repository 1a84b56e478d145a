"""`loragate serve --workers N`: N worker processes serve the completion routes; the primary process owns the rest.

One Python process saturates one core, so the request path runs in N workers that all accept on the public port
(SO_REUSEPORT spreads connections over them). Each worker parses, authenticates, places and relays calls by itself,
with its own upstream connections, metrics, usage events and quota share (each enforces 1/N of every limit, as
gateway replicas do). Everything with state the engines must agree on stays in one place, the primary: the
engines (supervised or discovered), adapter loads and evictions, pins, the admin API, the probes and `/metrics`.
Workers forward every request but a completion to the primary's HTTP server on a Unix socket.

The workers' view of which adapter is loaded where is the primary's ledger, pushed to them over a control channel
(one Unix-socket connection per worker, JSON lines) whenever it changes and at every health tick. A worker places a
call on that view like one process would; when the adapter must be loaded first, it asks the primary, which loads it
once (one lock per engine and version), whoever asks. Before the primary evicts an adapter it takes it out of the
ledger, pushes that to every worker and asks each whether it has calls in flight for it; the answers come after the
push on the same connection, so no call can start on it unseen. It evicts only when none has.

`/metrics` on the primary adds the workers' request metrics (each read over its channel) to its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from adapters_registry import AdapterManifest
from gateway.adapters import AdapterManager
from gateway.errors import GatewayError, Unavailable
from gateway.supervisor import Engine

if TYPE_CHECKING:
    from gateway.settings import Settings
    from gateway.supervisor import EngineHealth

log = logging.getLogger(__name__)

Message = dict[str, Any]
PLACED_HOLD_S = 1.0  # the primary holds a load it made for a worker this long, so it cannot be evicted in between
LOAD_REPORT_S = 0.1


class Channel:
    """Newline-delimited JSON messages both ways; `ask` waits for the reply that carries its message's id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}

    def send(self, message: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def ask(self, message: Message, timeout_s: float = 30.0) -> Message:
        ask_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[ask_id] = future
        self.send({**message, "ask": ask_id})
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(ask_id, None)

    async def serve(self, handle: Callable[[Message], Awaitable[Message | None]]) -> None:
        """Read until the other side closes; replies go to their `ask`, other messages to `handle` (whose answer,
        for a message with an `ask` id, is sent back as the reply)."""
        while line := await self.reader.readline():
            message: Message = json.loads(line)
            if "reply" in message:
                future = self._waiting.get(message["reply"])
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            asyncio.get_running_loop().create_task(self._answer(handle, message))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("the other process closed the control channel"))

    async def _answer(self, handle: Callable[[Message], Awaitable[Message | None]], message: Message) -> None:
        try:
            answer = await handle(message)
        except Exception:
            log.exception("control message %s failed", message.get("t"))
            answer = {"error": {"status": 500, "body": {"error": {"message": "internal error"}}, "headers": {}}}
        if "ask" in message:
            self.send({**(answer or {}), "reply": message["ask"]})


def error_message(exc: GatewayError) -> Message:
    return {"error": {"status": exc.status, "body": exc.envelope(), "headers": exc.headers()}}


class RemoteError(GatewayError):
    """An error the primary answered for a worker's request, passed on as it is."""

    def __init__(self, error: Message) -> None:
        body = error["body"].get("error", {})
        super().__init__(str(body.get("message", "the primary process refused")), param=body.get("param"))
        self.status, self.type, self.code = int(error["status"]), str(body.get("type")), body.get("code")
        self._headers: dict[str, str] = error.get("headers") or {}

    def headers(self) -> dict[str, str]:
        return self._headers


# --- the primary's side -------------------------------------------------------------------------------------------


ENGINE_FIELDS = (
    "id",
    "url",
    "max_loras",
    "slots",
    "max_lora_rank",
    "healthy",
    "waiting",
    "running",
    "restarts",
    "gave_up",
    "last_error",
)


def engine_state(engine: Engine) -> Message:
    fields: Message = {name: getattr(engine, name) for name in ENGINE_FIELDS}
    fields["gpu_adapters"] = sorted(engine.gpu_adapters) if engine.gpu_adapters is not None else None
    return fields


class Primary(Protocol):
    """What the hub reads of the primary's `Gateway` (gateway/deps.py holds the hub, so it is not imported here)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def supervisor(self) -> EngineHealth: ...

    @property
    def adapters(self) -> AdapterManager: ...


class WorkerHub:
    """The control channel's server in the primary: workers connect, get the ledger, ask for loads."""

    def __init__(self, gateway: Primary, path: Path) -> None:
        self.gateway = gateway
        self.path = path
        self.channels: dict[int, Channel] = {}
        self.inflight: dict[int, dict[str, int]] = {}  # worker -> engine -> calls in flight
        self._server: asyncio.Server | None = None
        self._push_pending = False
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connected, path=str(self.path))
        self._ticker = asyncio.create_task(self._tick(), name="worker-state")
        adapters = self.gateway.adapters
        adapters.ledger.watch(self.changed)
        adapters.busy_elsewhere = self.busy_elsewhere
        adapters.resolver.on_forget = self.forget

    async def aclose(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        for channel in self.channels.values():
            channel.writer.close()

    def state(self) -> Message:
        engines = list(self.gateway.supervisor.engines.values())
        totals: dict[str, int] = {}
        for per_engine in self.inflight.values():
            for engine_id, count in per_engine.items():
                totals[engine_id] = totals.get(engine_id, 0) + count
        return {
            "t": "state",
            "engines": [engine_state(engine) for engine in engines],
            "ledger": self.gateway.adapters.ledger.snapshot(),
            "inflight": totals,
        }

    def changed(self) -> None:
        """The ledger changed: push it to every worker once this turn of the event loop is over."""
        if not self._push_pending:
            self._push_pending = True
            asyncio.get_running_loop().call_soon(self._push)

    def _push(self) -> None:
        self._push_pending = False
        state = self.state()
        for channel in self.channels.values():
            channel.send(state)

    def forget(self, name: str | None) -> None:
        for channel in self.channels.values():
            channel.send({"t": "forget", "name": name})

    async def _tick(self) -> None:
        while True:  # health and queue lengths change without a ledger change
            await asyncio.sleep(self.gateway.settings.health_interval_s)
            self._push()

    async def busy_elsewhere(self, engine_id: str, keys: tuple[str, ...]) -> set[str]:
        self._push()  # the ledger without `keys` reaches each worker before the question does
        replies = await asyncio.gather(
            *(
                channel.ask({"t": "busy?", "engine": engine_id, "keys": list(keys)})
                for channel in self.channels.values()
            ),
            return_exceptions=True,
        )
        busy: set[str] = set()
        for reply in replies:
            if isinstance(reply, BaseException):
                busy |= set(keys)  # a worker that cannot answer may be using them
            else:
                busy |= set(reply.get("busy", []))
        return busy

    async def metrics_texts(self) -> list[str]:
        replies = await asyncio.gather(
            *(channel.ask({"t": "metrics?"}, timeout_s=5) for channel in self.channels.values()),
            return_exceptions=True,
        )
        return [str(reply["text"]) for reply in replies if isinstance(reply, dict) and "text" in reply]

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = Channel(reader, writer)
        hello = json.loads(await reader.readline())
        index = int(hello["worker"])
        self.channels[index] = channel
        channel.send(self.state())
        log.info("worker %s (pid %s) connected", index, hello.get("pid"))
        try:
            await channel.serve(lambda message: self._handle(index, message))
        finally:
            self.channels.pop(index, None)
            self.inflight.pop(index, None)
            log.warning("worker %s disconnected", index)

    async def _handle(self, index: int, message: Message) -> Message | None:
        kind = message["t"]
        supervisor = self.gateway.supervisor
        if kind == "acquire":
            return await self._acquire(message)
        if kind == "load":
            self.inflight[index] = {str(k): int(v) for k, v in message["inflight"].items()}
        elif kind == "failure":
            supervisor.report_failure(message["engine"], message["error"])
        elif kind == "probe":
            supervisor.probe_now(message["engine"])
        elif kind == "vanished":
            self.gateway.adapters.ledger.record_unloaded(message["engine"], message["key"])
        return None

    async def _acquire(self, message: Message) -> Message:
        adapters = self.gateway.adapters
        try:
            target = await adapters.resolve(message["model"])
            lease = await adapters.acquire(target.manifest, message["request_id"], set(message.get("exclude", [])))
        except GatewayError as exc:
            return error_message(exc)
        asyncio.get_running_loop().call_later(PLACED_HOLD_S, lease.release)
        return {"engine": lease.engine.id}


def merge_expositions(texts: Iterable[str]) -> bytes:
    """Prometheus text expositions of several processes as one: samples with the same name and labels added up."""
    order: list[str] = []
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            kind = "untyped" if family.type == "unknown" else family.type
            if family.name not in families:
                order.append(family.name)
                families[family.name] = (kind, family.documentation, {})
            samples = families[family.name][2]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value
    lines: list[str] = []
    for name in order:
        kind, doc, samples = families[name]
        exposed = f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
        lines.append(f"# HELP {exposed} {doc}")
        lines.append(f"# TYPE {exposed} {kind}")
        for (sample_name, labels), value in samples.items():
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{rendered}}} {value!r}" if rendered else f"{sample_name} {value!r}")
    return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class WorkerPool:
    """Starts the worker processes, restarts one that dies (backed off), stops them first at shutdown."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self.count = count
        self.env = env
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)
        self._watch = asyncio.create_task(self._keep_alive(), name="worker-pool")

    def _spawn(self, index: int) -> None:
        env = {**os.environ, **self.env, "LORAGATE_WORKER_INDEX": str(index)}
        self.processes[index] = subprocess.Popen([sys.executable, "-m", "gateway.worker"], env=env)
        log.info("worker %s started (pid %s)", index, self.processes[index].pid)

    async def _keep_alive(self) -> None:
        restarts: dict[int, int] = {}
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, process in list(self.processes.items()):
                if process.poll() is not None and not self._stopping:
                    restarts[index] = restarts.get(index, 0) + 1
                    delay = min(30.0, 0.5 * 2 ** restarts[index])
                    log.error("worker %s exited with %s; restarting in %.1fs", index, process.returncode, delay)
                    await asyncio.sleep(delay)
                    if not self._stopping:
                        self._spawn(index)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to every worker (each drains its own calls), then SIGKILL what is left after `grace_s`."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in self.processes.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for process in self.processes.values():
            if process.poll() is None:
                log.warning("worker pid %s still running after %.0fs; killing it", process.pid, grace_s)
                process.kill()
                process.wait()


# --- the worker's side ---------------------------------------------------------------------------------------------


class WorkerEngines:
    """A worker's view of the primary's engines (updated from its state pushes), and where failures are reported."""

    def __init__(self) -> None:
        self.engines: dict[str, Engine] = {}
        self.link: PrimaryLink | None = None
        self._others: dict[str, int] = {}

    def apply(self, state: Message, own: dict[str, int]) -> None:
        seen = set()
        for fields in state["engines"]:
            engine_id = fields["id"]
            seen.add(engine_id)
            gpu = fields["gpu_adapters"]
            engine = self.engines.get(engine_id)
            if engine is None:
                engine = Engine(
                    fields["id"], fields["url"], fields["max_loras"], fields["slots"], fields["max_lora_rank"]
                )
                self.engines[engine_id] = engine
            for name in ENGINE_FIELDS[4:]:
                setattr(engine, name, fields[name])
            engine.gpu_adapters = frozenset(gpu) if gpu is not None else None
            # calls the other workers have there count as waiting, for placement by load
            others = int(state["inflight"].get(engine_id, 0)) - own.get(engine_id, 0)
            engine.waiting += max(others, 0)
        for engine_id in set(self.engines) - seen:
            del self.engines[engine_id]

    def report_failure(self, engine_id: str, error: str) -> None:
        engine = self.engines.get(engine_id)
        if engine is not None:
            engine.healthy = False  # until the primary's health check says otherwise
        if self.link is not None:
            self.link.channel.send({"t": "failure", "engine": engine_id, "error": error})

    def probe_now(self, engine_id: str) -> None:
        if self.link is not None:
            self.link.channel.send({"t": "probe", "engine": engine_id})


class WorkerAdapters(AdapterManager):
    """Placement on the primary's ledger; a load is asked of the primary, which makes it once for everyone."""

    link: PrimaryLink

    async def place(
        self, engine: Engine, manifest: AdapterManifest, request_id: str, exclude: set[str]
    ) -> Engine | None:
        reply = await self.link.channel.ask(
            {"t": "acquire", "model": manifest.ref, "request_id": request_id, "exclude": sorted(exclude)},
            timeout_s=self.load_timeout_s + 5,
        )
        if "error" in reply:
            raise RemoteError(reply["error"])
        placed = self.engines.get(reply["engine"])
        if placed is None:
            raise Unavailable(
                f"engine {reply['engine']} is not known to this worker yet; retry", code="engines_not_ready"
            )
        # the primary's push of the new ledger may still be on its way: this call goes there now, the next ones too
        self.ledger.record_loaded(placed.id, manifest.engine_name)
        return placed

    async def ensure_loaded(self, engine: Engine, manifest: AdapterManifest, *, evict: bool = True) -> bool:
        raise AssertionError("workers never load adapters themselves")


class PrimaryLink:
    """A worker's control channel to the primary: applies its state, answers its questions, reports load."""

    def __init__(self, path: Path, index: int, engines: WorkerEngines, adapters: WorkerAdapters) -> None:
        self.path = path
        self.index = index
        self.engines = engines
        self.adapters = adapters
        self.metrics_text: Callable[[], str] = lambda: ""
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: dict[str, int] = {}

    async def connect(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        self.channel = Channel(reader, writer)
        self.channel.send({"t": "hello", "worker": self.index, "pid": os.getpid()})
        self.engines.link = self
        self.adapters.link = self
        self._tasks = [
            asyncio.create_task(self._serve(), name="primary-link"),
            asyncio.create_task(self._report_load(), name="load-report"),
        ]
        await asyncio.wait_for(self.ready.wait(), timeout_s)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.channel.writer.close()

    async def _serve(self) -> None:
        await self.channel.serve(self._handle)
        log.error("the primary process closed the control channel; stopping this worker")
        os.kill(os.getpid(), signal.SIGTERM)

    async def _handle(self, message: Message) -> Message | None:
        kind = message["t"]
        if kind == "state":
            self.engines.apply(message, self._own())
            for engine_id in self.engines.engines:
                self.adapters.ledger.add_engine(engine_id, message["ledger"]["slots"].get(engine_id, 1))
            self.adapters.ledger.replace(message["ledger"])
            self.ready.set()
        elif kind == "busy?":
            busy = self.adapters.busy_here(message["engine"])
            return {"busy": sorted(busy & set(message["keys"]))}
        elif kind == "metrics?":
            return {"text": self.metrics_text()}
        elif kind == "forget":
            self.adapters.resolver.forget(message["name"])
        return None

    def _own(self) -> dict[str, int]:
        return {engine.id: engine.inflight for engine in self.engines.engines.values()}

    async def _report_load(self) -> None:
        while True:
            await asyncio.sleep(LOAD_REPORT_S)
            own = self._own()
            if own != self._reported:
                self._reported = own
                self.channel.send({"t": "load", "inflight": own})


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """The public port, bound by every worker (SO_REUSEPORT: the kernel spreads new connections over them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
