"""The gateway's own cost per request, against vllm-router, in front of an upstream that answers instantly.

    .venv/bin/python benchmarks/bench_dataplane.py [--rounds 3] [--duration 5] [--router /path/to/vllm-router]
        [--workers 1,2] [--json out.json]

Every target sits in front of the same upstream: a small asyncio server in its own process that speaks just enough
of vLLM's HTTP API (`/health`, `/metrics`, `/v1/models`, the runtime LoRA endpoints, and chat completions answered
at once: one JSON body, or an SSE stream of `--chunks` content events a `--chunk-gap-ms` apart, then usage and
`[DONE]`). It does no model work, so what a target adds is the target's own work. This is the one place a stand-in
for vLLM is right: the point is to isolate the proxy (a real engine's time would drown it).

Targets, each a separate process on loopback:
- `direct` and `direct-2`: the load generator straight to the upstream (the second shows the machine's noise);
- `vllm-router`: the Rust router users would pick (`pip install vllm-router` in a virtualenv of its own), round robin;
- `gateway`: `loragate serve` in external mode, local mode (no API keys), base-model requests;
- `gateway (adapter)`: the same gateway, requests for a registered adapter (resolution and placement included);
- `gateway xN`: `loragate serve --workers N` for each N of `--workers` above 1;
- `--baseline DIR`: the gateway of another checkout, run from that folder (before/after in one run:
  `git worktree add /tmp/lg-main main`, then `--baseline /tmp/lg-main --baseline-name "gateway (main)"`).
Load comes from `wrk` (C, one thread: its own cost stays off the targets' books): closed loop at concurrency 1 (added
latency) and `--concurrency` (throughput and CPU), plain and streamed. CPU per request is the target's process tree
CPU time (user + system, from /proc) over the requests it answered while loaded. Every round runs the targets in a
shuffled order; the table shows medians over rounds. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE = "bench-base"
WRK = os.environ.get("WRK", "wrk")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the instant upstream -------------------------------------------------------------------------------------------


class InstantUpstream(asyncio.Protocol):
    """HTTP/1.1 keep-alive server answering vLLM's routes without any model work."""

    loaded: set[str] = set()
    chunks = 32
    gap_s = 0.001

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.queue: asyncio.Queue[tuple[bytes, bytes, bytes] | None] = asyncio.Queue()
        self.worker = asyncio.get_running_loop().create_task(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) != -1:
            head = self.buffer[:end]
            length = 0
            match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if match:
                length = int(match.group(1))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
            self.queue.put_nowait((method, path.split(b"?", 1)[0], body))

    async def serve(self) -> None:
        while (request := await self.queue.get()) is not None:
            method, path, body = request
            if path.endswith(b"/completions") and method == b"POST":
                if re.search(rb'"stream"\s*:\s*true', body):
                    await self.stream(body)
                else:
                    self.reply(200, b"application/json", COMPLETION)
            elif path == b"/health":
                self.reply(200, b"application/json", b"")
            elif path == b"/metrics":
                self.reply(200, b"text/plain; version=0.0.4", METRICS)
            elif path == b"/v1/models":
                self.reply(200, b"application/json", models_body(self.loaded))
            elif path == b"/v1/load_lora_adapter":
                self.loaded.add(json.loads(body)["lora_name"])
                self.reply(200, b"text/plain", b"Success")
            elif path == b"/v1/unload_lora_adapter":
                self.loaded.discard(json.loads(body)["lora_name"])
                self.reply(200, b"text/plain", b"Success")
            else:
                self.reply(404, b"application/json", b'{"error":{"message":"not found","type":"NotFound"}}')

    def reply(self, status: int, content_type: bytes, body: bytes) -> None:
        reason = b"OK" if status == 200 else b"Not Found"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason, content_type, len(body), body)
        )

    async def stream(self, body: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for _ in range(self.chunks):
            self.transport.write(CHUNK)
            await asyncio.sleep(self.gap_s)
        if re.search(rb'"include_usage"\s*:\s*true', body):
            self.transport.write(USAGE_CHUNK)
        self.transport.write(DONE_CHUNK + b"0\r\n\r\n")


def _sse(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": BASE,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " * 32}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 32, "total_tokens": 52},
    }
).encode()
CHUNK = _sse(
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": BASE,
            "choices": [{"index": 0, "delta": {"content": "ok "}, "logprobs": None, "finish_reason": None}],
        }
    ).encode()
    + b"\n\n"
)
USAGE_CHUNK = _sse(
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": BASE,
            "choices": [],
            "usage": {"prompt_tokens": 20, "completion_tokens": 32, "total_tokens": 52},
        }
    ).encode()
    + b"\n\n"
)
DONE_CHUNK = _sse(b"data: [DONE]\n\n")
METRICS = (
    b'vllm:num_requests_running{model_name="bench-base"} 0.0\nvllm:num_requests_waiting{model_name="bench-base"} 0.0\n'
)


