"""Trainer callbacks: generation metrics on the eval split after every evaluation, and early stopping."""

from __future__ import annotations

import logging
from typing import Any

from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback, TrainerCallback

from training.data import Row
from training.evaluate import generate, score
from training.recipe import EarlyStopping, EvalSpec

log = logging.getLogger(__name__)


class GenerationEval(TrainerCallback):  # type: ignore[misc]
    """Adds eval_exact_match, eval_stop_rate (and eval_format_compliance) to each evaluation's metrics.

    It must run before EarlyStoppingCallback, which may watch one of these metrics.
    """

    def __init__(self, rows: list[Row], spec: EvalSpec, contract: dict[str, Any] | None, tokenizer: Any) -> None:
        self.rows = rows[: spec.max_examples]
        self.spec = spec
        self.contract = contract
        self.tokenizer = tokenizer
        self.history: list[dict[str, Any]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, metrics = kwargs.get("model"), kwargs.get("metrics")
        if model is None or metrics is None or not self.rows:
            return
        generations = generate(model, self.tokenizer, self.rows, self.spec)
        scored = {f"eval_{k}": v for k, v in score(generations, self.rows, self.contract).items()}
        metrics.update(scored)
        self.history.append(scored)
        log.info("epoch %.2f: %s", state.epoch or 0.0, ", ".join(f"{k} {v:.3f}" for k, v in scored.items()))


class LogToFile(TrainerCallback):  # type: ignore[misc]
    """The trainer's periodic logs (loss, learning rate, eval metrics) as log records, so train.log has them."""

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        logs = kwargs.get("logs") or {}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
        log.info("step %s/%s: %s", state.global_step, state.max_steps, shown)


class ProgressBars(ProgressCallback):  # type: ignore[misc]
    """transformers' progress bars without its printed copy of every log dict: `LogToFile` logs those once."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        return None


def console_callbacks(trainer: Any) -> None:
    """Swaps the trainer's console printers (bars plus raw dicts, or bare dicts) for bars alone."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(ProgressBars)


def early_stopping(spec: EarlyStopping) -> list[Any]:
    if spec.patience is None:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=spec.patience, early_stopping_threshold=spec.threshold)]
