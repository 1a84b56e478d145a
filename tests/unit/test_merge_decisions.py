"""Merge-and-export decisions: QLoRA detection, merge base, verdict, logit comparison, snippets, adapter config."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from training.merge import (
    EquivalenceReport,
    MergeError,
    QloraQuant,
    choose_merge_base,
    compare_logits,
    judge,
    qlora_quant,
    read_adapter_config,
)
from training.merge_cli import _fraction, gateway_config, helm_values


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        (None, None),
        ({}, None),
        ({"hyperparameters": None}, None),
        ({"hyperparameters": {"qlora": False}}, None),
        ({"hyperparameters": {"qlora": "true"}}, None),  # only a real boolean counts
        ({"hyperparameters": {"qlora": True}}, QloraQuant("nf4", True, "bfloat16")),
        (
            {"hyperparameters": {"qlora": True, "quantization": {"enabled": True, "double_quant": False}}},
            QloraQuant("nf4", False, "bfloat16"),
        ),
        (
            {
                "hyperparameters": {
                    "qlora": True,
                    "bnb_4bit_quant_type": "fp4",
                    "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": "float16",
                }
            },
            QloraQuant("fp4", True, "float16"),
        ),
    ],
)
def test_qlora_quant_reads_training_metadata(training: dict[str, Any] | None, expected: QloraQuant | None) -> None:
    assert qlora_quant(training) == expected


@pytest.mark.parametrize(
    ("quant", "option", "expected"),
    [
        (None, "dequantized", "original"),
        (None, "original", "original"),
        (QloraQuant(), "dequantized", "dequantized"),
        (QloraQuant(), "original", "original"),
    ],
)
def test_choose_merge_base(quant: QloraQuant | None, option: Any, expected: str) -> None:
    assert choose_merge_base(quant, option) == expected


@pytest.mark.parametrize(
    ("agreement", "threshold", "force", "expected"),
    [
        (1.0, 0.95, False, (True, False)),
        (0.95, 0.95, False, (True, False)),
        (0.94, 0.95, False, (False, False)),
        (0.94, 0.95, True, (False, True)),
        (0.99, 0.95, True, (True, False)),  # forcing a passing merge changes nothing
        (0.0, 0.0, False, (True, False)),
    ],
)
def test_judge(agreement: float, threshold: float, force: bool, expected: tuple[bool, bool]) -> None:
    assert judge(agreement, threshold, force) == expected


def test_compare_logits_identical() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    assert compare_logits(logits, logits.clone()) == (0.0, 0.0, 1.0, 2)


def test_compare_logits_values() -> None:
    ref = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    cand = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    max_diff, kl, agreement, positions = compare_logits(ref, cand)
    assert max_diff == 2.0
    assert positions == 2
    # Position 0 is identical (KL 0, argmax ties resolve to index 0 in both); position 1 swaps the two logits.
    p = math.exp(2) / (math.exp(2) + 1)
    expected_kl = (p * math.log(p / (1 - p)) + (1 - p) * math.log((1 - p) / p)) / 2
    assert kl == pytest.approx(expected_kl, rel=1e-5)
    assert agreement == 0.5


def test_report_summary_says_verdict() -> None:
    report = EquivalenceReport("base + adapter (PEFT)", 8, 128, 0.0123, 1.5e-6, 0.5, 0.95, passed=False, forced=True)
    text = report.summary()
    assert "greedy agreement 50.00% (threshold 95%)" in text
    assert "128 tokens of 8 probes" in text
    assert text.endswith("FORCED below threshold")


def test_read_adapter_config_errors(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match=r"no adapter_config\.json"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(MergeError, match="invalid JSON"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(MergeError, match="no peft_type"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(MergeError, match="peft_type PROMPT_TUNING cannot be merged"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert read_adapter_config(tmp_path)["r"] == 8


def test_snippets() -> None:
    assert gateway_config(base="bot-merged", public_name="bot", registry="/r") == {
        "base": "bot-merged",
        "base_name": "bot",
        "engines": {"enable_lora": False},
        "registry": "/r",
    }
    assert "registry" not in gateway_config(base="b", public_name="p", registry=None)
    assert helm_values(public_name="bot", model_dir_name="bot-merged") == {
        "baseModel": {"servedName": "bot"},
        "engine": {"model": "/models/bot-merged", "lora": {"enabled": False}},
    }


@pytest.mark.parametrize(("text", "expected"), [("0", 0.0), ("0.9", 0.9), ("1", 1.0)])
def test_fraction(text: str, expected: float) -> None:
    assert _fraction(text) == expected


@pytest.mark.parametrize("text", ["1.5", "-0.1", "high"])
def test_fraction_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _fraction(text)
