"""Merging what the training module produced: the shipped tiny recipe trained with QLoRA (T's session fixture),
merged into the dequantized NF4 base it was trained on, versus the original base."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.training import TrainedRun
from training.merge import MergeOptions, merge_adapter

pytestmark = pytest.mark.slow


def test_trained_qlora_adapter_merges_into_dequantized_base(tiny_qlora_run: TrainedRun, tmp_path: Path) -> None:
    recipe = tiny_qlora_run.info["recipe"]
    assert recipe["quantization"]["enabled"] is True
    training = {"hyperparameters": {"qlora": True, "quantization": recipe["quantization"]}}
    base = Path(tiny_qlora_run.info["base_path"])

    merged = merge_adapter(base, tiny_qlora_run.adapter_dir, tmp_path / "deq", training=training)
    original = merge_adapter(
        base,
        tiny_qlora_run.adapter_dir,
        tmp_path / "orig",
        MergeOptions(qlora_base="original", force=True),
        training=training,
    )
    assert merged.merge_base == "dequantized"
    assert merged.report.passed
    assert merged.report.greedy_agreement >= 0.99
    assert merged.report.mean_token_kl < original.report.mean_token_kl
