"""Throughput of short requests through `loragate serve --workers N` and through one worker, against vLLM alone.

    python benchmarks/gpu/short_requests.py --engine-url URL --target gateway=URL:PID --target gateway-x4=URL:PID \
        --base NAME --adapters a,b,c [--concurrency 256] [--duration 6] [--rounds 3] [--burst]

Short requests (a short prompt, `--max-tokens` 8 with ignore_eos) spread round-robin over the base and the adapters,
so the work per request is small and a gateway's own cost shows. Load comes from `wrk` (`$WRK`, `--threads`); each
target is a gateway in front of the same engine, `direct` and `direct-2` go to the engine itself (adapter engine
names taken from its /v1/models). CPU is the gateway's process tree (primary and workers). `--burst` first sends
`--concurrency` concurrent first requests for every adapter through the first target, all cold, and reports how
many loads the engine got (one per adapter, whichever worker asked). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_dataplane import tree_cpu_s

WRK = os.environ.get("WRK", "wrk")
LUA = """
local models = {}
for m in string.gmatch(os.getenv("MODELS"), "[^,]+") do table.insert(models, m) end
local n = 0
request = function()
  n = n + 1
  local body = '{"model":"' .. models[(n % #models) + 1] .. '","messages":[{"role":"user","content":' ..
    '"Hi there, how are you today?"}],"max_tokens":' .. os.getenv("MAX_TOKENS") .. ',"ignore_eos":true}'
  return wrk.format("POST", "/v1/chat/completions", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
"""


def run(url: str, models: list[str], pid: int | None, args: argparse.Namespace, script: Path) -> dict[str, float]:
    before = tree_cpu_s(pid) if pid else 0.0
    out = subprocess.run(
        [
            WRK,
            f"-t{args.threads}",
            f"-c{args.concurrency}",
            f"-d{args.duration}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            f"{url}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MODELS": ",".join(models), "MAX_TOKENS": str(args.max_tokens)},
        check=True,
    ).stdout
    cpu = tree_cpu_s(pid) - before if pid else None
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    requests, status_errors, socket_errors, p50, p99, duration = (int(v) for v in line.split()[1:])
    answered = requests - status_errors - socket_errors
    return {
        "rps": answered / (duration / 1e6),
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "failed": status_errors + socket_errors,
        "cpu_cores": (cpu / (duration / 1e6)) if cpu is not None else float("nan"),
    }


async def burst(url: str, adapters: list[str], concurrency: int) -> list[int]:
    gate = asyncio.Semaphore(concurrency)
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def one(i: int) -> None:
            body = {
                "model": adapters[i % len(adapters)],
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
            }
            async with gate:
                statuses.append((await c.post("/v1/chat/completions", json=body)).status_code)

        await asyncio.gather(*(one(i) for i in range(concurrency)))
    return statuses


def loads_in(metrics: str) -> float:
    return sum(float(v) for v in re.findall(r"^loragate_adapter_loads_total\{[^}]*\} (\S+)$", metrics, re.M))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--engine-url", required=True)
    parser.add_argument("--target", action="append", required=True, metavar="NAME=URL:PID")
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapters", required=True)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--burst", action="store_true")
    args = parser.parse_args()
    adapters = [a for a in args.adapters.split(",") if a]
    targets: dict[str, tuple[str, int | None, list[str]]] = {}
    for spec in args.target:
        name, _, rest = spec.partition("=")
        url, _, pid = rest.rpartition(":")
        targets[name] = (url, int(pid), [args.base, *adapters])
    first_url = next(iter(targets.values()))[0]
    if args.burst:
        statuses = asyncio.run(burst(first_url, adapters, args.concurrency))
        metrics = httpx.get(f"{first_url}/metrics", timeout=30).text
        ok = sum(s == 200 for s in statuses)
        print(
            f"cold burst through {next(iter(targets))}: {ok}/{len(statuses)} answered 200; "
            f"adapter loads {loads_in(metrics):.0f} for {len(adapters)} adapters"
        )
    listed = httpx.get(f"{args.engine_url}/v1/models", timeout=30).json()["data"]
    by_name = {card["id"].split("@")[0]: card["id"] for card in listed if card.get("parent")}
    direct_models = [args.base, *(by_name[a] for a in adapters if a in by_name)]
    targets = {
        "direct": (args.engine_url, None, direct_models),
        "direct-2": (args.engine_url, None, direct_models),
        **targets,
    }
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(LUA)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for url, _pid, models in targets.values():  # warm-up
        subprocess.run(
            [WRK, "-t2", "-c16", "-d2s", "-s", str(script), f"{url}/v1/chat/completions"],
            capture_output=True,
            env={**os.environ, "MODELS": ",".join(models), "MAX_TOKENS": "2"},
        )
    rng = random.Random(0)
    for round_ in range(args.rounds):
        order = list(targets)
        rng.shuffle(order)
        for name in order:
            url, pid, models = targets[name]
            results[name].append(run(url, models, pid, args, script))
        print(f"round {round_ + 1}: {', '.join(order)}", file=sys.stderr)
    print(
        f"short requests ({args.max_tokens} tokens, ignore_eos), wrk -t{args.threads} -c{args.concurrency} "
        f"{args.duration}s, base + {len(adapters)} adapters round-robin, {args.rounds} shuffled rounds (medians)"
    )
    print(
        f"{'target':<12} {'req/s':>9} {'vs direct':>9} {'p50 ms':>8} {'p99 ms':>8} {'gateway cores':>13} {'failed':>6}"
    )
    base = statistics.median(r["rps"] for r in results["direct"])
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(
            f"{name:<12} {med['rps']:>9.0f} {med['rps'] / base:>9.3f} {med['p50_ms']:>8.1f} {med['p99_ms']:>8.1f} "
            f"{med['cpu_cores']:>13.2f} {sum(r['failed'] for r in rows):>6.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
