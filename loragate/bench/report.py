"""A benchmark's results: the raw runs (one per target and round), their summaries, the JSON document and the text
table.

Summaries per target pool every round's requests for latencies and SLO attainment; throughput is the median over
rounds of (requests, output tokens of successful requests) / (first send to last answer). Per adapter, throughput
is its successful requests over the rounds' summed duration. The gateway's hit ratio is 1 - loads / adapter
requests sent: a request that waited on a load another request had started counts as a hit, so it is an upper
bound. TPOT is (end-to-end - TTFT) / (output tokens - 1), per request with at least two output tokens. A request
cut at the end of a run of limited duration (status "cut") is a failure, and counts in the TTFT figures with its
first token's time or, when none came, the time it had waited (a lower bound), so cutting a run flatters no target.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loragate.bench.client import CUT, Record
from loragate.bench.config import BenchConfig
from loragate.bench.scrape import Counters
from loragate.bench.workload import BenchRequest

SCHEMA = "loragate-bench/1"
RECORD_FIELDS = (
    "index",
    "url",
    "engine",
    "status",
    "sent_s",
    "late_s",
    "ttft_s",
    "e2e_s",
    "prompt_tokens",
    "output_tokens",
)


@dataclass
class RunResult:
    target: str
    round: int
    position: int  # place of this target in the round's shuffled order
    duration_s: float
    client_cpu_s: float
    records: list[Record]
    gateway: Counters | None = None  # counter deltas over the run
    series: list[tuple[float, Counters]] = field(default_factory=list)  # (seconds into the run, deltas so far)


@dataclass
class BenchResult:
    config: BenchConfig
    requests: list[BenchRequest]
    runs: list[RunResult]
    orders: list[list[str]]

    def to_json(self) -> dict[str, Any]:
        return to_json(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated between the closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def tpot(record: Record) -> float | None:
    if record.ttft_s is None or record.e2e_s is None or not record.output_tokens or record.output_tokens < 2:
        return None
    return max(record.e2e_s - record.ttft_s, 0.0) / (record.output_tokens - 1)


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values) if values else None,
    }


def meets_slo(record: Record, slo_ttft_s: float | None, slo_e2e_s: float | None) -> bool:
    if not record.ok:
        return False
    if slo_ttft_s is not None and (record.ttft_s is None or record.ttft_s > slo_ttft_s):
        return False
    return slo_e2e_s is None or (record.e2e_s is not None and record.e2e_s <= slo_e2e_s)


def summarize(records: Sequence[Record], config: BenchConfig, rates: tuple[float, float] | None) -> dict[str, Any]:
    """Latency, failures and SLO of `records`; `rates` (requests/s, output tokens/s) as computed by the caller."""
    ok = [r for r in records if r.ok]
    slo_on = config.slo_ttft_s is not None or config.slo_e2e_s is not None
    attained = sum(meets_slo(r, config.slo_ttft_s, config.slo_e2e_s) for r in records)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failures": dict(sorted(Counter(r.status for r in records if not r.ok).items())),
        "requests_per_s": rates[0] if rates else None,
        "output_tokens_per_s": rates[1] if rates else None,
        "prompt_tokens_mean": _mean(r.prompt_tokens for r in ok),
        "output_tokens_mean": _mean(r.output_tokens for r in ok),
        "ttft_s": _spread([t for r in records if (t := _ttft(r)) is not None]),
        "tpot_s": _spread([t for r in ok if (t := tpot(r)) is not None]),
        "e2e_s": _spread([r.e2e_s for r in ok if r.e2e_s is not None]),
        "slo_attained": attained / len(records) if slo_on and records else None,
    }


def _ttft(record: Record) -> float | None:
    if record.ok:
        return record.ttft_s
    if record.status == CUT:
        return record.ttft_s if record.ttft_s is not None else record.e2e_s
    return None


def _mean(values: Iterable[int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _rates(records: Sequence[Record], duration_s: float) -> tuple[float, float]:
    ok = [r for r in records if r.ok]
    if duration_s <= 0:
        return 0.0, 0.0
    return len(ok) / duration_s, sum(r.output_tokens or 0 for r in ok) / duration_s


def _gateway(runs: Sequence[RunResult], adapter_sent: int) -> dict[str, Any] | None:
    if not runs or any(run.gateway is None for run in runs):
        return None
    values = {
        key: sum(run.gateway.values.get(key, 0.0) for run in runs if run.gateway)
        for key in ("loads", "evictions", "load_failures", "load_seconds_sum", "load_seconds_count")
    }
    minutes = sum(run.duration_s for run in runs) / 60
    by_engine: Counter[str] = Counter()
    for run in runs:
        if run.gateway:
            by_engine.update(run.gateway.loads_by_engine)
    sent = adapter_sent
    return {
        "loads": int(values["loads"]),
        "evictions": int(values["evictions"]),
        "load_failures": int(values["load_failures"]),
        "loads_per_min": values["loads"] / minutes if minutes else None,
        "evictions_per_min": values["evictions"] / minutes if minutes else None,
        "hit_ratio": max(0.0, 1 - values["loads"] / sent) if sent else None,
        "load_s_mean": values["load_seconds_sum"] / values["load_seconds_count"]
        if values["load_seconds_count"]
        else None,
        "loads_by_engine": {engine: int(n) for engine, n in sorted(by_engine.items())},
    }


def _columns(records: Sequence[Record]) -> dict[str, list[Any]]:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 6)

    columns: dict[str, list[Any]] = {name: [] for name in RECORD_FIELDS}
    for r in records:
        for name in RECORD_FIELDS:
            value = getattr(r, name)
            columns[name].append(rounded(value) if isinstance(value, float) else value)
    return columns


def target_summary(result: BenchResult, name: str) -> dict[str, Any]:
    config = result.config
    runs = [run for run in result.runs if run.target == name]
    by_index = {request.index: request for request in result.requests}
    records = [record for run in runs for record in run.records]
    round_rates = [_rates(run.records, run.duration_s) for run in runs]
    overall = summarize(
        records,
        config,
        (statistics.median(r for r, _ in round_rates), statistics.median(t for _, t in round_rates)),
    )
    total_s = sum(run.duration_s for run in runs)
    per_model: dict[str, list[Record]] = {}
    for record in records:
        per_model.setdefault(by_index[record.index].model, []).append(record)
    ranks = {request.model: request.rank for request in result.requests}
    per_adapter = {
        model: {"rank": ranks[model], **summarize(group, config, _rates(group, total_s))}
        for model, group in sorted(per_model.items(), key=lambda item: (ranks[item[0]], item[0]))
    }
    adapter = {request.index for request in result.requests if request.rank > 0}

    def adapter_sent(of: Sequence[RunResult]) -> int:  # all of them, unless a run's duration cut it short
        return sum(1 for run in of for record in run.records if record.index in adapter)

    examples: dict[str, str] = {}
    for record in records:
        if not record.ok and record.status not in examples:
            examples[record.status] = record.error or ""
    urls = list(next(t.urls for t in config.targets if t.name == name))
    # which engine answered: the gateway's header, else (a list of engine URLs taking turns) the URL it went to
    engines = Counter(r.engine if r.engine is not None else urls[r.url] for r in records if len(urls) > 1 or r.engine)
    return {
        "urls": urls,
        "requests_by_engine": dict(sorted(engines.items())),
        "overall": overall,
        "per_adapter": per_adapter,
        "worst_adapter": _worst(per_adapter),
        "gateway": _gateway(runs, adapter_sent(runs)),
        "failure_examples": examples,
        "client_cpu_per_request_ms": 1000 * sum(run.client_cpu_s for run in runs) / max(len(records), 1),
        "client_cpu_share": sum(run.client_cpu_s for run in runs) / total_s if total_s else None,
        "rounds": [_round_json(run, adapter_sent([run])) for run in runs],
    }


def _worst(per_adapter: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The adapter with the highest p99 TTFT, and its ratio to the base model's (the starvation check)."""
    adapters = {m: s for m, s in per_adapter.items() if s["rank"] > 0 and s["ttft_s"]["p99"] is not None}
    if not adapters:
        return None
    model = max(adapters, key=lambda m: adapters[m]["ttft_s"]["p99"])
    base = next((s["ttft_s"]["p99"] for s in per_adapter.values() if s["rank"] == 0), None)
    p99 = adapters[model]["ttft_s"]["p99"]
    return {
        "adapter": model,
        "rank": adapters[model]["rank"],
        "ttft_p99_s": p99,
        "base_ttft_p99_s": base,
        "to_base": p99 / base if base else None,
    }


