"""The benchmark's request sequence, built from a seed with no I/O: which model each request asks for (Zipf
popularity over the adapters, a share for the base model, or a trace), its prompt and output lengths, and when it
arrives (Poisson, the trace's times, or not at all for a closed loop).

Trace files are JSON Lines, one request per line, in arrival order or not (they are sorted by time):

    {"time": 0.125, "adapter": "support-bot", "prompt_tokens": 512, "output_tokens": 128}

`time` is seconds from the start, `adapter` the model name sent (an adapter, or the base model's name), the
lengths positive integers. Blank lines and lines starting with `#` are skipped; other keys are ignored.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Arrivals = Literal["closed", "poisson", "trace"]

# Words that are one token each in the tiny model's vocabulary and in the common BPE vocabularies (with their
# leading space), so a prompt of n words is about n tokens; the usage in each answer says how many it really was.
_WORD_LIST = (
    "the of and to in is for on that with as at by from it be this are have not or an they which you one but all "
    "we can has there more will their if also other some time than only its new these may any use such make"
)
WORDS = tuple(_WORD_LIST.split())


class WorkloadError(ValueError):
    """A workload that cannot be built: bad length spec, empty adapter list, malformed trace."""


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: `fixed:N` (or just `N`), `uniform:LO:HI` (inclusive), `lognormal:MEDIAN:SIGMA`
    (clamped to 1..8 x MEDIAN)."""

    kind: Literal["fixed", "uniform", "lognormal"]
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Lengths:
        kind, _, rest = text.partition(":") if ":" in text else ("fixed", "", text)
        try:
            numbers = [float(part) for part in rest.split(":")]
        except ValueError:
            raise WorkloadError(
                f"length {text!r}: numbers expected (N, uniform:LO:HI, lognormal:MEDIAN:SIGMA)"
            ) from None
        if kind == "fixed" and len(numbers) == 1 and numbers[0] >= 1 and numbers[0].is_integer():
            return cls("fixed", numbers[0])
        uniform = kind == "uniform" and len(numbers) == 2 and 1 <= numbers[0] <= numbers[1]
        if uniform and all(n.is_integer() for n in numbers):
            return cls("uniform", numbers[0], numbers[1])
        if kind == "lognormal" and len(numbers) == 2 and numbers[0] >= 1 and numbers[1] >= 0:
            return cls("lognormal", numbers[0], numbers[1])
        raise WorkloadError(
            f"length {text!r}: expected N >= 1, uniform:LO:HI with 1 <= LO <= HI, or lognormal:MEDIAN:SIGMA"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        value = self.a * math.exp(self.b * rng.gauss(0.0, 1.0))
        return max(1, min(round(value), round(8 * self.a)))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"lognormal:{self.a:g}:{self.b:g}"


@dataclass(frozen=True)
class TraceRow:
    time: float
    adapter: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    adapters: tuple[str, ...] = ()  # most popular first: Zipf rank = position + 1
    zipf: float = 1.0
    requests: int = 100
    base_model: str | None = None
    base_share: float = 0.0  # of requests sent to `base_model`
    prompt_tokens: Lengths = Lengths("fixed", 64)
    output_tokens: Lengths = Lengths("fixed", 64)
    arrivals: Arrivals = "closed"
    rate: float | None = None  # requests/s, for "poisson"
    trace: tuple[TraceRow, ...] | None = None  # replaces the adapters, popularity and lengths above
    seed: int = 0


@dataclass(frozen=True)
class BenchRequest:
    index: int
    model: str
    rank: int  # popularity rank among the adapters (1 = most popular); 0 for the base model
    prompt_tokens: int
    output_tokens: int
    at_s: float | None  # arrival time from the start; None in a closed loop


def zipf_weights(n: int, alpha: float) -> list[float]:
    """P(rank k) for k = 1..n, proportional to k^-alpha (alpha 0: uniform)."""
    raw = [k**-alpha for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def build_requests(spec: WorkloadSpec) -> list[BenchRequest]:
    """The request sequence of `spec`; the same spec gives the same sequence on every call and machine."""
    if spec.requests < 1:
        raise WorkloadError("--requests must be at least 1")
    if spec.arrivals == "poisson" and not (spec.rate and spec.rate > 0):
        raise WorkloadError("Poisson arrivals need a rate above 0 (--rate)")
    if spec.trace is not None:
        return _from_trace(spec)
    if not spec.adapters and not (spec.base_model and spec.base_share >= 1):
        raise WorkloadError("no adapters to send requests to")
    if len(set(spec.adapters)) != len(spec.adapters):
        raise WorkloadError("adapter names must be distinct")
    if not 0 <= spec.base_share <= 1 or (spec.base_share > 0 and not spec.base_model):
        raise WorkloadError("the base-model share must be within 0..1 and needs a base model name")
    if spec.zipf < 0:
        raise WorkloadError("the Zipf exponent must be at least 0")
    rng = random.Random(spec.seed)
    cumulative = list(itertools.accumulate(zipf_weights(len(spec.adapters), spec.zipf))) if spec.adapters else []
    requests: list[BenchRequest] = []
    at = 0.0
    for index in range(spec.requests):
        if spec.base_model and rng.random() < spec.base_share:
            model, rank = spec.base_model, 0
        else:
            rank = min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(cumulative) - 1) + 1
            model = spec.adapters[rank - 1]
        prompt, output = spec.prompt_tokens.sample(rng), spec.output_tokens.sample(rng)
        arrival: float | None = None
        if spec.arrivals == "poisson":
            at += rng.expovariate(spec.rate or 1.0) if index else 0.0
            arrival = at
        requests.append(BenchRequest(index, model, rank, prompt, output, arrival))
    return requests


def _from_trace(spec: WorkloadSpec) -> list[BenchRequest]:
    rows = sorted(spec.trace or (), key=lambda row: row.time)[: spec.requests]
    if not rows:
        raise WorkloadError("the trace holds no requests")
    ranks = popularity_ranks((row.adapter for row in rows), base_model=spec.base_model)
    rng = random.Random(spec.seed)
    requests: list[BenchRequest] = []
    at = 0.0
    for index, row in enumerate(rows):
        arrival: float | None = None
        if spec.arrivals == "trace":
            arrival = row.time - rows[0].time
        elif spec.arrivals == "poisson":
            at += rng.expovariate(spec.rate or 1.0) if index else 0.0
            arrival = at
        requests.append(
            BenchRequest(index, row.adapter, ranks[row.adapter], row.prompt_tokens, row.output_tokens, arrival)
        )
    return requests


def popularity_ranks(models: Iterable[str], base_model: str | None = None) -> dict[str, int]:
    """Rank by request count (1 = most requested, ties by name); the base model gets 0."""
    counts = Counter(models)
    ordered = sorted((name for name in counts if name != base_model), key=lambda name: (-counts[name], name))
    ranks = {name: rank for rank, name in enumerate(ordered, start=1)}
    if base_model is not None and base_model in counts:
        ranks[base_model] = 0
    return ranks


def parse_trace(lines: Iterable[str], source: str = "trace") -> list[TraceRow]:
    rows: list[TraceRow] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{source} line {number}"
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise WorkloadError(f"{where}: a JSON object expected")
        missing = [key for key in ("time", "adapter", "prompt_tokens", "output_tokens") if key not in item]
        if missing:
            raise WorkloadError(f"{where}: missing {', '.join(missing)}")
        time, adapter, prompt, output = item["time"], item["adapter"], item["prompt_tokens"], item["output_tokens"]
        if isinstance(time, bool) or not isinstance(time, int | float) or not math.isfinite(time) or time < 0:
            raise WorkloadError(f"{where}: time must be a number of seconds >= 0")
        if not isinstance(adapter, str) or not adapter:
            raise WorkloadError(f"{where}: adapter must be a non-empty string")
        for key, value in (("prompt_tokens", prompt), ("output_tokens", output)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkloadError(f"{where}: {key} must be an integer >= 1")
        rows.append(TraceRow(float(time), adapter, prompt, output))
    return rows


def trace_lines(requests: Sequence[BenchRequest]) -> list[str]:
    """`requests` as trace lines (closed-loop requests get time 0), which `parse_trace` reads back."""
    return [
        json.dumps(
            {
                "time": round(r.at_s or 0.0, 6),
                "adapter": r.model,
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens,
            }
        )
        for r in requests
    ]


def prompt_text(request: BenchRequest, salt: str) -> str:
    """`request.prompt_tokens` words drawn from its index, the seed and `salt`. Each run (target x round) passes
    its own salt, so no run finds another's prompts in a shared engine's prefix cache; lengths stay the same."""
    rng = random.Random(f"{salt}:{request.index}")
    return " ".join(rng.choices(WORDS, k=request.prompt_tokens))
