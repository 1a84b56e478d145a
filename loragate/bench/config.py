"""What one benchmark run is: its targets, its workload and how requests are sent. Plain data, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from loragate.bench.workload import WorkloadError, WorkloadSpec


class BenchError(Exception):
    """A benchmark that cannot run: bad configuration or an unreachable target."""


@dataclass(frozen=True)
class Target:
    """A named endpoint; with several URLs the requests go to them in turn (round-robin in send order)."""

    name: str
    urls: tuple[str, ...]
    metrics_urls: tuple[str, ...] = ()  # where /metrics is read when not at `urls` (a gateway's metrics_port)

    def __post_init__(self) -> None:
        object.__setattr__(self, "urls", tuple(server_root(url) for url in self.urls))
        object.__setattr__(self, "metrics_urls", tuple(server_root(url) for url in self.metrics_urls))

    @property
    def metrics_roots(self) -> tuple[str, ...]:
        return self.metrics_urls or self.urls

    @classmethod
    def parse(cls, text: str) -> Target:
        """`NAME=URL[,URL...]`; a URL is a server root or an OpenAI base URL ending in /v1."""
        name, sep, urls = text.partition("=")
        if not sep or not name.strip() or not urls.strip():
            raise BenchError(f"--target {text!r}: expected NAME=URL[,URL...]")
        return cls(name.strip(), tuple(url for url in urls.split(",") if url.strip()))


def server_root(url: str) -> str:
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BenchError(f"{url!r}: not an http(s) URL")
    return url.removesuffix("/v1")


@dataclass(frozen=True)
class BenchConfig:
    targets: tuple[Target, ...]
    workload: WorkloadSpec
    concurrency: int | None = 16  # closed loop: clients; open loop: the cap on requests in flight (None: none)
    rounds: int = 1
    ignore_eos: bool = False
    api_key: str | None = None
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    slo_ttft_s: float | None = None
    slo_e2e_s: float | None = None
    timeout_s: float = 600.0  # the longest wait for the next byte of an answer
    warmup: int = 0  # requests sent to each target before its first round, not measured
    metrics_interval_s: float = 60.0  # how often /metrics is read during a run (plus before and after)
    # a run sends for at most `duration_s`; what is still unanswered `drain_s` after that is cut (status "cut")
    duration_s: float | None = None
    drain_s: float = 30.0
    shuffle: bool = True  # each round's target order shuffled from the seed (False: as given, every round)

    def check(self) -> None:
        if not self.targets:
            raise BenchError("no targets (--target NAME=URL)")
        names = [target.name for target in self.targets]
        if len(set(names)) != len(names):
            raise BenchError(f"target names must be distinct: {', '.join(names)}")
        if any(not target.urls for target in self.targets):
            raise BenchError("every target needs at least one URL")
        if self.concurrency is not None and self.concurrency < 1:
            raise BenchError("--concurrency must be at least 1")
        if self.workload.arrivals == "closed" and not self.concurrency:
            raise BenchError("a closed loop needs --concurrency")
        if self.rounds < 1 or self.warmup < 0:
            raise BenchError("--rounds must be at least 1 and --warmup at least 0")
        for name, value in (("--slo-ttft-s", self.slo_ttft_s), ("--slo-e2e-s", self.slo_e2e_s)):
            if value is not None and value <= 0:
                raise BenchError(f"{name} must be above 0")
        if self.timeout_s <= 0 or self.metrics_interval_s <= 0:
            raise BenchError("timeouts and intervals must be above 0")
        if (self.duration_s is not None and self.duration_s <= 0) or self.drain_s < 0:
            raise BenchError("--duration-s must be above 0 and --drain-s at least 0")

    def describe(self) -> dict[str, Any]:
        """The configuration as JSON (what the result file records)."""
        w = self.workload
        return {
            "targets": {target.name: list(target.urls) for target in self.targets},
            "metrics_urls": {target.name: list(target.metrics_roots) for target in self.targets},
            "adapters": len(w.adapters) if w.trace is None else None,
            "zipf": w.zipf if w.trace is None else None,
            "trace": w.trace is not None,
            "requests": w.requests,
            "base_model": w.base_model,
            "base_share": w.base_share,
            "prompt_tokens": str(w.prompt_tokens) if w.trace is None else "trace",
            "output_tokens": str(w.output_tokens) if w.trace is None else "trace",
            "arrivals": w.arrivals,
            "rate": w.rate,
            "concurrency": self.concurrency,
            "rounds": self.rounds,
            "seed": w.seed,
            "ignore_eos": self.ignore_eos,
            "slo_ttft_s": self.slo_ttft_s,
            "slo_e2e_s": self.slo_e2e_s,
            "warmup": self.warmup,
            "duration_s": self.duration_s,
            "drain_s": self.drain_s if self.duration_s is not None else None,
        }


__all__ = ["BenchConfig", "BenchError", "Target", "WorkloadError", "WorkloadSpec"]
