"""Placement on real engines: round-robin over vLLM engines against the gateway's placements, same workload.

    .venv/bin/python benchmarks/bench_placement.py [--engines 3] [--adapters 32] [--max-loras 2] [--max-cpu-loras 4]
        [--requests 300] [--concurrency 32] [--zipf 1.1] [--rounds 2] [--json FILE] [--plot FILE]
    # engines already running (a GPU; benchmarks/gpu/placement.sh), their adapters in a registry and a folder:
    python3 benchmarks/bench_placement.py --engine-url URL [--engine-url URL ...] --base NAME --registry DIR
        --resolver DIR [--engine-log FILE ...] [--load-timing 4] [--duration-s 60] ...

vLLM CPU engines serve the tiny model (built locally) with few GPU slots (`--max-loras`) and a small CPU cache
(`--max-cpu-loras`); `--adapters` random rank-8 adapters are in a registry and, for round-robin, in a folder
vLLM's `lora_filesystem_resolver` loads from. Targets, each sent the same seeded sequence by `loragate bench`
(Zipf popularity plus a base-model share, closed loop), in an order shuffled per round:
- `round-robin`: the engine URLs in turn, each engine loading what it is asked for by itself through the resolver
  (what a round-robin Service over vLLM pods with on-demand loading does);
- `gateway-v1`, `gateway-v2`: `loragate serve --engine-url ...` over the same engines with `routing.placement`
  v1 or v2; `gateway-v2-again` is v2 once more, the noise row; `gateway-v2-demand` is v2 with `routing.evict:
  demand`.
Before every run the engines are left to finish what they still run (a cut run's requests) and emptied of adapters
(vLLM's unload API), and a gateway target starts as a fresh process, so no run inherits another's residency or
backlog. Loads per run are counted from the engines' logs (see LOADED).
With `--prewarm`, every run starts warm: a gateway target runs with `--prewarm` over the adapters, most popular
first (each engine loads its rendezvous share into its CPU cache before the gateway is ready), and round-robin's
engines each load the `--max-cpu-loras` most popular ones (what a warm pool behind a Service would best hold, as
every engine there sees every adapter); those loads are not counted in the run's.
`--calibrate` first measures the simulator's costs on the same engines (benchmarks/sim_placement.py Costs);
`--load-timing K` first times K adapter loads on the first engine idle, with that engine busy, and with every engine
busy (base-model requests in a closed loop), since a load runs inside the engine's loop. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_loadgen import cpu_seconds  # noqa: E402 (this folder: the script's own)

from gateway.engine_process import EngineProcess, EngineSpec, free_port, with_cpu_binding  # noqa: E402
from loragate.bench.config import BenchConfig, Target  # noqa: E402
from loragate.bench.report import render_text, to_json  # noqa: E402
from loragate.bench.runner import run_bench  # noqa: E402
from loragate.bench.workload import Lengths, WorkloadSpec  # noqa: E402

BASE = "tiny"  # the locally built model's served name; --base for engines already running
# vLLM's log lines for a runtime-API load and for a resolver load; a reload into its own CPU cache (max_cpu_loras,
# LRU) of an adapter the API server already knows is not logged, so round-robin's count is a lower bound
LOADED = ("Loaded new LoRA adapter", "Resolved and loaded LoRA adapter")
# target -> the gateway's settings (environment) beside its defaults
V2 = {"LORAGATE_ROUTING__PLACEMENT": "v2"}
NO_CAP = {**V2, "LORAGATE_ROUTING__WORKING_SET_CAP": "false"}  # vLLM's scheduler alone keeps a batch to max_loras
GATEWAYS = {
    "gateway-v1": {"LORAGATE_ROUTING__PLACEMENT": "v1"},
    "gateway-v2": V2,
    "gateway-v2-again": V2,
    "gateway-v2-demand": {**V2, "LORAGATE_ROUTING__EVICT": "demand"},
    # every engine allowed to load at once (the default lets half of them)
    "gateway-v2-loads-all": {**V2, "LORAGATE_ROUTING__MAX_LOADING_FRACTION": "1"},
    "gateway-v2-nocap": NO_CAP,
    # this many adapters beyond max_loras may have calls in flight on an engine (queued in vLLM, ready)
    **{f"gateway-v2-slack{n}": {**V2, "LORAGATE_ROUTING__WORKING_SET_SLACK": str(n)} for n in (1, 2, 4)},
    "gateway-v2-registered": V2,
    "gateway-v2-registered-again": V2,
    "gateway-v2-registered-nocap": NO_CAP,
}
# targets whose gateway keeps more adapters registered per engine than vLLM's CPU cache holds (`--max-cpu-loras`
# times this, `--max-registered-loras`): vLLM's own LRU cache drops and reloads them inside its steps
GATEWAY_SLOTS = {name: 8 for name in GATEWAYS if "-registered" in name}


def build_adapters(work: Path, count: int) -> tuple[Path, Path, list[str]]:
    """The tiny model, `count` adapters pushed to a registry, and the same adapters in a resolver folder."""
    from adapters_registry.registry import open_registry
    from training.tiny_model import build_random_adapter, cached_tiny_model

    model = cached_tiny_model()
    registry = open_registry(work / "registry")
    registry.add_base(model, BASE)
    resolver = work / "resolver"
    names = [f"p{i:03d}" for i in range(count)]
    for i, name in enumerate(names):
        built = build_random_adapter(model, work / "built" / name, seed=i + 1)
        registry.push(built, name, BASE)
        shutil.copytree(built, resolver / name, dirs_exist_ok=True)
        config = json.loads((resolver / name / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(model)  # the resolver takes it only when it names --model exactly
        (resolver / name / "adapter_config.json").write_text(json.dumps(config))
    return model, resolver, names


@contextlib.contextmanager
def _urls(started: contextlib.AbstractContextManager[list[EngineProcess]]) -> Iterator[list[str]]:
    with started as running:
        yield [engine.url for engine in running]


@contextlib.contextmanager
def engines(model: Path, resolver: Path, work: Path, args: argparse.Namespace) -> Iterator[list[EngineProcess]]:
    env = {"VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(resolver)}
    started = []
    try:
        for i in range(args.engines):
            spec = EngineSpec(
                model=str(model),
                served_model_name=BASE,
                port=free_port(),
                max_loras=args.max_loras,
                max_cpu_loras=args.max_cpu_loras,
                max_lora_rank=8,
                extra_env=with_cpu_binding(env, i, args.engines),
            )
            engine = EngineProcess(spec, work / f"engine-{i}.log")
            engine.start()
            started.append(engine)
        for engine in started:
            engine.wait_ready(timeout_s=600)
        yield started
    finally:
        for engine in started:
            engine.stop()


def empty(engine_urls: Sequence[str], base: str = BASE) -> None:
    """Unload every adapter the engines hold (what the last run left there)."""
    for url in engine_urls:
        cards = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        for card in cards:
            if card["id"] != base:
                reply = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": card["id"]}, timeout=60)
                reply.raise_for_status()


def warm_round_robin(engine_urls: Sequence[str], names: Sequence[str], resolver: Path, slots: int) -> float:
    """Load the `slots` most popular adapters (`names` is in popularity order) into every engine, as round-robin's
    engines would hold them once warm; the seconds it took."""
    started = time.monotonic()
    for url in engine_urls:
        for name in names[:slots]:
            reply = httpx.post(
                f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(resolver / name)}, timeout=600
            )
            reply.raise_for_status()
    return time.monotonic() - started


def settle(engine_urls: Sequence[str], base: str = BASE, timeout_s: float = 300.0) -> float:
    """Wait until no engine has a request running or waiting and each answers a one-token base-model request (a run
    that was cut may leave requests behind a load, or loads its resolver had queued, in an engine's loop: on the
    GPU those held the next run's engines for 95-135 s while the gauges read 0); the seconds it took."""
    from prometheus_client.parser import text_string_to_metric_families

    started = time.monotonic()
    gauges = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    while time.monotonic() - started < timeout_s:
        busy = 0.0
        for url in engine_urls:
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"{url}/metrics", timeout=10).text
                busy += sum(
                    sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name in gauges
                )
        if busy == 0:
            break
        time.sleep(1)
    for url in engine_urls:
        left = max(timeout_s - (time.monotonic() - started), 1.0)
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/v1/completions", json={"model": base, "prompt": "settle", "max_tokens": 1}, timeout=left)
    return time.monotonic() - started


