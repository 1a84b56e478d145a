"""Chaos run: steady traffic through one gateway over three managed vLLM CPU engines and many adapters while faults
hit it; per fault, what failed where, how long the adapters took to serve again, and what usage events lost or
counted twice.

    flock /tmp/loragate-heavy.lock .venv/bin/python benchmarks/chaos.py [--clients 6] [--adapters 16] [--json F]

Everything is on loopback: the registry on an S3 server of its own (moto), a usage-webhook sink in this process,
the gateway a child process (`loragate serve --config`), its three engines its children. Faults, in order:
  a. kill      SIGKILL the vLLM server of the engine holding the most adapters (the gateway restarts it)
  b. stop      SIGSTOP another engine's whole process group for 20 s, then SIGCONT
  c. registry  SIGSTOP the S3 server for 30 s (connections hang, as with a registry that stopped answering)
  d. restart   SIGTERM the gateway under load (it drains), then start it again (its engines restart with it)
  e. sockets   500 idle TCP connections and a slow-loris client (one header byte per second) for 30 s
Each fault's window runs from the fault until every adapter it held served again (bounded) plus a settle time; a
request counts in a window when it overlaps it. "Failed on the faulted part": on the faulted engine (its
x-loragate-engine or usage event, else an adapter it held) or, for the restart, anything. Usage: every request the
gateway answered must have exactly one event (webhook and log), with the client's completion tokens for a 200.
Bounded: every wait has a deadline, the traffic is --clients loops, and the run stops after --max-minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Hello, how are you today?"
MAX_TOKENS = 8
SETTLE_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- the parts on loopback ---------------------------------------------------------------------------------------
class Moto:
    """The registry's S3 server; `pause` SIGSTOPs it."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Moto:
        exe = Path(sys.executable).with_name("moto_server")
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=out, stderr=out)
        wait_until(lambda: _answers(self.url), 60, "moto_server")
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


class UsageSink:
    """The usage webhook: keeps every event it is sent."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.posts = 0
        lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with lock:
                    sink.events.extend(body["events"])
                    sink.posts += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/usage"
        threading.Thread(target=self.server.serve_forever, name="usage-sink", daemon=True).start()


class Gateway:
    """`loragate serve --config` as a child process; each start logs to a file of its own."""

    def __init__(self, work: Path, config: Path, port: int, env: dict[str, str]) -> None:
        self.work, self.config, self.env = work, config, env
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        path = self.work / f"gateway-{len(self.logs)}.log"
        self.logs.append(path)
        code = "from loragate.cli import main; raise SystemExit(main())"
        with path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env,
            )

    def wait_ready(self, timeout_s: float) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"the gateway exited with {self.proc.returncode}; see {self.logs[-1]}")
            try:
                engines = httpx.get(f"{self.url}/admin/engines", timeout=5).json()["engines"]
                return len(engines) == 3 and all(e["healthy"] for e in engines)
            except (httpx.HTTPError, KeyError, ValueError):
                return False

        wait_until(ready, timeout_s, "the gateway and its three engines")

    def stop(self, timeout_s: float = 90) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def engines(self) -> list[dict[str, Any]]:
        engines: list[dict[str, Any]] = httpx.get(f"{self.url}/admin/engines", timeout=10).json()["engines"]
        return engines


class EngineWatch:
    """Polls /admin/engines every 0.5 s in a thread and keeps each change of an engine's (healthy, pid)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.changes: list[tuple[float, str, bool, int | None]] = []
        self._last: dict[str, tuple[bool, int | None]] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="engine-watch", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                engines = self.gw.engines()
            except (httpx.HTTPError, KeyError, ValueError):
                continue  # the gateway is restarting
            for e in engines:
                state = (bool(e["healthy"]), e["pid"])
                if self._last.get(e["id"]) != state:
                    self._last[e["id"]] = state
                    self.changes.append((time.monotonic(), e["id"], *state))

    def stop(self) -> None:
        self._stop.set()

    def timeline(self, engine: str, since: float, until: float) -> str:
        moves = [
            f"+{t - since:.1f}s {'healthy' if healthy else 'unhealthy'} (pid {pid})"
            for t, e, healthy, pid in self.changes
            if e == engine and since <= t <= until
        ]
        return f"{engine}: " + (", ".join(moves) if moves else "no change seen")