def _round_json(run: RunResult, adapter_sent: int) -> dict[str, Any]:
    requests_per_s, tokens_per_s = _rates(run.records, run.duration_s)
    return {
        "round": run.round,
        "position": run.position,
        "duration_s": run.duration_s,
        "requests_per_s": requests_per_s,
        "output_tokens_per_s": tokens_per_s,
        "client_cpu_s": run.client_cpu_s,
        "gateway": _gateway([run], adapter_sent),
        "gateway_series": [
            {"t_s": round(t, 3), "loads": int(c.values["loads"]), "evictions": int(c.values["evictions"])}
            for t, c in run.series
        ],
        "records": _columns(run.records),
    }


def to_json(result: BenchResult) -> dict[str, Any]:
    counts = Counter(request.model for request in result.requests)
    ranks = {request.model: request.rank for request in result.requests}
    return {
        "schema": SCHEMA,
        "config": result.config.describe(),
        "workload": {
            "requests": len(result.requests),
            "models": {m: {"rank": ranks[m], "requests": counts[m]} for m in sorted(counts, key=lambda m: ranks[m])},
            "prompt_tokens": sum(r.prompt_tokens for r in result.requests),
            "output_tokens": sum(r.output_tokens for r in result.requests),
            "duration_s": result.requests[-1].at_s if result.requests and result.requests[-1].at_s else None,
        },
        "orders": result.orders,
        "targets": {target.name: target_summary(result, target.name) for target in result.config.targets},
    }