def loads_logged(logs: Sequence[Path]) -> int:
    texts = [log.read_text(errors="replace") for log in logs if log.exists()]
    return sum(text.count(line) for text in texts for line in LOADED)


@contextlib.contextmanager
def gateway(port: int, target: str, engine_urls: Sequence[str], work: Path, args: argparse.Namespace) -> Iterator[None]:
    argv = [sys.executable, "-m", "gateway", "--base-name", args.base, "--registry", str(args.registry)]
    argv += ["--port", str(port), "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras)]
    if target in GATEWAY_SLOTS:
        argv += ["--max-registered-loras", str(args.max_cpu_loras * GATEWAY_SLOTS[target])]
    argv += ["--max-lora-rank", str(args.max_lora_rank)]
    for url in engine_urls:
        argv += ["--engine-url", url]
    for name in args.prewarm_names:  # most popular first
        argv += ["--prewarm", name]
    env = {**os.environ, **GATEWAYS[target], "LORAGATE_HEALTH_INTERVAL_S": "1"}
    log = work / f"{target}-{port}.log"
    process = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120 + (600 if args.prewarm_names else 0)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the gateway did not become ready; see {log}")
            time.sleep(0.2)
        started, cpu = time.monotonic(), cpu_seconds(process.pid)
        yield
        wall, used = time.monotonic() - started, cpu_seconds(process.pid) - cpu
        print(f"{target}: gateway CPU {used:.1f} s over {wall:.1f} s ({used / wall:.0%} of a core)", file=sys.stderr)
    finally:
        process.terminate()
        process.wait(60)


def measure(
    urls: Sequence[str],
    adapters: Sequence[str],
    clients: int,
    prompt: int,
    output: int,
    base_share: float,
    requests: int,
    base: str = BASE,
) -> dict[str, float]:
    """TTFT and TPOT medians of a closed loop of `clients` over the engine URLs in turn (so clients / engines per
    engine), every engine at once, as in the placement run."""
    workload = WorkloadSpec(
        adapters=tuple(adapters),
        zipf=0.0,
        base_model=base,
        base_share=base_share,
        requests=requests,
        prompt_tokens=Lengths("fixed", prompt),
        output_tokens=Lengths("fixed", output),
    )
    config = BenchConfig(
        (Target("engines", tuple(urls)),), workload, concurrency=clients, ignore_eos=True, warmup=clients
    )
    overall = to_json(run_bench(config))["targets"]["engines"]["overall"]
    return {"ttft_s": overall["ttft_s"]["p50"], "tpot_s": overall["tpot_s"]["p50"]}


def timed_load(url: str, name: str, resolver: Path) -> float:
    """Seconds one `load_lora_adapter` call for the resolver folder's adapter `name` took on `url`."""
    started = time.perf_counter()
    reply = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(resolver / name)}, timeout=600
    )
    reply.raise_for_status()
    return time.perf_counter() - started


