"""`loragate bench`: a multi-adapter load generator for any OpenAI-compatible endpoint.

    loragate bench --target gw=http://127.0.0.1:8000 --target rr=http://e1:8001,http://e2:8002 \
        --adapters-prefix a --num-adapters 64 --zipf 1.1 --requests 2000 --concurrency 128 --max-tokens 128 \
        --ignore-eos --rounds 3 --slo-ttft-s 2 --json bench.json --plot bench.png
    loragate bench --target gw=URL --trace trace.jsonl            # replay a trace at its own times
    loragate bench --adapters a,b --requests 500 --rate 4 --write-trace trace.jsonl   # write the workload only

Every target gets the same seeded request sequence, in shuffled target order each round; give one URL twice under
two names to see the noise. Trace format: `loragate/bench/workload.py`; JSON schema: `loragate/bench/report.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loragate.bench.config import BenchConfig
    from loragate.bench.report import RunResult
    from loragate.bench.workload import Arrivals, WorkloadSpec


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "bench",
        help="multi-adapter load generator: Zipf or trace workloads against gateways, engines, any OpenAI URL",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=URL[,URL...]",
        help="an endpoint to measure (repeatable); several URLs are sent requests in turn",
    )
    parser.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        metavar="NAME=URL[,URL...]",
        help="read target NAME's /metrics here instead (a gateway with metrics_port)",
    )
    models = parser.add_argument_group("models (one of)")
    source = models.add_mutually_exclusive_group()
    source.add_argument("--adapters", help="comma-separated adapter names, most popular first")
    source.add_argument("--adapters-prefix", metavar="PREFIX", help="adapters PREFIX0 .. PREFIX{N-1}")
    source.add_argument(
        "--adapters-file", type=Path, metavar="FILE", help="one adapter name a line, most popular first"
    )
    source.add_argument("--trace", type=Path, metavar="FILE", help="JSONL: time, adapter, prompt_tokens, output_tokens")
    models.add_argument("--num-adapters", type=int, metavar="N", help="with --adapters-prefix")
    models.add_argument("--zipf", type=float, default=1.0, metavar="ALPHA", help="popularity exponent (0: uniform)")
    models.add_argument("--base-model", metavar="NAME", help="also send requests to the base model by this name")
    models.add_argument("--base-share", type=float, default=None, help="share of base-model requests (default 0.1)")
    load = parser.add_argument_group("load")
    load.add_argument("--requests", type=int, default=None, help="requests per round (default 200, or the trace's)")
    load.add_argument(
        "--concurrency", type=int, default=None, help="closed loop: clients (default 16); with --rate: in-flight cap"
    )
    load.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals, requests/s")
    load.add_argument("--prompt-tokens", default="64", metavar="SPEC", help="N, uniform:LO:HI, lognormal:MEDIAN:SIGMA")
    load.add_argument("--max-tokens", default="64", metavar="SPEC", help="output tokens: N or a distribution as above")
    load.add_argument("--ignore-eos", action="store_true", help="vLLM's ignore_eos, so outputs are exactly max_tokens")
    load.add_argument(
        "--extra-body", default=None, metavar="JSON", help="more request fields, e.g. '{\"temperature\": 0}'"
    )
    load.add_argument("--rounds", type=int, default=1, help="each target once per round, order shuffled")
    load.add_argument("--warmup", type=int, default=0, help="requests sent to each target first, not measured")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout-s", type=float, default=600.0, help="longest wait for the next byte of an answer")
    load.add_argument("--duration-s", type=float, default=None, help="send for at most this long per run")
    load.add_argument(
        "--drain-s", type=float, default=30.0, help="with --duration-s: then cut what is still unanswered after this"
    )
    load.add_argument("--api-key", default=None, help="sent as a bearer token")
    report = parser.add_argument_group("report")
    report.add_argument("--slo-ttft-s", type=float, default=None, help="SLO on the time to the first token")
    report.add_argument("--slo-e2e-s", type=float, default=None, help="SLO on the whole request")
    report.add_argument("--metrics-interval-s", type=float, default=60.0, help="how often /metrics is read in a run")
    report.add_argument("--json", type=Path, metavar="FILE", help="write the result (per request too) as JSON")
    report.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG: TTFT CDF, p99 TTFT by rank")
    report.add_argument("--show-adapters", type=int, default=8, metavar="K", help="per-adapter rows printed")
    report.add_argument("--write-trace", type=Path, metavar="FILE", help="write the workload as a trace (JSONL)")
    parser.set_defaults(handler=run)


def _adapters(args: argparse.Namespace) -> tuple[str, ...]:
    from loragate.bench.config import BenchError

    if args.num_adapters is not None and args.adapters_prefix is None:
        raise BenchError("--num-adapters goes with --adapters-prefix")
    if args.adapters_prefix is not None:
        if not args.num_adapters or args.num_adapters < 1:
            raise BenchError("--adapters-prefix needs --num-adapters N (N >= 1)")
        return tuple(f"{args.adapters_prefix}{i}" for i in range(args.num_adapters))
    if args.adapters_file is not None:
        lines = _read(args.adapters_file).splitlines()
        return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if args.adapters is not None:
        return tuple(name.strip() for name in args.adapters.split(",") if name.strip())
    return ()


def _read(path: Path) -> str:
    from loragate.bench.config import BenchError

    try:
        return path.read_text()
    except OSError as exc:
        raise BenchError(f"{path}: {exc.strerror or exc}") from None


def workload_from_args(args: argparse.Namespace) -> WorkloadSpec:
    from loragate.bench.config import BenchError
    from loragate.bench.workload import Lengths, WorkloadSpec, parse_trace

    trace = tuple(parse_trace(_read(args.trace).splitlines(), str(args.trace))) if args.trace else None
    adapters = _adapters(args)
    if trace is None and not adapters:
        raise BenchError(
            "no adapters: give --adapters, --adapters-prefix with --num-adapters, --adapters-file or --trace"
        )
    if args.base_share is not None and args.base_model is None:
        raise BenchError("--base-share needs --base-model")
    arrivals: Arrivals
    if args.rate is not None:
        arrivals = "poisson"
    elif trace is not None and args.concurrency is None:
        arrivals = "trace"
    else:
        arrivals = "closed"
    requests = args.requests if args.requests is not None else (len(trace) if trace else 200)
    return WorkloadSpec(
        adapters=adapters,
        zipf=args.zipf,
        requests=requests,
        base_model=args.base_model,
        base_share=(0.1 if args.base_share is None else args.base_share) if args.base_model else 0.0,
        prompt_tokens=Lengths.parse(args.prompt_tokens),
        output_tokens=Lengths.parse(args.max_tokens),
        arrivals=arrivals,
        rate=args.rate,
        trace=trace,
        seed=args.seed,
    )


def config_from_args(args: argparse.Namespace, workload: WorkloadSpec) -> BenchConfig:
    from loragate.bench.config import BenchConfig, BenchError, Target

    extra: dict[str, Any] = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as exc:
            raise BenchError(f"--extra-body: not JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise BenchError("--extra-body: a JSON object expected")
    concurrency = args.concurrency
    if concurrency is None and workload.arrivals == "closed":
        concurrency = 16
    targets = [Target.parse(text) for text in args.target]
    for text in args.metrics_url:
        metrics = Target.parse(text)
        index = next((i for i, t in enumerate(targets) if t.name == metrics.name), None)
        if index is None:
            raise BenchError(f"--metrics-url {text!r}: no target named {metrics.name!r}")
        targets[index] = dataclasses.replace(targets[index], metrics_urls=metrics.urls)
    return BenchConfig(
        targets=tuple(targets),
        workload=workload,
        concurrency=concurrency,
        rounds=args.rounds,
        ignore_eos=args.ignore_eos,
        api_key=args.api_key,
        extra_body=extra,
        slo_ttft_s=args.slo_ttft_s,
        slo_e2e_s=args.slo_e2e_s,
        timeout_s=args.timeout_s,
        warmup=args.warmup,
        duration_s=args.duration_s,
        drain_s=args.drain_s,
        metrics_interval_s=args.metrics_interval_s,
    )


def run(args: argparse.Namespace) -> int:
    from loragate.bench.config import BenchError
    from loragate.bench.plot import INSTALL_HINT, matplotlib_missing, save_plot
    from loragate.bench.report import render_text
    from loragate.bench.runner import run_bench
    from loragate.bench.workload import build_requests, trace_lines

    for path in (args.json, args.plot, args.write_trace):
        if path is not None and not path.absolute().parent.is_dir():
            raise BenchError(f"{path}: its folder does not exist")
    workload = workload_from_args(args)
    if args.write_trace is not None:
        lines = trace_lines(build_requests(workload))
        _write(args.write_trace, "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} requests to {args.write_trace}", file=sys.stderr)
        if not args.target:
            return 0
    config = config_from_args(args, workload)
    config.check()
    if args.plot is not None and matplotlib_missing():
        raise BenchError(INSTALL_HINT)
    document = run_bench(config, progress=_progress(config)).to_json()
    print(render_text(document, show_adapters=args.show_adapters))
    if args.json is not None:
        _write(args.json, json.dumps(document, indent=1) + "\n")
    if args.plot is not None:
        save_plot(document, args.plot)
    return 0


def _write(path: Path, text: str) -> None:
    from loragate.bench.config import BenchError

    try:
        path.write_text(text)
    except OSError as exc:
        raise BenchError(f"{path}: {exc.strerror or exc}") from None


def _progress(config: BenchConfig) -> Callable[[RunResult], None]:
    def report(run: RunResult) -> None:
        failed = sum(not record.ok for record in run.records)
        print(
            f"round {run.round + 1}/{config.rounds} {run.target}: {len(run.records)} requests in "
            f"{run.duration_s:.1f} s, {failed} failed",
            file=sys.stderr,
        )

    return report
