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
machine's own noise. `--jitter-ms J` adds "direct-jitter": the direct target with each request sent after a random
0-J ms pause (its latency counted from the send), which only desynchronizes the closed loop's clients, to tell the
cost of a proxy from the effect of arrivals spread over a few milliseconds on the engine's batching; `--jitter-all`
pauses every target's sends so, none in lockstep. A second table
reads the engine's own histograms around every set (vLLM's /metrics): the mean end-to-end time the engine counted
per request, and the client's mean latency minus it, the time spent outside the engine (HTTP, the proxy). Prints
throughput, p50/p99 latency and the time to the first byte per target (median over rounds) and the ratios to
"direct". `--stream` streams the answers (the first byte is then the first token). Not a test: nothing is asserted.
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
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="add direct-jitter: sends paused 0-J ms")
    parser.add_argument(
        "--jitter-all", action="store_true", help="pause every target's sends 0-J ms (no direct-jitter row)"
    )
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
    url: str, bodies: list[dict[str, object]], concurrency: int, jitter_s: float = 0.0, seed: int = 0
) -> tuple[float, list[float], list[float], int, int]:
    """(wall seconds, latencies, times to first byte, completion tokens, failed requests) for the whole set; with
    `jitter_s` each request is sent after a random pause of up to that long (not counted in its latency)."""
    pauses = random.Random(seed)
    latencies: list[float] = []
    first_bytes: list[float] = []
    tokens = failed = 0
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(body: dict[str, object]) -> None:
            nonlocal tokens, failed
            async with gate:
                if jitter_s:
                    await asyncio.sleep(pauses.uniform(0, jitter_s))
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


ENGINE_HISTOGRAMS = ("vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds")


def engine_sums(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the engine's request histograms, over all their label sets; empty when unreadable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name in ENGINE_HISTOGRAMS:
                if sample.name in (f"{name}_sum", f"{name}_count"):
                    total, count = out.get(name, (0.0, 0.0))
                    if sample.name.endswith("_sum"):
                        total += sample.value
                    else:
                        count += sample.value
                    out[name] = (total, count)
    return out


def engine_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean seconds per request of each histogram between two readings."""
    means = {}
    for name, (total, count) in after.items():
        old_total, old_count = before.get(name, (0.0, 0.0))
        if count > old_count:
            means[name] = (total - old_total) / (count - old_count)
    return means


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
Inside = tuple[float, float, float]  # client mean latency, engine e2e mean, engine queue mean


def measure(
    stack: Stack, args: argparse.Namespace
) -> tuple[dict[str, list[Row]], dict[str, int], dict[str, list[Inside]]]:
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
    jitter = {name: args.jitter_ms / 1000 if args.jitter_all else 0.0 for name in targets}
    if args.jitter_ms and not args.jitter_all:
        targets["direct-jitter"] = (stack.engine_url, bodies(True))
        jitter["direct-jitter"] = args.jitter_ms / 1000
    for extra in args.target:
        name, _, url = extra.partition("=")
        targets[name] = (url.rstrip("/"), bodies(False))
        jitter[name] = args.jitter_ms / 1000 if args.jitter_all else 0.0
        asyncio.run(run_set(url.rstrip("/"), bodies(False)[: args.warmup], args.concurrency))
    asyncio.run(run_set(stack.gateway_url, bodies(False)[: args.warmup], args.concurrency))
    asyncio.run(run_set(stack.engine_url, bodies(True)[: args.warmup], args.concurrency))
    results: dict[str, list[Row]] = {name: [] for name in targets}
    inside: dict[str, list[Inside]] = {name: [] for name in targets}
    failures = dict.fromkeys(targets, 0)
    for round_ in range(args.rounds):
        order = list(targets)
        rng.shuffle(order)
        for name in order:
            url, set_ = targets[name]
            before = engine_sums(stack.engine_url)
            wall, latencies, first, tokens, failed = asyncio.run(
                run_set(url, set_, args.concurrency, jitter[name], seed=round_)
            )
            means = engine_means(before, engine_sums(stack.engine_url))
            if latencies and ENGINE_HISTOGRAMS[0] in means:
                queue = means.get(ENGINE_HISTOGRAMS[1], float("nan"))
                inside[name].append((statistics.fmean(latencies), means[ENGINE_HISTOGRAMS[0]], queue))
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
    return results, failures, inside


def print_inside(inside: dict[str, list[Inside]]) -> None:
    """Where each target's time went (medians over rounds): the client's mean latency, the engine's own mean
    end-to-end time (its queue included) and the rest, outside the engine; each against direct."""
    if not all(inside.values()):
        return
    medians = {name: [statistics.median(col) for col in zip(*rows, strict=True)] for name, rows in inside.items()}
    width = max(10, *(len(name) for name in medians))
    print(
        f"{'target':<{width}} {'client mean ms':>14} {'engine e2e ms':>13} {'engine queue ms':>15} "
        f"{'outside ms':>10} {'client vs direct':>16} {'engine vs direct':>16} {'outside vs direct':>17}"
    )
    client0, engine0, _ = medians["direct"]
    for name, (client, engine, queue) in medians.items():
        print(
            f"{name:<{width}} {client * 1e3:>14.1f} {engine * 1e3:>13.1f} {queue * 1e3:>15.2f} "
            f"{(client - engine) * 1e3:>10.2f} {(client - client0) * 1e3:>+16.2f} {(engine - engine0) * 1e3:>+16.2f} "
            f"{((client - engine) - (client0 - engine0)) * 1e3:>+17.2f}"
        )


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
        results, failures, inside = measure(stack, args)
    print_table(results, failures, stack, args)
    print_inside(inside)
    if args.json:
        columns = ("tok_s", "p50_s", "p99_s", "ttfb_p50_s", "ttfb_p99_s")
        report = {
            name: {
                "median": dict(zip(columns, (statistics.median(col) for col in zip(*rows, strict=True)), strict=True)),
                "rounds": [dict(zip(columns, row, strict=True)) for row in rows],
                "inside": [
                    dict(zip(("client_mean_s", "engine_e2e_s", "engine_queue_s"), r, strict=True)) for r in inside[name]
                ],
                "failed": failures[name],
            }
            for name, rows in results.items()
        }
        config = {k: v for k, v in vars(args).items() if k != "target"}
        Path(args.json).write_text(json.dumps({"config": config, "targets": report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(make_parser().parse_args()))