def calibrate(urls: Sequence[str], names: Sequence[str], args: argparse.Namespace) -> dict[str, float]:
    """The simulator's costs (benchmarks/sim_placement.py Costs) on these engines: decode step time against the
    batch (base model, every engine busy at once), the extra of distinct adapters in a batch, prefill per token,
    and an adapter load's time on an idle engine."""
    engines = len(urls)
    batches = sorted({int(b) for b in args.calibrate_batches.split(",")} | {1, 4})
    rows = {}
    for batch in batches:
        rows[batch] = measure(urls, [], batch * engines, 32, 32, 1.0, batch * engines * 4, args.base)
        print(f"calibrate: batch {batch}: {rows[batch]}", file=sys.stderr)
    top = batches[-1]
    per_seq = (rows[top]["tpot_s"] - rows[1]["tpot_s"]) / (top - 1)
    step = rows[1]["tpot_s"] - per_seq
    long = measure(urls, [], engines, 384, 4, 1.0, engines * 4, args.base)
    prefill = max(long["ttft_s"] - rows[1]["ttft_s"], 0.0) / (384 - 32)
    # n adapters per engine (its GPU slots, at most 4), resident and in a batch of 4 together, against the base at
    # the same batch
    n = min(args.max_loras, 4)
    for url in urls:
        for name in names[:n]:
            path = str(Path(args.resolver) / name)
            httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120)
    two = measure(urls, names[:n], 4 * engines, 32, 32, 0.0, 16 * engines, args.base)
    per_lora = max(two["tpot_s"] - rows[4]["tpot_s"], 0.0) / n
    empty(urls, args.base)
    loads = []
    for name in names[2:8]:
        loads.append(timed_load(urls[0], name, args.resolver))
    empty(urls, args.base)
    costs = {
        "step_s": round(step, 5),
        "per_seq_s": round(per_seq, 6),
        "per_lora_s": round(per_lora, 6),
        "prefill_token_s": round(prefill, 7),
        "load_s": round(statistics.median(loads), 4),
        # the first token's time alone on an idle engine beyond its prefill and one step: the way in
        "request_s": round(max(rows[1]["ttft_s"] - rows[1]["tpot_s"] - prefill * 32, 0.0), 4),
    }
    print(f"calibrate: {n} adapters in a batch of 4 {two}; loads {[round(x, 3) for x in loads]}", file=sys.stderr)
    return costs


