"""What the gateway reads from a vLLM engine's `/metrics` text: its request queue and the LoRA adapters in its
running batch, parsed once per health probe with prometheus_client's text parser.

Only the families read here are handed to the parser: a vLLM exposition is about 600 lines, 8 ms to parse whole on
the event loop at every probe of every engine, and these few lines take well under one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
LORA_INFO = "vllm:lora_requests_info"
_FAMILIES = (RUNNING, WAITING, LORA_INFO)


@dataclass(frozen=True)
class EngineMetrics:
    running: int = 0  # requests in the engine's running batch, summed over label sets
    waiting: int = 0  # requests queued in the engine, summed over label sets
    # engine names of the adapters in the running batch (on the accelerator now); None: not reported
    running_adapters: frozenset[str] | None = None


def parse_engine_metrics(text: str) -> EngineMetrics:
    """The queue and running adapters in vLLM's Prometheus text. vLLM keeps one `lora_requests_info` sample per label
    set, valued with the time it was set, so the newest sample is the current one. Text that does not parse reads as
    nothing reported (with a warning)."""
    totals = {RUNNING: 0.0, WAITING: 0.0}
    newest: tuple[float, str] | None = None
    try:
        for family in text_string_to_metric_families(_wanted_lines(text)):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
                    continue
                adapters = sample.labels.get("running_lora_adapters") if sample.name == LORA_INFO else None
                if adapters is not None and (newest is None or sample.value > newest[0]):
                    newest = (sample.value, adapters)
    except ValueError as exc:
        log.warning("engine /metrics text does not parse (%s); reading it as nothing reported", exc)
        return EngineMetrics()
    running = None if newest is None else frozenset(name for name in newest[1].split(",") if name)
    return EngineMetrics(int(totals[RUNNING]), int(totals[WAITING]), running)


def _wanted_lines(text: str) -> str:
    """The HELP, TYPE and sample lines of the families read here (and of any family whose name starts alike)."""
    wanted = (
        line for line in text.splitlines() if line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith(_FAMILIES)
    )
    return "\n".join(wanted) + "\n"