def wait_until(check: Any, timeout_s: float, what: str, every_s: float = 0.5) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(every_s)
    return time.monotonic() - started


# ---- traffic -----------------------------------------------------------------------------------------------------
@dataclass
class Record:
    id: str
    client: str
    model: str
    stream: bool
    start: float
    end: float = 0.0
    status: int | None = None  # the gateway's HTTP status; None: no answer (connection refused, dropped, timeout)
    error: str | None = None  # what went wrong, when something did
    engine: str | None = None
    completion_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


class Traffic:
    """`clients` loops sending chat completions (one in four streamed) to random models, in a thread of its own."""

    def __init__(self, url: str, models: list[str], clients: int, seed: int = 0) -> None:
        self.url, self.models, self.clients = url, models, clients
        self.records: list[Record] = []
        self.rng = random.Random(seed)
        self._stop = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._http: httpx.AsyncClient | None = None
        self._background: set[asyncio.Task[Record]] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.clients)))
        if self._background:  # probe requests still in flight (each bounded by the client timeout)
            await asyncio.wait(set(self._background))
        if self._http is not None:
            await self._http.aclose()

    async def _client(self, i: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=1, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(90, connect=3), limits=limits) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                record = await self.send(http, f"c{i}", self.rng.choice(self.models), stream=n % 4 == 0)
                await asyncio.sleep(0.5 if not record.ok else 0.02)  # no hot loop against a gateway that is down

    async def send(self, http: httpx.AsyncClient, client: str, model: str, *, stream: bool) -> Record:
        record = Record(f"chaos-{uuid.uuid4().hex[:16]}", client, model, stream, time.monotonic())
        self.records.append(record)
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        try:
            async with http.stream(
                "POST", f"{self.url}/v1/chat/completions", json=body, headers={"x-request-id": record.id}
            ) as response:
                record.status = response.status_code
                record.engine = response.headers.get("x-loragate-engine")
                content = await response.aread()
            parse(record, content)
        except httpx.HTTPError as exc:
            record.error = record.error or type(exc).__name__
        except (ValueError, KeyError, TypeError) as exc:  # an answer that is not what the API promises
            record.error = f"bad_body:{type(exc).__name__}"
        record.end = time.monotonic()
        return record

    async def _until_served(self, model: str, since: float, deadline: float) -> float | None:
        """A new request for `model` every second (at most 3 in flight) until one succeeds; never waits on a request
        that hangs (it goes on in the background and is recorded when it ends)."""
        pending: set[asyncio.Task[Record]] = set()
        while True:
            if len(pending) < 3:
                task = asyncio.create_task(self.send(self._probe_http(), "probe", model, stream=False))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                pending.add(task)
            done, pending = await asyncio.wait(pending, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            served = [t.result().end for t in done if t.result().ok]
            if served:
                return min(served) - since
            if time.monotonic() >= deadline:
                return None

    def _probe_http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(90, connect=3), limits=httpx.Limits(max_connections=200)
            )
        return self._http

    async def _probe(self, models: list[str], since: float, timeout_s: float) -> dict[str, float | None]:
        deadline = time.monotonic() + timeout_s
        times = await asyncio.gather(*(self._until_served(m, since, deadline) for m in models))
        return dict(zip(models, times, strict=True))

    def probe(self, models: list[str], since: float, timeout_s: float) -> dict[str, float | None]:
        """Seconds from `since` until a new request for each model succeeded (None: not within `timeout_s`)."""
        return asyncio.run_coroutine_threadsafe(self._probe(models, since, timeout_s), self.loop).result()