@contextlib.contextmanager
def busy(
    urls: Sequence[str], base: str, clients: int, models: Sequence[Sequence[str]] | None = None
) -> Iterator[list[int]]:
    """Keep `urls` busy with `clients` closed-loop completions (128 in, 64 out) until the block ends: of the base
    model, or with `models`, of engine i's models[i] in turn; yields the count of answers, which grows while it
    runs."""
    stop, answered = threading.Event(), [0]

    async def loop() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

            async def client(i: int) -> None:
                engine = i % len(urls)
                own = models[engine] if models else [base]
                turn = i // len(urls)
                while not stop.is_set():
                    body = {"model": own[turn % len(own)], "prompt": "hello " * 128, "max_tokens": 64}
                    body["ignore_eos"] = True
                    turn += 1
                    async with session.post(f"{urls[engine]}/v1/completions", json=body) as reply:
                        await reply.read()
                    answered[0] += 1

            await asyncio.gather(*(client(i) for i in range(clients)))

    thread = threading.Thread(target=asyncio.run, args=(loop(),), daemon=True)
    thread.start()
    time.sleep(5)  # past the first prefills
    try:
        yield answered
    finally:
        stop.set()
        thread.join(timeout=120)


def load_timing(urls: Sequence[str], names: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per `load_lora_adapter` call on the first engine (each adapter loaded once, on an emptied engine):
    idle, while that engine serves 32 base-model clients, and while every engine serves 32 each."""
    k = args.load_timing
    if len(names) < 3 * k:
        raise SystemExit(f"--load-timing {k} needs {3 * k} adapters")
    empty(urls, args.base)
    result: dict[str, Any] = {}
    for label, busy_urls, batch in (
        ("idle", (), names[:k]),
        ("this engine busy", urls[:1], names[k : 2 * k]),
        ("every engine busy", urls, names[2 * k : 3 * k]),
    ):
        with busy(busy_urls, args.base, 32 * len(busy_urls)) if busy_urls else contextlib.nullcontext([0]) as done:
            before, times = done[0], []
            for name in batch:
                times.append(round(timed_load(urls[0], name, args.resolver), 3))
            result[label] = {"load_s": times, "median_s": statistics.median(times), "answered": done[0] - before}
        print(f"load timing: {label}: {result[label]}", file=sys.stderr)
    empty(urls, args.base)
    return result


def probe(urls: Sequence[str], names: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Why loads slow down when engines share one GPU: under four conditions (idle; every engine busy with 32
    base-model clients; every engine busy with 32 clients over 4 resident adapters of its own; the same while every
    engine loads an adapter at once, as round-robin makes them), the host-side steps of a load in a process of its
    own (benchmarks/gpu/pin_probe.py: 392 separate pin_memory() calls, copies, synchronizations) and
    `load_lora_adapter` on the engines themselves."""
    if len(names) < 16 + 4 * len(urls) * 2 + 4:
        raise SystemExit("--probe needs more adapters")
    script = Path(__file__).resolve().parent / "gpu" / "pin_probe.py"
    resident = [list(names[-4 * (i + 1) : len(names) - 4 * i]) for i in range(len(urls))]
    fresh = iter(names[16 : len(names) - 4 * len(urls)])
    result: dict[str, Any] = {}
    empty(urls, args.base)
    for url, own in zip(urls, resident, strict=True):
        for name in own:
            timed_load(url, name, args.resolver)
    for label, models, together in (
        ("idle", None, False),
        ("every engine busy, base", [[args.base]] * len(urls), False),
        ("every engine busy, adapters", resident, False),
        ("every engine busy, adapters, all loading", resident, True),
    ):
        with busy(urls, args.base, 32 * len(urls), models) if models else contextlib.nullcontext([0]) as done:
            before = done[0]
            row: dict[str, Any] = {}
            ran = subprocess.run(
                [sys.executable, str(script), str(args.resolver / next(fresh))], capture_output=True, text=True
            )
            row["host_steps"] = json.loads(ran.stdout.strip().splitlines()[-1]) if ran.returncode == 0 else ran.stderr
            if together:
                jobs: list[float] = [0.0] * len(urls)

                def one(i: int, name: str, jobs: list[float] = jobs) -> None:
                    jobs[i] = timed_load(urls[i], name, args.resolver)

                threads = [threading.Thread(target=one, args=(i, next(fresh))) for i in range(len(urls))]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                row["load_s"] = [round(x, 3) for x in jobs]
            else:
                row["load_s"] = [round(timed_load(urls[0], next(fresh), args.resolver), 3) for _ in range(2)]
            row["answered"] = done[0] - before
        result[label] = row
        print(f"probe: {label}: {json.dumps(row)}", file=sys.stderr)
    empty(urls, args.base)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--max-cpu-loras", type=int, default=4)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--base-share", type=float, default=0.05)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", default="32")
    parser.add_argument("--max-tokens", default="16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--targets", default="round-robin,gateway-v1,gateway-v2,gateway-v2-again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--work", type=Path, help="keep the engines' and gateways' logs here")
    parser.add_argument("--calibrate", action="store_true", help="measure the simulator's costs on these engines first")
    parser.add_argument("--calibrate-batches", default="1,4,16", help="requests per engine the step time is fitted at")
    parser.add_argument("--load-timing", type=int, default=0, metavar="K", help="time K loads idle and busy first")
    parser.add_argument("--probe", action="store_true", help="time a load's host-side steps idle and busy first (GPU)")
    parser.add_argument("--prewarm", action="store_true", help="every run starts warm (see the module docstring)")
    parser.add_argument("--duration-s", type=float, default=None, help="each run sends for at most this long")
    parser.add_argument("--drain-s", type=float, default=30.0, help="then what is unanswered after this is cut")
    parser.add_argument(
        "--fixed-order", action="store_true", help="run the targets in the order given (round-robin last on a GPU)"
    )
    external = parser.add_argument_group("engines already running (all of these, instead of local CPU engines)")
    external.add_argument("--engine-url", action="append", default=[], help="an engine, with the resolver plugin")
    external.add_argument("--base", default=BASE, help="the engines' served model name")
    external.add_argument("--registry", type=Path, help="a registry holding the adapters on that base")
    external.add_argument("--resolver", type=Path, help="the engines' VLLM_LORA_RESOLVER_CACHE_DIR: one folder each")
    external.add_argument("--max-lora-rank", type=int, default=8)
    external.add_argument("--engine-log", type=Path, action="append", default=[], help="where loads are counted")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-placement-"))
    work.mkdir(parents=True, exist_ok=True)
    running: contextlib.AbstractContextManager[list[str]]
    if args.engine_url:
        if args.registry is None or args.resolver is None:
            raise SystemExit("--engine-url needs --registry and --resolver")
        names = sorted(path.name for path in args.resolver.iterdir() if path.is_dir())[: args.adapters]
        running = contextlib.nullcontext(list(args.engine_url))
        logs = list(args.engine_log)
    else:
        model, args.resolver, names = build_adapters(work, args.adapters)
        args.registry = work / "registry"
        running = _urls(engines(model, args.resolver, work, args))
        logs = [work / f"engine-{i}.log" for i in range(args.engines)]
    args.prewarm_names = list(names) if args.prewarm else []
    wanted = [t for t in args.targets.split(",") if t]
    ports = {name: free_port() for name in wanted if name in GATEWAYS}
    loads: dict[str, list[int]] = {name: [] for name in wanted}
    with running as engine_urls:
        timing = load_timing(engine_urls, names, args) if args.load_timing else None
        probed = probe(engine_urls, names, args) if args.probe else None
        costs = calibrate(engine_urls, names, args) if args.calibrate else None
        if costs is not None:
            print("calibrated costs: " + json.dumps(costs))
        targets = tuple(
            Target(name, tuple(engine_urls) if name == "round-robin" else (f"http://127.0.0.1:{ports[name]}",))
            for name in wanted
        )

        @contextlib.asynccontextmanager
        async def around(target: Target, round_: int) -> AsyncIterator[None]:
            waited = settle(engine_urls, args.base)
            print(f"round {round_}: engines idle {waited:.1f} s before {target.name}", file=sys.stderr)
            empty(engine_urls, args.base)
            with contextlib.ExitStack() as stack:
                if target.name in GATEWAYS:
                    stack.enter_context(gateway(ports[target.name], target.name, engine_urls, work, args))
                elif args.prewarm:
                    took = warm_round_robin(engine_urls, names, args.resolver, args.max_cpu_loras)
                    print(f"round {round_}: {target.name} engines warmed in {took:.1f} s", file=sys.stderr)
                before = loads_logged(logs)  # after the gateway is ready: its prewarm loads are not the run's
                yield
            loads[target.name].append(loads_logged(logs) - before)
            print(f"round {round_}: {target.name} done, {loads[target.name][-1]} loads", file=sys.stderr)

        config = BenchConfig(
            targets,
            WorkloadSpec(
                adapters=tuple(names),
                zipf=args.zipf,
                base_model=args.base,
                base_share=args.base_share,
                requests=args.requests,
                prompt_tokens=Lengths.parse(args.prompt_tokens),
                output_tokens=Lengths.parse(args.max_tokens),
                seed=args.seed,
            ),
            concurrency=args.concurrency,
            rounds=args.rounds,
            ignore_eos=True,
            timeout_s=300,
            metrics_interval_s=5,
            duration_s=args.duration_s,
            drain_s=args.drain_s,
            shuffle=not args.fixed_order,
        )
        result = run_bench(config, around=around)
    document = to_json(result)
    document["engines"] = {
        "count": len(args.engine_url) or args.engines,
        "urls": args.engine_url or None,
        "load_timing": timing,
        "probe": probed,
        "max_loras": args.max_loras,
        "max_cpu_loras": args.max_cpu_loras,
        "prewarm": args.prewarm,
        "loads_per_run": loads,
        "calibrated_costs": costs,
    }
    print(render_text(document))
    print("\nloads per run (engine logs): " + ", ".join(f"{n} {v}" for n, v in loads.items()))
    if args.json:
        args.json.write_text(json.dumps(document, indent=1))
    if args.plot:
        from loragate.bench.plot import save_plot

        save_plot(document, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
