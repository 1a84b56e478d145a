"""`loragate bench` end to end against `tests.fakes.FakeEngine`s (and a real gateway over one) on loopback: the same
sequence to every target, round-robin over a URL list, exact counts, failure statuses, the gateway's load and
eviction deltas, the JSON schema, the CLI's one-line errors. Nothing here is timed."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.engine_process import free_port
from loragate.bench.config import BenchConfig, Target
from loragate.bench.report import percentile, render_text
from loragate.bench.runner import run_bench
from loragate.bench.scrape import Counters, parse_counters
from loragate.bench.workload import Lengths, WorkloadSpec, build_requests, prompt_text
from loragate.cli import main
from tests.fakes import USAGE, FakeEngine, drop, drop_after, fake_gateway, hang, status, stream

ADAPTERS = ("a0", "a1", "a2", "a3", "a4")
ENVELOPE = b'{"error": {"message": "engines busy", "type": "server_error", "param": null, "code": "engines_busy"}}'

SUMMARY_KEYS = {
    "requests",
    "ok",
    "failures",
    "requests_per_s",
    "output_tokens_per_s",
    "prompt_tokens_mean",
    "output_tokens_mean",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "slo_attained",
}
TARGET_KEYS = {
    "urls",
    "requests_by_engine",
    "overall",
    "per_adapter",
    "worst_adapter",
    "gateway",
    "failure_examples",
    "client_cpu_per_request_ms",
    "client_cpu_share",
    "rounds",
}
ROUND_KEYS = {
    "round",
    "position",
    "duration_s",
    "requests_per_s",
    "output_tokens_per_s",
    "client_cpu_s",
    "gateway",
    "gateway_series",
    "records",
}
RECORD_KEYS = {
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
}
GATEWAY_KEYS = {
    "loads",
    "evictions",
    "load_failures",
    "loads_per_min",
    "evictions_per_min",
    "hit_ratio",
    "load_s_mean",
    "loads_by_engine",
}


def workload(**kw: Any) -> WorkloadSpec:
    defaults: dict[str, Any] = {
        "adapters": ADAPTERS,
        "zipf": 1.1,
        "requests": 40,
        "base_model": "tiny",
        "base_share": 0.2,
        "prompt_tokens": Lengths("fixed", 12),
        "output_tokens": Lengths("uniform", 4, 9),
        "seed": 5,
    }
    return WorkloadSpec(**{**defaults, **kw})


def prompts(engine: FakeEngine) -> Counter[str]:
    return Counter(body["messages"][0]["content"] for _, body in engine.seen)


def test_two_targets_get_the_same_sequence_and_a_url_list_takes_turns() -> None:
    spec = workload()
    requests = build_requests(spec)
    with FakeEngine() as one, FakeEngine() as left, FakeEngine() as right:
        one.script.append(status(503, ENVELOPE))
        config = BenchConfig(
            targets=(Target("one", (one.url,)), Target("rr", (left.url, right.url + "/v1"))),
            workload=spec,
            concurrency=4,
            rounds=2,
            ignore_eos=True,
            extra_body={"temperature": 0},
            slo_ttft_s=60.0,
        )
        result = run_bench(config)
    document = json.loads(json.dumps(result.to_json()))

    # Every target got the whole sequence each round: the same models and lengths, prompts salted per run.
    for engine, urls in ((one, [0]), (left, [0]), (right, [1])):
        target = "one" if engine is one else "rr"
        expected: Counter[str] = Counter()
        for round_ in range(2):
            salt = f"5:{round_}:{target}"
            expected.update(prompt_text(r, salt) for r in requests if (r.index % (2 if target == "rr" else 1)) in urls)
        assert prompts(engine) == expected
    assert len(one.seen) == 80 and len(left.seen) == 40 and len(right.seen) == 40
    models = Counter(r.model for r in requests)
    assert Counter(body["model"] for _, body in one.seen) == Counter({m: 2 * n for m, n in models.items()})
    assert Counter(body["model"] for _, body in left.seen + right.seen) == Counter(
        {m: 2 * n for m, n in models.items()}
    )
    by_prompt = {prompt_text(r, "5:0:one"): r for r in requests}
    for _, body in one.seen[:40]:
        request = by_prompt.get(body["messages"][0]["content"])
        if request is not None:
            assert body["max_tokens"] == request.output_tokens and body["model"] == request.model
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["temperature"] == 0

    # Round-robin in send order: request i of the rr target went to URL i % 2, in both rounds.
    rr_runs = [run for run in result.runs if run.target == "rr"]
    assert [[record.url for record in run.records] for run in rr_runs] == [[i % 2 for i in range(40)]] * 2
    assert sorted(document["orders"][0]) == ["one", "rr"] and len(document["orders"]) == 2

    rr, single = document["targets"]["rr"], document["targets"]["one"]
    assert rr["urls"] == [left.url, right.url]
    assert rr["requests_by_engine"] == {left.url: 40, right.url: 40} and single["requests_by_engine"] == {}
    assert (rr["overall"]["requests"], rr["overall"]["ok"], rr["overall"]["failures"]) == (80, 80, {})
    assert (single["overall"]["ok"], single["overall"]["failures"]) == (79, {"503": 1})
    assert single["failure_examples"] == {"503": "engines busy"}
    assert (single["overall"]["slo_attained"], rr["overall"]["slo_attained"]) == (79 / 80, 1.0)
    for name, count in models.items():
        per = rr["per_adapter"][name]
        assert (per["requests"], per["ok"], per["rank"]) == (2 * count, 2 * count, requests_rank(requests, name))
        assert per["output_tokens_mean"] == USAGE["completion_tokens"]
        assert per["prompt_tokens_mean"] == USAGE["prompt_tokens"]
    assert document["workload"]["models"]["tiny"] == {"rank": 0, "requests": models["tiny"]}
    assert rr["gateway"] is None and single["gateway"] is None  # a FakeEngine exposes no loragate_ series

    # The schema: stable keys at every level.
    assert set(document) == {"schema", "config", "workload", "orders", "targets"}
    assert document["schema"] == "loragate-bench/1"
    assert set(rr) == TARGET_KEYS and set(rr["overall"]) == SUMMARY_KEYS
    assert set(rr["per_adapter"]["a0"]) == SUMMARY_KEYS | {"rank"}
    assert set(rr["overall"]["ttft_s"]) == {"p50", "p90", "p99", "mean"}
    assert set(rr["rounds"][0]) == ROUND_KEYS and set(rr["rounds"][0]["records"]) == RECORD_KEYS
    assert all(len(column) == 40 for column in rr["rounds"][0]["records"].values())
    text = render_text(document)
    assert text.splitlines()[0] == (
        "40 requests x 2 rounds per target: 5 adapters Zipf(1.1) + tiny 20%; closed loop, 4 clients; "
        "prompt 12, output uniform:4:9 tokens (ignore_eos)"
    )
    assert text.splitlines()[1].split()[:3] == ["target", "ok/sent", "req/s"]
    assert "one: failed 503 x1 (first: engines busy)" in text


def requests_rank(requests: list[Any], model: str) -> int:
    return int(next(r.rank for r in requests if r.model == model))


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (status(429, b'{"error": {"message": "slow down"}}'), ("429", "slow down")),
        (drop(), ("disconnected", None)),
        (drop_after(2), ("disconnected", None)),
        (status(200, b'data: {"error": {"message": "engine went away"}}\n\n'), ("stream_error", "engine went away")),
        (hang(), ("timeout", "no answer within the read timeout")),
    ],
)
def test_each_way_a_request_fails_has_its_status(behaviour: Any, expected: tuple[str, str | None]) -> None:
    with FakeEngine() as engine:
        engine.script.append(behaviour)
        config = BenchConfig((Target("t", (engine.url,)),), workload(requests=3), concurrency=1, timeout_s=1.0)
        result = run_bench(config)
    statuses = [(r.status, r.error if expected[1] is not None else None) for r in result.runs[0].records]
    assert statuses == [expected, ("ok", None), ("ok", None)]


def test_a_gateway_target_reports_its_loads_and_evictions_over_the_run(registry: Any, adapter_dirs: list[Path]) -> None:
    registry.push(adapter_dirs[0], "a", "tiny")
    registry.push(adapter_dirs[1], "b", "tiny")
    spec = workload(adapters=("a", "b"), zipf=0.0, requests=30, base_share=0.2, seed=1)
    adapter_sequence = [r.model for r in build_requests(spec) if r.rank > 0]
    switches = sum(1 for i, m in enumerate(adapter_sequence) if i == 0 or m != adapter_sequence[i - 1])
    with (
        FakeEngine() as engine,
        fake_gateway([engine], registry, external={"urls": [engine.url], "max_loras": 1, "max_cpu_loras": 1}) as (
            url,
            _,
        ),
    ):
        # One slot and one request at a time: every change of adapter is one load and (after the first) one eviction.
        config = BenchConfig((Target("gw", (url,)),), spec, concurrency=1, metrics_interval_s=0.05)
        result = run_bench(config)
    gateway = result.to_json()["targets"]["gw"]["gateway"]
    assert set(gateway) == GATEWAY_KEYS
    assert (gateway["loads"], gateway["evictions"], gateway["load_failures"]) == (switches, switches - 1, 0)
    assert gateway["hit_ratio"] == pytest.approx(1 - switches / len(adapter_sequence))
    assert list(gateway["loads_by_engine"].values()) == [switches]
    assert result.to_json()["targets"]["gw"]["requests_by_engine"] == {engine.url: 30}  # the gateway's header
    assert {record.engine for record in result.runs[0].records} == {engine.url}
    series = [point.values["loads"] for _, point in result.runs[0].series]
    assert series == sorted(series) and all(loads <= switches for loads in series)


EXPOSITION = """\
# HELP loragate_adapter_loads_total Adapter loads.
loragate_adapter_loads_total{adapter="a",engine="http://e1",version="1"} 3.0
loragate_adapter_loads_total{adapter="b",engine="http://e1",version="1"} 2.0
loragate_adapter_loads_total{adapter="a",engine="http://e2",version="1"} 1.0
loragate_adapter_evictions_total{adapter="a",engine="http://e1",version="1"} 4.0
loragate_adapter_load_seconds_sum{adapter="a",engine="http://e1"} 1.5
loragate_adapter_load_seconds_count{adapter="a",engine="http://e1"} 6.0
loragate_requests_total{adapter="a",error_code="",route="chat",status_class="2xx",version="1"} 9.0
"""


def test_the_adapter_counters_are_summed_over_labels_and_engines() -> None:
    counters = parse_counters(EXPOSITION)
    assert counters is not None
    assert (counters.values["loads"], counters.values["evictions"], counters.values["load_failures"]) == (6, 4, 0)
    assert (counters.values["load_seconds_sum"], counters.values["load_seconds_count"]) == (1.5, 6)
    assert counters.loads_by_engine == {"http://e1": 5, "http://e2": 1}
    later = Counters({**counters.values, "loads": 9.0}, {"http://e1": 5, "http://e2": 4})
    assert later.minus(counters).values["loads"] == 3 and later.minus(counters).loads_by_engine == {"http://e2": 3}
    assert parse_counters("vllm:num_requests_running 0.0\n") is None


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 50, None), ([3.0], 99, 3.0), ([1.0, 2.0], 50, 1.5), ([float(i) for i in range(1, 101)], 99, 99.01)],
)
def test_percentiles_interpolate_between_ranks(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == (pytest.approx(expected) if expected is not None else None)


def test_the_command_writes_its_json_plot_and_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    with FakeEngine() as first, FakeEngine() as second:
        argv = ["bench", "--target", f"a={first.url}", "--target", f"a-2={first.url}", "--target", f"b={second.url}"]
        argv += ["--adapters", "x,y,z", "--base-model", "tiny", "--requests", "24", "--concurrency", "3"]
        argv += ["--rounds", "2", "--slo-ttft-s", "30", "--ignore-eos", "--json", str(tmp_path / "r.json")]
        argv += ["--plot", str(tmp_path / "r.png"), "--write-trace", str(tmp_path / "t.jsonl")]
        assert main(argv) == 0
        assert len(first.seen) == 2 * 2 * 24 and len(second.seen) == 2 * 24
    out, err = capsys.readouterr()
    document = json.loads((tmp_path / "r.json").read_text())
    assert list(document["targets"]) == ["a", "a-2", "b"]
    assert all(t["overall"]["ok"] == 48 for t in document["targets"].values())
    assert out.splitlines()[1].split()[:2] == ["target", "ok/sent"] and "SLO" in out.splitlines()[1]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 24
    assert "wrote 24 requests" in err and err.count("round ") == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapters", " , "], "error: no adapters"),
        (["--adapters", "a", "--max-tokens", "uniform:9:3"], "error: length 'uniform:9:3'"),
        (["--adapters", "a", "--prompt-tokens", "many"], "error: length 'many'"),
        (["--adapters-prefix", "a"], "error: --adapters-prefix needs --num-adapters"),
        (["--adapters", "a", "--base-share", "0.2"], "error: --base-share needs --base-model"),
        (["--adapters", "a", "--extra-body", "[1]"], "error: --extra-body: a JSON object expected"),
        (["--adapters", "a", "--concurrency", "0"], "error: --concurrency must be at least 1"),
        (["--adapters", "a", "--rate", "0"], "error: Poisson arrivals need a rate"),
        (["--adapters", "a", "--duration-s", "0"], "error: --duration-s must be above 0 and --drain-s at least 0"),
        (["--adapters", "a", "--duration-s", "5", "--drain-s", "-1"], "error: --duration-s must be above 0"),
        (["--adapters", "a", "--metrics-url", "other=http://127.0.0.1:1"], "error: --metrics-url"),
        (["--trace", "TRACE"], "error: TRACE line 2: missing prompt_tokens, output_tokens"),
        (["--adapters-file", "MISSING"], "error: MISSING: No such file or directory"),
        (["--adapters", "a", "--json", "MISSING/r.json"], "error: MISSING/r.json: its folder does not exist"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"time": 0, "adapter": "a", "prompt_tokens": 1, "output_tokens": 1}\n{"time": 1, "adapter": "a"}\n'
    )
    args = [a.replace("TRACE", str(trace)).replace("MISSING", str(tmp_path / "nope")) for a in args]
    message = message.replace("TRACE", str(trace)).replace("MISSING", str(tmp_path / "nope"))
    with FakeEngine() as engine:
        assert main(["bench", "--target", f"t={engine.url}", *args]) == 2
        assert engine.seen == []
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(message), err


def test_a_plot_without_matplotlib_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("loragate.bench.plot.matplotlib_missing", lambda: True)
    with FakeEngine() as engine:
        assert main(["bench", "--target", f"t={engine.url}", "--adapters", "a", "--plot", str(tmp_path / "p.png")]) == 2
        assert engine.seen == []
    assert (
        capsys.readouterr().err
        == "error: the plot needs matplotlib: pip install 'loragate[bench]' (or 'matplotlib>=3.8,<4')\n"
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no-equals-sign", "error: --target 'no-equals-sign': expected NAME=URL"),
        ("t=ftp://127.0.0.1:1", "error: 'ftp://127.0.0.1:1': not an http(s) URL"),
        ("t=http://127.0.0.1:PORT", "error: target t: cannot reach http://127.0.0.1:PORT: "),
    ],
)
def test_bad_or_unreachable_targets_are_one_line(target: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    port = str(free_port())
    assert main(["bench", "--target", target.replace("PORT", port), "--adapters", "a"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(message.replace("PORT", port)), err


def test_around_wraps_every_run_and_its_warmup() -> None:
    """`around(target, round)` is entered before each run of a target (its warm-up included) and left after it;
    here it starts a fresh engine for every run, which then saw exactly the warm-up and that run's requests."""
    ports = {"x": free_port(), "y": free_port()}
    events: list[tuple[str, str, int]] = []
    seen: list[int] = []

    @contextlib.asynccontextmanager
    async def around(target: Target, round_: int) -> AsyncIterator[None]:
        events.append(("enter", target.name, round_))
        with FakeEngine(port=ports[target.name]) as engine:
            yield
        seen.append(len(engine.seen))
        events.append(("exit", target.name, round_))

    targets = tuple(Target(name, (f"http://127.0.0.1:{port}",)) for name, port in ports.items())
    config = BenchConfig(targets, WorkloadSpec(adapters=ADAPTERS, requests=10), concurrency=2, rounds=2, warmup=3)
    result = run_bench(config, around=around)
    assert seen == [13] * 4
    assert [what for what, _, _ in events] == ["enter", "exit"] * 4
    entered = [(name, round_) for what, name, round_ in events if what == "enter"]
    assert entered == [(name, round_) for round_, order in enumerate(result.orders) for name in order]
    assert [len(run.records) for run in result.runs] == [10] * 4
    assert all(record.ok for run in result.runs for record in run.records)


