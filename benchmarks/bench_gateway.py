"""Gateway overhead: the same request set sent directly to one vLLM (CPU) engine and through the gateway.

    .venv/bin/python benchmarks/bench_gateway.py [--rounds 3] [--requests 64] [--concurrency 16] [--stream]

One engine serves both paths (the gateway runs as a separate `loragate serve` process in external mode in front of
it), so the difference is the gateway alone. Every round runs the targets in a shuffled order; "direct-2" repeats
the direct target so the table shows the machine's own noise. Prints throughput, p50/p99 latency and the time to
the first byte per target (median over rounds) and the ratios to "direct". `--stream` streams the answers (the
first byte is then the first token). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from adapters_registry.registry import open_registry
from gateway.engine_process import EngineProcess, EngineSpec, free_port
from loragate.tiny_model import build_random_adapter, cached_tiny_model

ADAPTERS = 4


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true", help="stream the answers (adds time to first byte)")
    return parser


async def run_set(
    url: str, bodies: list[dict[str, object]], concurrency: int
) -> tuple[float, list[float], list[float], int]:
    """(wall seconds, per-request latencies, times to first byte, completion tokens) for the whole set."""
    latencies: list[float] = []
    first_bytes: list[float] = []
    tokens = 0
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(body: dict[str, object]) -> None:
            nonlocal tokens
            async with gate:
                started = time.perf_counter()
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    content = b""
                    async for chunk in response.aiter_raw():
                        if not content:
                            first_bytes.append(time.perf_counter() - started)
                        content += chunk
                latencies.append(time.perf_counter() - started)
                if body.get("stream"):
                    usage_line = [line for line in content.split(b"\n") if b'"usage":{' in line][-1]
                    tokens += json.loads(usage_line[6:])["usage"]["completion_tokens"]
                else:
                    tokens += json.loads(content)["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
        return time.perf_counter() - started, latencies, first_bytes, tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    model = cached_tiny_model()
    registry = open_registry(work / "registry")
    registry.add_base(model, "tiny")
    names = []
    for i in range(ADAPTERS):
        registry.push(build_random_adapter(model, work / f"a{i}", seed=i + 1), f"bench-{i}", "tiny")
        names.append(f"bench-{i}")

    spec = EngineSpec(model=str(model), served_model_name="tiny", port=free_port(), max_loras=ADAPTERS)
    engine = EngineProcess(spec, work / "engine.log")
    gateway_port = free_port()
    gateway: subprocess.Popen[bytes] | None = None
    try:
        engine.start()
        engine.wait_ready(timeout_s=400)
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from loragate.cli import main; raise SystemExit(main())",
                "serve",
                "--engine-url",
                spec.url,
                "--base-name",
                "tiny",
                "--registry",
                str(work / "registry"),
                "--port",
                str(gateway_port),
                "--max-loras",
                str(ADAPTERS),
            ],
            stdout=(work / "gateway.log").open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "LORAGATE_HEALTH_INTERVAL_S": "2"},
        )
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{gateway_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if gateway.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gateway did not become ready; see {work / 'gateway.log'}")
            time.sleep(0.5)

        # Warm up: the gateway loads every adapter (under its engine name), which the direct path then uses too.
        engine_names = {}
        for name in names:
            warm = httpx.post(f"{gateway_url}/admin/adapters/load", json={"model": name}, timeout=120)
            warm.raise_for_status()
            engine_names[name] = warm.json()["engine_name"]

        rng = random.Random(args.seed)
        models = [rng.choice([*names, "tiny"]) for _ in range(args.requests)]

        stream = {"stream": True, "stream_options": {"include_usage": True}} if args.stream else {}

        def bodies(direct: bool) -> list[dict[str, object]]:
            return [
                {
                    "model": engine_names.get(m, m) if direct else m,
                    "messages": [{"role": "user", "content": f"Hi {i}"}],
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    **stream,
                }
                for i, m in enumerate(models)
            ]

        targets = {
            "direct": (spec.url, bodies(True)),
            "direct-2": (spec.url, bodies(True)),
            "gateway": (gateway_url, bodies(False)),
        }
        asyncio.run(run_set(gateway_url, bodies(False)[:8], args.concurrency))
        asyncio.run(run_set(spec.url, bodies(True)[:8], args.concurrency))
        results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in targets}
        for round_ in range(args.rounds):
            order = list(targets)
            rng.shuffle(order)
            for name in order:
                url, set_ = targets[name]
                wall, latencies, first, tokens = asyncio.run(run_set(url, set_, args.concurrency))
                results[name].append(
                    (tokens / wall, percentile(latencies, 0.5), percentile(latencies, 0.99), percentile(first, 0.5))
                )
            print(f"round {round_ + 1}/{args.rounds}: order {', '.join(order)}", file=sys.stderr)
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=60)
        engine.stop()

    kind = "streamed chat" if args.stream else "chat"
    print(
        f"{args.requests} {kind} requests x {args.rounds} rounds, concurrency {args.concurrency}, "
        f"{args.max_tokens} tokens each, {ADAPTERS} adapters + base, one vLLM CPU engine (medians over rounds)"
    )
    print(
        f"{'target':<10} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} {'TTFB p50':>9} {'tok/s vs direct':>16} "
        f"{'p50 vs direct':>14}"
    )
    medians = {name: [statistics.median(col) for col in zip(*rows, strict=True)] for name, rows in results.items()}
    base_tps, base_p50 = medians["direct"][0], medians["direct"][1]
    for name, (tps, p50, p99, ttfb) in medians.items():
        print(
            f"{name:<10} {tps:>9.1f} {p50:>8.3f} {p99:>8.3f} {ttfb:>9.3f} {tps / base_tps:>16.3f} "
            f"{p50 / base_p50:>14.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(make_parser().parse_args()))