# ---- text -------------------------------------------------------------------------------------------------------


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def describe(config: Mapping[str, Any]) -> str:
    """One line saying what was sent, e.g. `200 requests x 3 rounds: 16 adapters Zipf(1.1) + tiny 10%, ...`."""
    models = "a trace" if config["trace"] else f"{config['adapters']} adapters Zipf({config['zipf']:g})"
    if config["base_model"] and config["base_share"]:
        models += f" + {config['base_model']} {100 * config['base_share']:g}%"
    if config["arrivals"] == "closed":
        load = f"closed loop, {config['concurrency']} clients"
    else:
        load = f"Poisson {config['rate']:g}/s" if config["arrivals"] == "poisson" else "the trace's times"
        load += f", at most {config['concurrency']} in flight" if config["concurrency"] else ""
    lengths = f"prompt {config['prompt_tokens']}, output {config['output_tokens']} tokens"
    lengths += " (ignore_eos)" if config["ignore_eos"] else ""
    rounds = f" x {config['rounds']} rounds" if config["rounds"] > 1 else ""
    if config.get("duration_s"):
        rounds += f" (at most {config['duration_s']:g} s each, cut {config['drain_s']:g} s later)"
    return f"{config['requests']} requests{rounds} per target: {models}; {load}; {lengths}"


def render_text(document: Mapping[str, Any], show_adapters: int = 8) -> str:
    """The summary table of a `to_json` document, the per-adapter table of the most popular adapters, and notes."""
    config, targets = document["config"], document["targets"]
    has_slo = config["slo_ttft_s"] is not None or config["slo_e2e_s"] is not None
    header = ["target", "ok/sent", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "E2E p50", "E2E p99"]
    header += ["SLO"] if has_slo else []
    header += ["loads/min", "evict/min", "hit"]
    rows = [header]
    out = []
    for name, t in targets.items():
        o, g = t["overall"], t["gateway"] or {}
        row = [name, f"{o['ok']}/{o['requests']}", _num(o["requests_per_s"], 2), _num(o["output_tokens_per_s"])]
        row += [secs(o["ttft_s"]["p50"]), secs(o["ttft_s"]["p99"]), secs(o["tpot_s"]["p50"])]
        row += [secs(o["e2e_s"]["p50"]), secs(o["e2e_s"]["p99"])]
        row += [_share(o["slo_attained"])] if has_slo else []
        row += [_num(g.get("loads_per_min")), _num(g.get("evictions_per_min")), _share(g.get("hit_ratio"))]
        rows.append(row)
    out.append(describe(config) + "\n" + table(rows))
    models = document["workload"]["models"]
    shown = [m for m in models if models[m]["rank"] <= show_adapters]
    if shown:
        head = ["rank", "model", "requests"] + [f"{name} TTFT p50/p99" for name in targets]
        adapter_rows = [head]
        for model in shown:
            row = [str(models[model]["rank"] or "base"), model, str(models[model]["requests"])]
            for t in targets.values():
                s = t["per_adapter"].get(model)
                row.append(f"{secs(s['ttft_s']['p50'])} / {secs(s['ttft_s']['p99'])}" if s else "-")
            adapter_rows.append(row)
        more = len(models) - len(shown)
        out.append(table(adapter_rows) + (f"\n({more} more models in the JSON result)" if more > 0 else ""))
    notes = []
    for name, t in targets.items():
        if t["overall"]["failures"]:
            failed = ", ".join(f"{status} x{n}" for status, n in t["overall"]["failures"].items())
            example = next(iter(t["failure_examples"].values()), "")
            notes.append(f"{name}: failed {failed} (first: {example[:120]})")
        worst = t["worst_adapter"]
        if worst and len(models) > 1:
            ratio = f", {worst['to_base']:.1f}x the base model's" if worst["to_base"] else ""
            notes.append(
                f"{name}: worst p99 TTFT {worst['adapter']} (rank {worst['rank']}) {secs(worst['ttft_p99_s'])}{ratio}"
            )
        by_engine = t.get("requests_by_engine") or {}
        if len(by_engine) > 1:
            notes.append(f"{name}: requests by engine " + ", ".join(f"{e} {n}" for e, n in by_engine.items()))
        g = t["gateway"]
        if g and g["loads_by_engine"]:
            notes.append(f"{name}: loads by engine " + ", ".join(f"{e} {n}" for e, n in g["loads_by_engine"].items()))
        share = t["client_cpu_share"]
        notes.append(
            f"{name}: client {t['client_cpu_per_request_ms']:.2f} ms CPU per request, {_share(share)} of a core"
            + (" (the client may be the bottleneck)" if share and share > 0.8 else "")
        )
    return "\n\n".join([*out, "\n".join(notes)])