@pytest.mark.parametrize("arrivals", ["closed", "poisson"])
def test_a_run_of_limited_duration_sends_nothing_late_and_cuts_what_is_unanswered(arrivals: str) -> None:
    """A hung request and a long stream are cut at duration + drain and kept (the hung one's wait counting as its
    TTFT, a lower bound; the stream's first token as its own); no request is sent after the duration, and the
    requests never sent are not counted, in the records or the hit ratio's denominator."""
    spec = workload(requests=2000, zipf=0.0, base_share=0.0)
    if arrivals == "poisson":
        spec = workload(requests=2000, zipf=0.0, base_share=0.0, arrivals="poisson", rate=400.0)
    with FakeEngine() as engine:
        engine.script.extend([hang(), stream(events=200, gap_s=0.05)])
        config = BenchConfig(
            (Target("t", (engine.url,)),), spec, concurrency=3, timeout_s=30.0, duration_s=0.4, drain_s=0.3
        )
        result = run_bench(config)
        document = result.to_json()
    records = result.runs[0].records
    # the fake engine takes its script in the order requests reach it, which concurrent sends need not keep: the
    # hung and the streamed request are told apart by what they received, not by their index
    cut = [r for r in records if r.status == "cut"]
    hung = [r for r in cut if r.ttft_s is None]
    streamed = [r for r in cut if r.ttft_s is not None]
    assert len(hung) == 1 and len(streamed) == 1 and streamed[0].ttft_s is not None and streamed[0].ttft_s < 0.4
    assert all(r.ok for r in records if r.status != "cut")
    # sent_s is read when the request goes out, a few microseconds after the runner checked the deadline
    assert 2 < len(records) < 2000 and max(r.sent_s for r in records) < 0.4 + 0.005
    assert 0.7 <= result.runs[0].duration_s < 5
    overall = document["targets"]["t"]["overall"]
    assert overall["failures"] == {"cut": 2}
    assert overall["ttft_s"]["p99"] is not None and max(r.e2e_s or 0 for r in records) >= 0.6
    assert hung[0].e2e_s is not None and hung[0].e2e_s >= 0.6
    assert document["config"]["duration_s"] == 0.4
    assert "at most 0.4 s each, cut 0.3 s later" in render_text(document).splitlines()[0]
