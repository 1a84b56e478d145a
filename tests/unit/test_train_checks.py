"""Post-training checks on the tiny model: an adapter trained under reentrant gradient checkpointing without input
gradients (the silent PEFT failure) keeps every lora_B at zero and the check says so; the suite's trained run passes
every check; the loss trend and the selective-checkpointing flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.training import TrainedRun
from training.checks import failures, loss_trend, run_checks, summary, training_losses
from training.model import checkpoint_layers
from training.recipe import ChecksSpec


def _peft_steps(tiny_model: Path, input_grads: bool, steps: int = 2) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if input_grads:
        model.enable_input_require_grads()
    else:
        model.base_model.model.disable_input_require_grads()  # what a hand-rolled loop forgets
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(10, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    history = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        if loss.requires_grad:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"loss": float(loss)})
    return model, history


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_lora_b_check_catches_an_adapter_that_learned_nothing(tiny_model: Path) -> None:
    model, history = _peft_steps(tiny_model, input_grads=False)
    checks = run_checks(model, history, stop_rate=0.0)
    assert checks["lora_b_nonzero"]["total"] == 14  # 2 layers x 7 projections
    assert checks["lora_b_nonzero"]["zero_count"] == 14 and checks["lora_b_nonzero"]["ok"] is False
    problems = failures(checks, ChecksSpec())
    assert problems[0].startswith("14 of 14 lora_B matrices are still all zero (e.g. base_model.model.model.layers.0.")
    assert "gradient checkpointing without input gradients?" in problems[0]
    assert failures(checks, ChecksSpec(lora_b_nonzero=False, loss_fell=False)) == []

    trained, history = _peft_steps(tiny_model, input_grads=True)
    checks = run_checks(trained, history, stop_rate=1.0)
    assert checks["lora_b_nonzero"] == {"ok": True, "total": 14, "zero": [], "zero_count": 0}


@pytest.mark.slow
def test_the_suites_trained_run_passes_its_checks(tiny_lora_run: TrainedRun) -> None:
    checks = tiny_lora_run.metrics["checks"]
    assert checks["lora_b_nonzero"] == {"ok": True, "total": 14, "zero": [], "zero_count": 0}
    assert checks["loss_fell"]["ok"] is True and checks["loss_fell"]["last"] < checks["loss_fell"]["first"]
    assert checks["loss_fell"]["points"] == 27  # 276 steps logged every 10
    assert checks["stop_rate"] == tiny_lora_run.metrics["adapter"]["stop_rate"]
    assert (tiny_lora_run.output_dir / "plan.json").is_file()
    assert "post-training checks: lora_B non-zero 14/14; loss " in (tiny_lora_run.output_dir / "train.log").read_text()


@pytest.mark.parametrize(
    ("losses", "first", "last", "fell"),
    [
        ([3.0, 2.0, 1.0, 0.5], 3.0, 0.5, True),
        ([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7], 1.05, 1.65, False),
        ([2.0, 1.0], 2.0, 1.0, True),
        ([2.0], 2.0, None, None),
        ([], None, None, None),
    ],
)
def test_loss_trend(losses: list[float], first: float | None, last: float | None, fell: bool | None) -> None:
    trend = loss_trend(losses)
    assert trend.first == pytest.approx(first) if first is not None else trend.first is None
    assert trend.last == pytest.approx(last) if last is not None else trend.last is None
    assert trend.fell is fell


def test_training_losses_skip_eval_and_summary() -> None:
    history = [{"loss": 2.0, "step": 1}, {"eval_loss": 1.5}, {"loss": 1.0}, {"train_loss": 1.4, "loss": 9.0}]
    assert training_losses(history) == [2.0, 1.0]


def test_summary_line() -> None:
    checks = {
        "lora_b_nonzero": {"ok": True, "total": 224, "zero": [], "zero_count": 0},
        "loss_fell": {"ok": True, "first": 12.588, "last": 12.267, "points": 6},
        "stop_rate": 0.0,
    }
    assert summary(checks) == (
        "post-training checks: lora_B non-zero 224/224; loss 12.588 -> 12.267 (fell); stop rate 0.00"
    )
    failed = {**checks, "loss_fell": {"ok": False, "first": 1.0, "last": 1.2, "points": 8}}
    assert failures(failed, ChecksSpec()) == ["the training loss did not fall (1.0000 -> 1.2000)"]


def test_checkpoint_every_nth_layer(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.gradient_checkpointing_enable()
    assert checkpoint_layers(model, 1) == [True, True]
    assert checkpoint_layers(model, 2) == [True, False]
    model.gradient_checkpointing_disable()
    assert checkpoint_layers(model, 1) == [False, False]  # never turns checkpointing on by itself
