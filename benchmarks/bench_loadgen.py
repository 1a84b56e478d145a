"""`loragate bench`'s own ceiling: its CPU per request against an upstream that answers at once.

    .venv/bin/python benchmarks/bench_loadgen.py [--events 1,32,128] [--requests 4000] [--concurrency 64] [--rounds 3]

The upstream is `tests.fakes.FakeEngine` in a process of its own, streaming every answer as `--events` content
chunks with no pause; the load generator runs in this process (closed loop, Zipf over 64 adapters, uvloop when
installed), as `loragate bench` would. Per chunk count it prints the requests/s reached, the generator's CPU per
request and its share of a core, and the upstream's share of a core: whichever side is near one core set the pace.
1000 / (CPU ms per request) is the generator's ceiling on one core. Medians over the rounds. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loragate.bench.config import BenchConfig, Target  # noqa: E402
from loragate.bench.runner import run_bench  # noqa: E402
from loragate.bench.workload import Lengths, WorkloadSpec  # noqa: E402

UPSTREAM = """
import sys, time
from collections import deque
from tests.fakes import FakeEngine, stream
engine = FakeEngine(script=deque([stream(events=int(sys.argv[1]))] * 1_000_000))
with engine:
    print(engine.url, flush=True)
    time.sleep(86400)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(events: int, requests: int, concurrency: int, rounds: int) -> dict[str, float]:
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM, str(events)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert upstream.stdout is not None
        url = upstream.stdout.readline().strip()
        spec = WorkloadSpec(
            adapters=tuple(f"a{i}" for i in range(64)),
            zipf=1.1,
            requests=requests,
            prompt_tokens=Lengths("fixed", 32),
            output_tokens=Lengths("fixed", events),
        )
        config = BenchConfig((Target("fake", (url,)),), spec, concurrency=concurrency, metrics_interval_s=3600)
        rows = []
        for _ in range(rounds):
            upstream_cpu, wall = cpu_seconds(upstream.pid), time.perf_counter()
            run = run_bench(config).runs[0]
            upstream_share = (cpu_seconds(upstream.pid) - upstream_cpu) / (time.perf_counter() - wall)
            assert all(record.ok for record in run.records), "a request failed"
            rows.append(
                {
                    "requests_per_s": len(run.records) / run.duration_s,
                    "cpu_ms_per_request": 1000 * run.client_cpu_s / len(run.records),
                    "client_core_share": run.client_cpu_s / run.duration_s,
                    "upstream_core_share": upstream_share,
                }
            )
        return {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    finally:
        upstream.kill()
        upstream.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", default="1,32,128", help="content chunks per answer, comma-separated")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| chunks per answer | requests/s | generator CPU ms per request | generator core | upstream core |")
    print("|---|---|---|---|---|")
    for events in (int(e) for e in args.events.split(",")):
        m = measure(events, args.requests, args.concurrency, args.rounds)
        print(
            f"| {events} | {m['requests_per_s']:,.0f} | {m['cpu_ms_per_request']:.3f} | "
            f"{100 * m['client_core_share']:.0f}% | {100 * m['upstream_core_share']:.0f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
