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


class SelectiveCheckpointing(TrainerCallback):  # type: ignore[misc]
    """Gradient checkpointing on every n-th decoder layer only (`runtime.checkpoint_every`).

    The Trainer turns checkpointing on for every layer before `on_train_begin`; this turns it back off for the
    others, so they keep their activations (more memory, no recompute).
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.flags: list[bool] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from training.model import checkpoint_layers

        model = kwargs.get("model")
        if model is None:
            return
        self.flags = checkpoint_layers(model, self.every)
        log.info("gradient checkpointing on %s of %s decoder layers", sum(self.flags), len(self.flags))


class Throughput(TrainerCallback):  # type: ignore[misc]
    """Trained tokens per second (TRL's `num_tokens`: non-pad tokens) between logs, the first interval left out
    (it holds the warm-up), and the GPU's peak memory over the run."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "num_tokens" in logs and "eval_loss" not in logs:
            import time

            self.points.append((time.perf_counter(), float(logs["num_tokens"])))

    def summary(self) -> dict[str, float]:
        import torch

        out: dict[str, float] = {}
        if len(self.points) >= 3:
            (t0, n0), (t1, n1) = self.points[1], self.points[-1]
            out["trained_tokens_per_second"] = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        if torch.cuda.is_available():
            out["peak_vram_allocated_bytes"] = float(torch.cuda.max_memory_allocated())
            out["peak_vram_reserved_bytes"] = float(torch.cuda.max_memory_reserved())
        return out


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
