"""loragate.bench.workload: Zipf popularity, lengths, arrivals, traces and prompts, as tables."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter

import pytest

from loragate.bench.workload import (
    WORDS,
    BenchRequest,
    Lengths,
    TraceRow,
    WorkloadError,
    WorkloadSpec,
    build_requests,
    parse_trace,
    popularity_ranks,
    prompt_text,
    trace_lines,
    zipf_weights,
)

ADAPTERS = tuple(f"a{i}" for i in range(8))


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.1, 2.0])
def test_zipf_weights_fall_as_rank_to_the_minus_alpha(alpha: float) -> None:
    weights = zipf_weights(8, alpha)
    assert sum(weights) == pytest.approx(1.0)
    for k in range(1, 8):
        assert weights[0] / weights[k] == pytest.approx((k + 1) ** alpha)


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.1, 2.0])
def test_sampled_adapters_follow_zipf_within_a_percent(alpha: float) -> None:
    requests = build_requests(WorkloadSpec(adapters=ADAPTERS, zipf=alpha, requests=40_000, seed=7))
    counts = Counter(r.model for r in requests)
    for name, weight in zip(ADAPTERS, zipf_weights(8, alpha), strict=True):
        assert abs(counts[name] / len(requests) - weight) < 0.01, (name, counts[name])
    assert all(r.rank == ADAPTERS.index(r.model) + 1 for r in requests)


def test_the_base_model_gets_its_share_and_rank_zero() -> None:
    spec = WorkloadSpec(adapters=ADAPTERS, requests=20_000, base_model="tiny", base_share=0.25, seed=3)
    requests = build_requests(spec)
    base = [r for r in requests if r.model == "tiny"]
    assert abs(len(base) / len(requests) - 0.25) < 0.01
    assert {r.rank for r in base} == {0}


def test_the_same_seed_gives_the_same_sequence_and_another_seed_another() -> None:
    spec = WorkloadSpec(
        adapters=ADAPTERS,
        requests=500,
        base_model="tiny",
        base_share=0.1,
        prompt_tokens=Lengths.parse("uniform:8:64"),
        output_tokens=Lengths.parse("lognormal:32:0.5"),
        arrivals="poisson",
        rate=10.0,
        seed=11,
    )
    assert build_requests(spec) == build_requests(spec)
    other = build_requests(WorkloadSpec(**{**spec.__dict__, "seed": 12}))
    assert [r.model for r in other] != [r.model for r in build_requests(spec)]


def test_poisson_arrivals_start_at_zero_and_average_one_over_the_rate() -> None:
    requests = build_requests(WorkloadSpec(adapters=ADAPTERS, requests=20_000, arrivals="poisson", rate=50.0))
    times = [r.at_s or 0.0 for r in requests]
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential: sd = mean


def test_a_closed_loop_has_no_arrival_times() -> None:
    assert {r.at_s for r in build_requests(WorkloadSpec(adapters=ADAPTERS, requests=50))} == {None}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64", Lengths("fixed", 64)),
        ("fixed:7", Lengths("fixed", 7)),
        ("uniform:8:16", Lengths("uniform", 8, 16)),
        ("uniform:5:5", Lengths("uniform", 5, 5)),
        ("lognormal:100:0.5", Lengths("lognormal", 100, 0.5)),
    ],
)
def test_length_specs_parse_and_print_back(text: str, expected: Lengths) -> None:
    assert Lengths.parse(text) == expected
    assert Lengths.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["0", "-3", "2.5", "abc", "uniform:9:3", "uniform:1.5:3", "uniform:4", "lognormal:0:1", "normal:3:1", ""]
)
def test_bad_length_specs_are_refused(text: str) -> None:
    with pytest.raises(WorkloadError, match="length"):
        Lengths.parse(text)


def test_sampled_lengths_stay_in_their_ranges() -> None:
    import random

    rng = random.Random(0)
    uniform = [Lengths("uniform", 8, 16).sample(rng) for _ in range(5000)]
    assert (min(uniform), max(uniform)) == (8, 16)
    lognormal = [Lengths("lognormal", 100, 1.0).sample(rng) for _ in range(20_000)]
    assert min(lognormal) >= 1 and max(lognormal) <= 800
    assert statistics.median(lognormal) == pytest.approx(100, rel=0.05)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (WorkloadSpec(adapters=()), "no adapters"),
        (WorkloadSpec(adapters=("a", "a")), "distinct"),
        (WorkloadSpec(adapters=ADAPTERS, base_share=0.2), "base model"),
        (WorkloadSpec(adapters=ADAPTERS, base_model="tiny", base_share=1.5), "within 0..1"),
        (WorkloadSpec(adapters=ADAPTERS, zipf=-1), "Zipf"),
        (WorkloadSpec(adapters=ADAPTERS, requests=0), "at least 1"),
        (WorkloadSpec(adapters=ADAPTERS, arrivals="poisson"), "rate"),
        (WorkloadSpec(trace=()), "no requests"),
    ],
)
def test_workloads_that_cannot_be_built(spec: WorkloadSpec, message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        build_requests(spec)


def test_base_only_is_a_workload() -> None:
    requests = build_requests(WorkloadSpec(base_model="tiny", base_share=1.0, requests=5))
    assert [(r.model, r.rank) for r in requests] == [("tiny", 0)] * 5


TRACE = """\
# a comment, then a blank line