def models_body(loaded: set[str]) -> bytes:
    cards = [{"id": BASE, "object": "model", "root": BASE, "parent": None}]
    cards += [{"id": name, "object": "model", "root": f"/{name}", "parent": BASE} for name in sorted(loaded)]
    return json.dumps({"object": "list", "data": cards}).encode()


def serve_upstream(port: int, chunks: int, gap_ms: float) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    InstantUpstream.chunks = chunks
    InstantUpstream.gap_s = gap_ms / 1000

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(InstantUpstream, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- processes ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and every live descendant (threads included)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total = 0.0
    todo = [pid]
    while todo:
        current = todo.pop()
        fields = stats.get(current)
        if fields is not None:
            total += sum(int(value) for value in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
        todo.extend(children.get(current, []))
    return total


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"{process.args!r} exited with {process.returncode}; see {log}:\n{log.read_text()[-2000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {timeout_s:.0f}s; see {log}")


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # None: nothing of ours to charge (the upstream itself)
    model: str = BASE


@dataclass
class Bench:
    work: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.work / f"{name}.log"
        process = subprocess.Popen(
            argv,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=cwd,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def make_registry(work: Path) -> tuple[Path, str | None]:
    """A registry with the tiny base (under the upstream's served name) and one random adapter bound to it."""
    from adapters_registry.registry import open_registry
    from training.tiny_model import build_random_adapter, cached_tiny_model

    model = cached_tiny_model()
    registry = open_registry(str(work / "registry"))
    registry.add_base(model, BASE)
    registry.push(build_random_adapter(model, work / "adapter", seed=1), "bench-adapter", BASE)
    return work / "registry", "bench-adapter"


def gateway_argv(upstream: str, registry: Path, port: int, workers: int) -> list[str]:
    argv = [sys.executable, "-m", "gateway", "--engine-url", upstream, "--base-name", BASE]
    argv += ["--registry", str(registry), "--port", str(port), "--max-loras", "4"]
    return argv + (["--workers", str(workers)] if workers > 1 else [])


# -- load -----------------------------------------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d %d\\n", summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), summary.duration, latency.mean))
end
"""


@dataclass(frozen=True)
class Run:
    requests: int
    failed: int
    p50_ms: float
    p99_ms: float
    rps: float
    cpu_ms: float | None  # per answered request


def body_for(model: str, stream: bool) -> str:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something about the data plane of a gateway."}],
        "max_tokens": 32,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body)


def run_wrk(target: Target, stream: bool, concurrency: int, duration_s: float, script: Path, threads: int = 1) -> Run:
    cpu_before = tree_cpu_s(target.pid) if target.pid else 0.0
    out = subprocess.run(
        [
            WRK,
            f"-t{min(threads, concurrency)}",
            f"-c{concurrency}",
            f"-d{max(int(duration_s), 1)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"{target.url}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_BODY": body_for(target.model, stream)},
        check=True,
    ).stdout
    cpu = tree_cpu_s(target.pid) - cpu_before if target.pid else None
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    requests, status_errors, socket_errors, p50_us, p99_us, duration_us, _ = (int(v) for v in line.split()[1:])
    answered = max(requests - status_errors - socket_errors, 1)
    return Run(
        requests=requests,
        failed=status_errors + socket_errors,
        p50_ms=p50_us / 1000,
        p99_ms=p99_us / 1000,
        rps=answered / (duration_us / 1e6),
        cpu_ms=None if cpu is None else cpu / answered * 1000,
    )


# -- the run --------------------------------------------------------------------------------------------------------


def find_router(given: str | None) -> str | None:
    for candidate in (given, shutil.which("vllm-router"), "/tmp/vr/bin/vllm-router"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextlib.contextmanager
def stack(args: argparse.Namespace) -> Iterator[list[Target]]:
    work = Path(tempfile.mkdtemp(prefix="bench-dataplane-"))
    bench = Bench(work)
    try:
        up_port = free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        script_args = ["--serve-upstream", str(up_port), "--chunks", str(args.chunks), "--chunk-gap-ms"]
        up = bench.start("upstream", [sys.executable, __file__, *script_args, str(args.chunk_gap_ms)])
        wait_http(f"{upstream}/health", up, work / "upstream.log")
        targets = [Target("direct", upstream, None), Target("direct-2", upstream, None)]
        router = find_router(args.router)
        if router:
            port = free_port()
            argv = [router, "--worker-urls", upstream, "--policy", "round_robin", "--port", str(port)]
            process = bench.start("vllm-router", [*argv, "--log-level", "warning"])
            wait_http(f"http://127.0.0.1:{port}/health", process, work / "vllm-router.log")
            targets.append(Target("vllm-router", f"http://127.0.0.1:{port}", process.pid))
        else:
            print("vllm-router not found (--router PATH, or pip install vllm-router): row left out", file=sys.stderr)
        registry, adapter = make_registry(work) if args.adapter_row else (work / "registry", None)
        env = {"LORAGATE_HEALTH_INTERVAL_S": "2", "HF_HUB_OFFLINE": "1"}
        for workers in sorted({1, *args.workers}):
            port = free_port()
            name = "gateway" if workers == 1 else f"gateway x{workers}"
            process = bench.start(name.replace(" ", "-"), gateway_argv(upstream, registry, port, workers), env)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz", process, work / f"{name.replace(' ', '-')}.log")
            targets.append(Target(name, url, process.pid))
            if workers == 1 and adapter is not None:
                targets.append(Target("gateway (adapter)", url, process.pid, model=adapter))
        if args.baseline:  # another checkout's gateway (e.g. a `git worktree` of main), run from its own folder
            port = free_port()
            argv = gateway_argv(upstream, registry, port, 1)
            process = bench.start("baseline", argv, {**env, "PYTHONPATH": args.baseline}, cwd=args.baseline)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz", process, work / "baseline.log")
            targets.append(Target(args.baseline_name, url, process.pid))
        yield targets
    finally:
        bench.stop()
        print(f"logs in {work}", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    if shutil.which(WRK) is None:
        raise SystemExit(f"wrk is needed for the load (apt-get install wrk, or $WRK): {WRK} not found")
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_SCRIPT)
    cases = [(mode == "stream", conc) for mode in args.modes.split(",") for conc in args.levels]
    results: dict[str, dict[str, list[Run]]] = {}
    with stack(args) as targets:
        for target in targets:  # warm-up: connections, adapter loads, caches
            run_wrk(target, False, 4, 1, script)
            run_wrk(target, True, 4, 1, script)
        rng = random.Random(args.seed)
        for round_ in range(args.rounds):
            order = list(targets)
            rng.shuffle(order)
            for target in order:
                for stream, conc in cases:
                    key = f"{'stream' if stream else 'plain'}-c{conc}"
                    run = run_wrk(target, stream, conc, args.duration, script, args.wrk_threads)
                    results.setdefault(target.name, {}).setdefault(key, []).append(run)
            print(f"round {round_ + 1}/{args.rounds}: {', '.join(t.name for t in order)}", file=sys.stderr)
    report = summarize(results, args)
    print_table(report, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def summarize(results: dict[str, dict[str, list[Run]]], args: argparse.Namespace) -> dict[str, Any]:
    def med(runs: list[Run], attr: str) -> float | None:
        values = [getattr(run, attr) for run in runs if getattr(run, attr) is not None]
        return statistics.median(values) if values else None

    rows = {}
    for name, cases in results.items():
        row: dict[str, Any] = {}
        for key, runs in cases.items():
            row[key] = {attr: med(runs, attr) for attr in ("p50_ms", "p99_ms", "rps", "cpu_ms")}
            row[key]["failed"] = sum(run.failed for run in runs)
            row[key]["requests"] = sum(run.requests for run in runs)
        rows[name] = row
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("serve_upstream",)},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "targets": rows,
    }


def print_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    rows = report["targets"]
    if set(args.modes.split(",")) != {"plain", "stream"} or args.levels != [1, args.concurrency]:
        for name, row in rows.items():  # not the full grid: one line per cell
            for key, cell in row.items():
                print(
                    f"{name:<18} {key:<14} rps {cell['rps']:>9.0f}  p50 {cell['p50_ms']:>8.3f} ms  "
                    f"p99 {cell['p99_ms']:>8.3f} ms  CPU/request {_ms(cell['cpu_ms'])} ms  failed {cell['failed']}"
                )
        return
    c = args.concurrency
    print(
        f"chat completions, {args.chunks}-chunk streams ({args.chunk_gap_ms} ms apart), wrk closed loop "
        f"{args.duration:g} s per cell, {args.rounds} shuffled rounds (medians); CPU = the target's process tree"
    )
    header = (
        f"{'target':<18} {'CPU/plain ms':>12} {'CPU/stream ms':>13} {'plain p50 c1':>12} {'added':>7} "
        f"{'stream p50 c1':>13} {'added':>7} {f'plain rps c{c}':>14} {f'stream rps c{c}':>15} {'failed':>6}"
    )
    print(header)
    direct = rows["direct"]
    router = rows.get("vllm-router")
    for name, row in rows.items():
        plain, stream = row[f"plain-c{c}"], row[f"stream-c{c}"]
        p1, s1 = row["plain-c1"], row["stream-c1"]
        failed = sum(cell["failed"] for cell in row.values())
        print(
            f"{name:<18} {_ms(plain['cpu_ms']):>12} {_ms(stream['cpu_ms']):>13} {p1['p50_ms']:>12.3f} "
            f"{p1['p50_ms'] - direct['plain-c1']['p50_ms']:>+7.3f} {s1['p50_ms']:>13.3f} "
            f"{s1['p50_ms'] - direct['stream-c1']['p50_ms']:>+7.3f} {plain['rps']:>14.0f} {stream['rps']:>15.0f} "
            f"{failed:>6}"
        )
    if router:
        print("CPU per request vs vllm-router:")
        for name, row in rows.items():
            if name.startswith("gateway") or name == args.baseline_name:
                ratios = [
                    row[f"{mode}-c{c}"]["cpu_ms"] / router[f"{mode}-c{c}"]["cpu_ms"] for mode in ("plain", "stream")
                ]
                print(f"  {name:<18} plain {ratios[0]:.1f}x, stream {ratios[1]:.1f}x")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per cell")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=32, help="content events per streamed answer")
    parser.add_argument("--chunk-gap-ms", type=float, default=1.0, help="pause between streamed events")
    parser.add_argument("--router", help="vllm-router binary (default: on PATH, or /tmp/vr/bin/vllm-router)")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[],
        help="also measure `loragate serve --workers N` for each N (comma-separated)",
    )
    parser.add_argument("--baseline", help="also run the gateway of this checkout (a folder), e.g. a worktree of main")
    parser.add_argument("--baseline-name", default="gateway (baseline)")
    parser.add_argument("--modes", default="plain,stream", help="plain, stream or both")
    parser.add_argument(
        "--levels",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=None,
        help="concurrency levels (default: 1 and --concurrency)",
    )
    parser.add_argument("--no-adapter-row", dest="adapter_row", action="store_false", help="base-model rows only")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the medians here as JSON")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    parsed = make_parser().parse_args()
    if parsed.serve_upstream:
        serve_upstream(parsed.serve_upstream, parsed.chunks, parsed.chunk_gap_ms)
        raise SystemExit(0)
    parsed.levels = parsed.levels or [1, parsed.concurrency]
    raise SystemExit(main(parsed))
