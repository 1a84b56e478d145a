"""Gateway overhead: the same request set sent directly to one vLLM engine and through the gateway.

    .venv/bin/python benchmarks/bench_gateway.py [--rounds 3] [--requests 64] [--concurrency 16] [--stream]
    python benchmarks/bench_gateway.py --engine-url URL --gateway-url URL --base NAME --adapters a,b,c \
        --assignment round-robin --requests 512 --concurrency 128 --max-tokens 128 --prompt-words 150 [--stream]

By default the script builds its own stack: the tiny model and 4 random adapters in a temporary registry, one vLLM
CPU engine, and `loragate serve` in external mode in front of it. With `--engine-url` it measures a stack that is
already running instead (`benchmarks/gpu/` runs it on a GPU): a vLLM engine, and a gateway in external mode over it
whose registry holds `--adapters` bound to the base `--base`. Either way one engine serves both paths, so the
difference is the gateway alone; the gateway loads every adapter first and the direct path uses the same loaded
adapters under their engine names.

Every round runs the targets in a shuffled order; "direct-2" repeats the direct target so the table shows the
machine's own noise. Prints throughput, p50/p99 latency and the time to the first byte per target (median over
rounds) and the ratios to "direct". `--stream` streams the answers (the first byte is then the first token). Not a
test: nothing is asserted.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ADAPTERS = 4
# Filler for --prompt-words: common words, so that a word is one or two tokens.
WORDS = ("the", "of", "and", "to", "in", "is", "for", "on", "that", "with", "data", "model", "server", "token")


@dataclass(frozen=True)
class Stack:
    """What the benchmark talks to: one engine, a gateway in front of it, and the models both serve."""

    engine_url: str
    gateway_url: str
    base: str
    adapters: list[str]
    label: str


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true", help="stream the answers (adds time to first byte)")
    parser.add_argument("--prompt-words", type=int, default=0, help="filler words added to every prompt")
    parser.add_argument(
        "--assignment",
        choices=("random", "round-robin"),
        default="random",
        help="how requests are spread over the base and the adapters",
    )
    parser.add_argument("--warmup", type=int, default=8, help="requests sent to each path before the rounds")
    running = parser.add_argument_group("an already running stack (all four, or none)")
    running.add_argument("--engine-url", help="vLLM engine URL (the direct path)")
    running.add_argument("--gateway-url", help="URL of a gateway in external mode over that engine")
    running.add_argument("--base", help="served name of the base model")
    running.add_argument("--adapters", help="comma-separated adapter names in the gateway's registry")
    running.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="another gateway over the same engine and registry, measured beside the first (e.g. --workers 4)",
    )
    parser.add_argument("--json", help="write the medians (and every round) here")
    return parser


async def run_set(
    url: str, bodies: list[dict[str, object]], concurrency: int
) -> tuple[float, list[float], list[float], int, int]:
    """(wall seconds, latencies, times to first byte, completion tokens, failed requests) for the whole set."""
    latencies: list[float] = []
    first_bytes: list[float] = []
    tokens = failed = 0
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(body: dict[str, object]) -> None:
            nonlocal tokens, failed
            async with gate:
                started = time.perf_counter()
                first_byte = 0.0
                try:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        response.raise_for_status()
                        content = b""
                        async for chunk in response.aiter_raw():
                            if not content:
                                first_byte = time.perf_counter() - started
                            content += chunk
                except httpx.HTTPError as exc:  # counted and shown in the table; the set goes on
                    print(f"request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    failed += 1
                    return
                first_bytes.append(first_byte)
                latencies.append(time.perf_counter() - started)
                if body.get("stream"):
                    usage_line = [line for line in content.split(b"\n") if b'"usage":{' in line][-1]
                    tokens += json.loads(usage_line[6:])["usage"]["completion_tokens"]
                else:
                    tokens += json.loads(content)["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
        return time.perf_counter() - started, latencies, first_bytes, tokens, failed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gateway did not become ready; see {log}")
        time.sleep(0.5)


@contextmanager
def cpu_stack() -> Iterator[Stack]:
    """The tiny model, 4 random adapters, one vLLM CPU engine and a gateway over it, all torn down at exit."""
    # Imported here: a running stack needs nothing but httpx (the GPU machine has no training stack).
    from adapters_registry.registry import open_registry
    from gateway.engine_process import EngineProcess, EngineSpec, free_port
    from training.tiny_model import build_random_adapter, cached_tiny_model

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
        wait_ready(gateway_url, gateway, work / "gateway.log", timeout_s=120)
        yield Stack(spec.url, gateway_url, "tiny", names, "one vLLM CPU engine")
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=60)
        engine.stop()


@contextmanager
def running_stack(args: argparse.Namespace) -> Iterator[Stack]:
    yield Stack(
        args.engine_url.rstrip("/"),
        args.gateway_url.rstrip("/"),
        args.base,
        [name for name in args.adapters.split(",") if name],
        f"engine {args.engine_url}",
    )


Row = tuple[float, float, float, float, float]  # tok/s, p50, p99, TTFB p50, TTFB p99


def measure(stack: Stack, args: argparse.Namespace) -> tuple[dict[str, list[Row]], dict[str, int]]:
    # Warm up: the gateway loads every adapter (under its engine name), which the direct path then uses too.
    engine_names = {}
    for name in stack.adapters:
        warm = httpx.post(f"{stack.gateway_url}/admin/adapters/load", json={"model": name}, timeout=120)
        warm.raise_for_status()
        engine_names[name] = warm.json()["engine_name"]

    rng = random.Random(args.seed)
    choices = [*stack.adapters, stack.base]
    if args.assignment == "round-robin":
        models = [choices[i % len(choices)] for i in range(args.requests)]
    else:
        models = [rng.choice(choices) for _ in range(args.requests)]
    prompts = [" ".join([f"Hi {i}", *rng.choices(WORDS, k=args.prompt_words)]) for i in range(args.requests)]

    stream = {"stream": True, "stream_options": {"include_usage": True}} if args.stream else {}

    def bodies(direct: bool) -> list[dict[str, object]]:
        return [
            {
                "model": engine_names.get(m, m) if direct else m,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                **stream,
            }
            for m, prompt in zip(models, prompts, strict=True)
        ]

    targets = {
        "direct": (stack.engine_url, bodies(True)),
        "direct-2": (stack.engine_url, bodies(True)),
        "gateway": (stack.gateway_url, bodies(False)),
    }
    for extra in args.target:
        name, _, url = extra.partition("=")
        targets[name] = (url.rstrip("/"), bodies(False))
        asyncio.run(run_set(url.rstrip("/"), bodies(False)[: args.warmup], args.concurrency))
    asyncio.run(run_set(stack.gateway_url, bodies(False)[: args.warmup], args.concurrency))
    asyncio.run(run_set(stack.engine_url, bodies(True)[: args.warmup], args.concurrency))
    results: dict[str, list[Row]] = {name: [] for name in targets}
    failures = dict.fromkeys(targets, 0)
    for round_ in range(args.rounds):
        order = list(targets)
        rng.shuffle(order)
        for name in order:
            url, set_ = targets[name]
            wall, latencies, first, tokens, failed = asyncio.run(run_set(url, set_, args.concurrency))
            failures[name] += failed
            results[name].append(
                (
                    tokens / wall,
                    percentile(latencies, 0.5),
                    percentile(latencies, 0.99),
                    percentile(first, 0.5),
                    percentile(first, 0.99),
                )
            )
        print(f"round {round_ + 1}/{args.rounds}: order {', '.join(order)}", file=sys.stderr)
    return results, failures


def print_table(
    results: dict[str, list[Row]], failures: dict[str, int], stack: Stack, args: argparse.Namespace
) -> None:
    kind = "streamed chat" if args.stream else "chat"
    prompt = f", prompts + {args.prompt_words} words" if args.prompt_words else ""
    print(
        f"{args.requests} {kind} requests x {args.rounds} rounds, concurrency {args.concurrency}, "
        f"{args.max_tokens} tokens each{prompt}, {len(stack.adapters)} adapters + base ({args.assignment}), "
        f"{stack.label} (medians over rounds)"
    )
    width = max(10, *(len(name) for name in results))
    print(
        f"{'target':<{width}} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} {'TTFB p50':>9} {'TTFB p99':>9} "
        f"{'tok/s vs direct':>16} {'p50 vs direct':>14} {'p99 vs direct':>14} {'TTFB vs direct':>15} {'failed':>6}"
    )
    medians = {name: [statistics.median(col) for col in zip(*rows, strict=True)] for name, rows in results.items()}
    base_tps, base_p50, base_p99, base_ttfb = medians["direct"][:4]
    for name, (tps, p50, p99, ttfb, ttfb99) in medians.items():
        print(
            f"{name:<{width}} {tps:>9.1f} {p50:>8.3f} {p99:>8.3f} {ttfb:>9.3f} {ttfb99:>9.3f} {tps / base_tps:>16.3f} "
            f"{p50 / base_p50:>14.3f} {p99 / base_p99:>14.3f} {ttfb / base_ttfb:>15.3f} {failures[name]:>6}"
        )


def main(args: argparse.Namespace) -> int:
    external = [args.engine_url, args.gateway_url, args.base, args.adapters]
    if any(external) and not all(external):
        raise SystemExit("--engine-url, --gateway-url, --base and --adapters go together")
    with running_stack(args) if args.engine_url else cpu_stack() as stack:
        results, failures = measure(stack, args)
    print_table(results, failures, stack, args)
    if args.json:
        columns = ("tok_s", "p50_s", "p99_s", "ttfb_p50_s", "ttfb_p99_s")
        report = {
            name: {
                "median": dict(zip(columns, (statistics.median(col) for col in zip(*rows, strict=True)), strict=True)),
                "rounds": [dict(zip(columns, row, strict=True)) for row in rows],
                "failed": failures[name],
            }
            for name, rows in results.items()
        }
        config = {k: v for k, v in vars(args).items() if k != "target"}
        Path(args.json).write_text(json.dumps({"config": config, "targets": report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(make_parser().parse_args()))