{"time": 1.5, "adapter": "b", "prompt_tokens": 10, "output_tokens": 3}
{"time": 0.5, "adapter": "a", "prompt_tokens": 20, "output_tokens": 4, "extra": "ignored"}
{"time": 2, "adapter": "tiny", "prompt_tokens": 5, "output_tokens": 1}
{"time": 3.0, "adapter": "b", "prompt_tokens": 7, "output_tokens": 2}
"""


def test_a_trace_is_replayed_in_time_order_from_its_first_request() -> None:
    rows = parse_trace(TRACE.splitlines())
    assert rows[1] == TraceRow(0.5, "a", 20, 4)
    requests = build_requests(WorkloadSpec(trace=tuple(rows), base_model="tiny", arrivals="trace", requests=10))
    assert requests == [
        BenchRequest(0, "a", 2, 20, 4, 0.0),
        BenchRequest(1, "b", 1, 10, 3, 1.0),
        BenchRequest(2, "tiny", 0, 5, 1, 1.5),
        BenchRequest(3, "b", 1, 7, 2, 2.5),
    ]
    first_two = build_requests(WorkloadSpec(trace=tuple(rows), arrivals="closed", requests=2))
    assert [(r.model, r.at_s) for r in first_two] == [("a", None), ("b", None)]


def test_a_written_workload_reads_back_as_the_same_trace() -> None:
    spec = WorkloadSpec(adapters=ADAPTERS, requests=50, arrivals="poisson", rate=5.0, seed=2)
    requests = build_requests(spec)
    replayed = build_requests(WorkloadSpec(trace=tuple(parse_trace(trace_lines(requests))), arrivals="trace"))
    assert [(r.model, r.prompt_tokens, r.output_tokens) for r in replayed] == [
        (r.model, r.prompt_tokens, r.output_tokens) for r in requests
    ]
    assert [r.at_s for r in replayed] == pytest.approx([r.at_s for r in requests], abs=1e-6)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "t.jsonl line 2: not JSON"),
        ("[1, 2]", "line 2: a JSON object expected"),
        ('{"time": 1, "adapter": "a"}', "line 2: missing prompt_tokens, output_tokens"),
        ('{"time": -1, "adapter": "a", "prompt_tokens": 1, "output_tokens": 1}', "line 2: time must be"),
        ('{"time": "0", "adapter": "a", "prompt_tokens": 1, "output_tokens": 1}', "line 2: time must be"),
        ('{"time": true, "adapter": "a", "prompt_tokens": 1, "output_tokens": 1}', "line 2: time must be"),
        ('{"time": 0, "adapter": "", "prompt_tokens": 1, "output_tokens": 1}', "line 2: adapter must be"),
        ('{"time": 0, "adapter": 3, "prompt_tokens": 1, "output_tokens": 1}', "line 2: adapter must be"),
        ('{"time": 0, "adapter": "a", "prompt_tokens": 0, "output_tokens": 1}', "line 2: prompt_tokens must be"),
        ('{"time": 0, "adapter": "a", "prompt_tokens": 1, "output_tokens": 1.5}', "line 2: output_tokens must be"),
    ],
)
def test_malformed_trace_lines_are_named_by_number(line: str, message: str) -> None:
    good = '{"time": 0, "adapter": "a", "prompt_tokens": 1, "output_tokens": 1}'
    with pytest.raises(WorkloadError, match=message):
        parse_trace([good, line], "t.jsonl")


def test_popularity_ranks_count_requests_and_break_ties_by_name() -> None:
    ranks = popularity_ranks(["c", "b", "c", "a", "tiny", "b", "c"], base_model="tiny")
    assert ranks == {"c": 1, "b": 2, "a": 3, "tiny": 0}


def test_prompts_have_the_requested_length_and_a_text_per_salt() -> None:
    request = BenchRequest(3, "a0", 1, 40, 8, None)
    text = prompt_text(request, "0:0:gw")
    assert len(text.split()) == 40 and set(text.split()) <= set(WORDS)
    assert prompt_text(request, "0:0:gw") == text
    assert prompt_text(request, "0:0:rr") != text
    assert prompt_text(BenchRequest(4, "a0", 1, 40, 8, None), "0:0:gw") != text