def parse(record: Record, content: bytes) -> None:
    if record.status != 200:
        try:
            record.error = json.loads(content)["error"]["code"] or f"http_{record.status}"
        except (ValueError, KeyError, TypeError):
            record.error = f"http_{record.status}"
        return
    if not record.stream:
        record.completion_tokens = json.loads(content)["usage"]["completion_tokens"]
        return
    events = [line[6:] for line in content.decode(errors="replace").splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        record.error = "stream_truncated"
    for data in events[:-1] if events and events[-1] == "[DONE]" else events:
        chunk = json.loads(data)
        if "error" in chunk:
            record.error = f"stream_error:{chunk['error'].get('code')}"
        if chunk.get("usage"):
            record.completion_tokens = chunk["usage"]["completion_tokens"]


# ---- faults ------------------------------------------------------------------------------------------------------
@dataclass
class Fault:
    name: str
    what: str
    start: float
    end: float = 0.0
    engine: str | None = None  # the faulted engine, when an engine is faulted
    everything: bool = False  # the gateway itself: every failure in the window is the fault's
    held: list[str] = field(default_factory=list)
    serve_again_s: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resident_models(engine: dict[str, Any]) -> list[str]:
    return sorted({r["ref"].split("@")[0] for r in engine["resident"] if r.get("ref")})


def fault_kill(gw: Gateway, traffic: Traffic) -> Fault:
    target = max(gw.engines(), key=lambda e: len(e["resident"]))
    fault = Fault(
        "a. SIGKILL an engine",
        f"SIGKILL {target['id']} (pid {target['pid']})",
        time.monotonic(),
        engine=target["id"],
        held=resident_models(target),
    )
    os.kill(target["pid"], signal.SIGKILL)
    fault.serve_again_s = traffic.probe(fault.held, fault.start, 180)

    def restarted() -> bool:
        engine = next(e for e in gw.engines() if e["id"] == target["id"])
        return bool(engine["healthy"] and engine["pid"] != target["pid"])

    try:
        wait_until(restarted, 400, f"{target['id']} restarted")
    except TimeoutError as exc:
        fault.notes.append(str(exc))
    return fault


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the gateway may have killed and replaced it meanwhile
        os.killpg(pgid, sig)


def fault_stop(gw: Gateway, traffic: Traffic, avoid: str | None) -> Fault:
    engines = [e for e in gw.engines() if e["id"] != avoid and e["healthy"]]
    target = max(engines, key=lambda e: len(e["resident"]))
    fault = Fault(
        "b. SIGSTOP an engine 20 s",
        f"SIGSTOP {target['id']}'s process group for 20 s",
        time.monotonic(),
        engine=target["id"],
        held=resident_models(target),
    )
    os.killpg(target["pid"], signal.SIGSTOP)
    resume = threading.Timer(20, lambda: _signal_group(target["pid"], signal.SIGCONT))
    resume.start()
    try:
        fault.serve_again_s = traffic.probe(fault.held, fault.start, 20)
    finally:
        resume.join()
    missing = [m for m, t in fault.serve_again_s.items() if t is None]
    if missing:
        fault.serve_again_s.update(traffic.probe(missing, fault.start, 160))
    after = next(e for e in gw.engines() if e["id"] == target["id"])
    fault.notes.append(
        f"after SIGCONT: {target['id']} pid {after['pid']} ({'same' if after['pid'] == target['pid'] else 'replaced'})"
        f", healthy {after['healthy']}, restarts {after['restarts']}"
    )
    return fault


def fault_registry(moto: Moto, traffic: Traffic, models: list[str]) -> Fault:
    fault = Fault("c. registry unreachable 30 s", "SIGSTOP the S3 server for 30 s", time.monotonic(), held=models)
    moto.signal(signal.SIGSTOP)
    resume = threading.Timer(30, moto.signal, args=(signal.SIGCONT,))
    resume.start()
    try:
        fault.serve_again_s = traffic.probe(models, fault.start, 30)
    finally:
        resume.join()
    missing = [m for m, t in fault.serve_again_s.items() if t is None]
    if missing:
        fault.serve_again_s.update(traffic.probe(missing, fault.start, 150))
    return fault


def fault_restart(gw: Gateway, traffic: Traffic, models: list[str]) -> Fault:
    fault = Fault(
        "d. gateway restart", "SIGTERM the gateway, start it again", time.monotonic(), everything=True, held=models
    )
    code = gw.stop()
    stopped = time.monotonic()
    fault.notes.append(f"old gateway exited {code} after {stopped - fault.start:.1f}s (drain and engine stop)")
    gw.start()
    gw.wait_ready(600)
    fault.notes.append(f"new gateway ready (3 engines healthy) {time.monotonic() - stopped:.1f}s after its start")
    fault.serve_again_s = traffic.probe(models, fault.start, 180)
    return fault


def fault_sockets(gw: Gateway, traffic: Traffic, models: list[str], port: int) -> Fault:
    fault = Fault(
        "e. 500 idle conns + slow-loris",
        "500 idle connections and a slow-loris client for 30 s",
        time.monotonic(),
        held=models,
    )
    idle = []
    for _ in range(500):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        idle.append(sock)
    loris = socket.create_connection(("127.0.0.1", port), timeout=5)
    loris.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    loris_closed: list[float] = []

    def drip() -> None:
        for byte in b"X-Slow: " + b"a" * 40:
            try:
                loris.sendall(bytes([byte]))
            except OSError:
                loris_closed.append(time.monotonic() - fault.start)
                return
            time.sleep(1)

    dripper = threading.Thread(target=drip, name="slow-loris", daemon=True)
    dripper.start()
    fault.serve_again_s = traffic.probe(models, fault.start, 30)
    time.sleep(max(0.0, fault.start + 30 - time.monotonic()))
    closed = 0
    for sock in idle:
        try:
            closed += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    fault.notes.append(f"after 30 s the gateway had closed {closed} of the 500 idle connections")
    fault.notes.append(
        f"slow-loris: the gateway closed it after {loris_closed[0]:.0f}s"
        if loris_closed
        else "slow-loris: still open after 30 s (one header byte a second)"
    )
    for sock in [*idle, loris]:
        sock.close()
    return fault


# ---- accounting --------------------------------------------------------------------------------------------------
def log_events(paths: list[Path]) -> list[dict[str, Any]]:
    events = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if " gateway.usage: {" in line:
                events.append(json.loads(line.split(" gateway.usage: ", 1)[1]))
    return events


def summarize(
    fault: Fault | None,
    records: list[Record],
    start: float,
    end: float,
    webhook: dict[str, list[dict[str, Any]]],
    logged: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    window = [r for r in records if r.start <= end and (r.end or end) >= start]
    failed_here = failed_elsewhere = 0
    errors: Counter[str] = Counter()
    for r in window:
        if r.ok:
            continue
        errors[r.error or f"http_{r.status}"] += 1
        engine = r.engine or next((e["engine"] for e in webhook.get(r.id, []) if e.get("engine")), None)
        if fault is not None and (
            fault.everything
            or (fault.engine is not None and (engine == fault.engine or (engine is None and r.model in fault.held)))
        ):
            failed_here += 1
        else:
            failed_elsewhere += 1
    answered = [r for r in window if r.status is not None]

    def accounting(events: dict[str, list[dict[str, Any]]]) -> tuple[int, int, int]:
        lost = sum(1 for r in answered if r.id not in events)
        double = sum(1 for r in window if len(events.get(r.id, [])) > 1)
        tokens = sum(
            1
            for r in window
            if r.ok
            and r.completion_tokens is not None
            and len(events.get(r.id, [])) == 1
            and events[r.id][0]["completion_tokens"] != r.completion_tokens
        )
        return lost, double, tokens

    slowest = max((r.end - r.start for r in window if r.ok), default=0.0)
    times = [t for t in (fault.serve_again_s.values() if fault else []) if t is not None]
    never = [m for m, t in (fault.serve_again_s.items() if fault else []) if t is None]
    return {
        "fault": fault.name if fault else "baseline (no fault)",
        "what": fault.what if fault else "",
        "requests": len(window),
        "failed_on_faulted": failed_here,
        "failed_elsewhere": failed_elsewhere,
        "errors": dict(errors.most_common()),
        "held": len(fault.held) if fault else 0,
        "serve_again_max_s": round(max(times), 1) if times else None,
        "slowest_success_s": round(slowest, 1),
        "never_served_again": never,
        "usage_webhook_lost_double_tokens": accounting(webhook),
        "usage_log_lost_double_tokens": accounting(logged),
        "no_answer_but_recorded": sum(1 for r in window if r.status is None and r.id in logged),
        "notes": fault.notes if fault else [],
        "window_s": round(end - start, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| fault | requests | failed on the faulted part | failed elsewhere | held adapters serve again (max) "
        "| slowest success | usage lost / double / token mismatch (webhook; log) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for row in rows:
        again = (
            "-"
            if not row["held"]
            else (
                f"{row['serve_again_max_s']} s ({row['held']} adapters)"
                if not row["never_served_again"]
                else f"{len(row['never_served_again'])} of {row['held']} not within the bound"
            )
        )
        web, logged = row["usage_webhook_lost_double_tokens"], row["usage_log_lost_double_tokens"]
        usage = f"{web[0]} / {web[1]} / {web[2]}; {logged[0]} / {logged[1]} / {logged[2]}"
        lines.append(
            f"| {row['fault']} | {row['requests']} | {row['failed_on_faulted']} | {row['failed_elsewhere']} | {again} "
            f"| {row['slowest_success_s']} s | {usage} |"
        )
    return "\n".join(lines)


# ---- the run -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stack(work: Path, n_adapters: int) -> Iterator[tuple[Moto, UsageSink, Gateway, list[str], int]]:
    import boto3

    from adapters_registry.registry import open_registry
    from training.tiny_model import build_random_adapter, cached_tiny_model

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "AWS_ACCESS_KEY_ID": "chaos",
        "AWS_SECRET_ACCESS_KEY": "chaos",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONPATH": str(REPO),
        "LORAGATE_REGISTRY_CACHE": str(work / "gateway-cache"),
    }
    moto = Moto(work / "moto.log").start()
    env["LORAGATE_S3_ENDPOINT_URL"] = moto.url
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    os.environ["LORAGATE_S3_ENDPOINT_URL"] = moto.url
    gw: Gateway | None = None
    try:
        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket="chaos")
        registry = open_registry("s3://chaos/loragate", cache_dir=work / "push-cache")
        model = cached_tiny_model()
        registry.add_base(model, "tiny")
        names = []
        for i in range(n_adapters):
            adapter = build_random_adapter(model, work / "adapters" / f"a{i}", seed=i + 1)
            names.append(registry.push(adapter, f"chaos-{i:02d}", "tiny").name)
        log(f"registry s3://chaos/loragate on {moto.url}: base tiny, {len(names)} adapters")
        sink = UsageSink()
        port = free_port()
        config = work / "gateway.yaml"
        config.write_text(
            json.dumps(
                {  # JSON is YAML
                    "mode": "managed",
                    "base": "tiny",
                    "registry": "s3://chaos/loragate",
                    "host": "127.0.0.1",
                    "port": port,
                    "engines": {
                        "count": 3,
                        "max_loras": 4,
                        "max_cpu_loras": 4,
                        "max_lora_rank": 16,
                        "max_model_len": 512,
                        "log_dir": str(work / "engine-logs"),
                        "start_timeout_s": 400,
                        "restart_backoff_s": 1,
                        "max_restarts": 10,
                    },
                    "health_interval_s": 1.0,
                    "drain_grace_s": 10,
                    "usage_webhook_url": sink.url,
                }
            )
        )
        gw = Gateway(work, config, port, env)
        gw.start()
        gw.wait_ready(600)
        yield moto, sink, gw, names, port
    finally:
        if gw is not None:
            gw.stop()
        moto.stop()


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    deadline = time.monotonic() + args.max_minutes * 60
    with stack(work, args.adapters) as (moto, sink, gw, names, port):
        log(f"gateway {gw.url} ready over 3 engines; warming every adapter")
        models = ["tiny", *names]
        traffic = Traffic(gw.url, models, args.clients, seed=args.seed)
        traffic.start()
        warm = traffic.probe(names, time.monotonic(), 300)
        if None in warm.values():
            raise SystemExit(f"adapters that never answered while warming up: {warm}")
        spans: list[tuple[Fault | None, float, float]] = []
        t0 = time.monotonic()
        time.sleep(20)
        spans.append((None, t0, time.monotonic()))
        log(f"baseline: {sum(1 for r in traffic.records if r.start >= t0)} requests in 20 s")
        steps: list[Callable[[], Fault]] = [
            lambda: fault_kill(gw, traffic),
            lambda: fault_stop(gw, traffic, avoid=spans[-1][0].engine if spans[-1][0] else None),
            lambda: fault_registry(moto, traffic, names),
            lambda: fault_restart(gw, traffic, names),
            lambda: fault_sockets(gw, traffic, names, port),
        ]
        watch = EngineWatch(gw)
        for step in steps:
            if time.monotonic() > deadline:
                log("the run's time bound is spent: the remaining faults are skipped")
                break
            waited = wait_until(lambda: all(e["healthy"] for e in gw.engines()), 600, "every engine healthy", 1.0)
            log(f"every engine healthy (waited {waited:.0f}s); next fault in 5 s")
            time.sleep(5)
            fault = step()
            time.sleep(SETTLE_S)
            fault.end = time.monotonic()
            if fault.engine:
                fault.notes.append(watch.timeline(fault.engine, fault.start, fault.end))
            log(f"{fault.name}: {fault.what}; adapters served again: {fault.serve_again_s}; {'; '.join(fault.notes)}")
            spans.append((fault, fault.start, fault.end))
        watch.stop()
        traffic.stop()
        time.sleep(3)  # the last webhook batch
    # the gateway has stopped (and flushed what it could): every event it will ever send is in
    webhook: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in sink.events:
        webhook[event["request_id"]].append(event)
    logged: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in log_events(gw.logs):
        logged[event["request_id"]].append(event)
    records = [r for r in traffic.records if r.end]
    with (work / "records.jsonl").open("w") as out:
        for r in records:
            events = [{k: e.get(k) for k in ("engine", "status", "error_code")} for e in webhook.get(r.id, [])]
            out.write(json.dumps({**vars(r), "events": events}) + "\n")
    rows = [summarize(f, records, s, e, webhook, logged) for f, s, e in spans]
    total = summarize(None, records, records[0].start, max(r.end for r in records), webhook, logged)
    inside = {r.id for r in records if any(s <= r.end and r.start <= e for _, s, e in spans)}
    total.update(
        fault="whole run (incl. warm-up)",
        failed_on_faulted=sum(row["failed_on_faulted"] for row in rows),
        failed_elsewhere=sum(row["failed_elsewhere"] for row in rows)
        + sum(1 for r in records if not r.ok and r.id not in inside),
    )
    return [*rows, total]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=6, help="concurrent client loops")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=25.0, help="no new fault starts after this")
    parser.add_argument("--workdir", type=Path, help="where the run's folder goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs) afterwards")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chaos-", dir=args.workdir))
    started = time.monotonic()
    try:
        rows = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"logs kept in {work}")
    print()
    print(table(rows))
    print()
    for row in rows:
        print(f"{row['fault']}: errors {row['errors']}; window {row['window_s']} s; {'; '.join(row['notes'])}")
    print(f"\nwhole run {time.monotonic() - started:.0f} s, {args.clients} clients, {args.adapters} adapters")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
