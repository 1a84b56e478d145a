"""Post-training checks that catch the silent failures of real runs, before anything is published.

- every `lora_B` matrix moved off its zero initialisation: PEFT with gradient checkpointing and no gradient into
  the checkpointed inputs (reentrant checkpointing, input grads off) trains nothing, yet saves a valid-looking
  adapter that is exactly the base;
- the training loss fell: the mean of the last quarter of the logged losses is below the mean of the first quarter;
- the stop rate (generations that end with the end-of-turn token) is reported beside them.
A failed check (when enabled in the recipe's `checks:`) fails the run after its outputs are written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from training.errors import TrainingError
from training.recipe import ChecksSpec

log = logging.getLogger(__name__)


class CheckError(TrainingError):
    """A post-training check failed; the message names the check and the numbers in one line."""


def zero_lora_b(model: Any) -> tuple[list[str], int]:
    """Names of the lora_B weights that are all zero, and how many lora_B weights there are."""
    zero: list[str] = []
    total = 0
    for name, param in model.named_parameters():
        if ".lora_B." in name and name.endswith(".weight"):
            total += 1
            if not bool(param.detach().ne(0).any()):
                zero.append(name)
    return zero, total


def training_losses(history: list[dict[str, Any]]) -> list[float]:
    """The periodic training losses of a trainer's log history (not eval losses, not the final summary)."""
    return [float(h["loss"]) for h in history if "loss" in h and "train_loss" not in h]


@dataclass(frozen=True)
class LossTrend:
    first: float | None
    last: float | None
    points: int

    @property
    def fell(self) -> bool | None:
        if self.first is None or self.last is None or self.points < 2:
            return None
        return self.last < self.first


def loss_trend(losses: list[float]) -> LossTrend:
    if len(losses) < 2:
        return LossTrend(losses[0] if losses else None, None, len(losses))
    k = max(1, len(losses) // 4)
    return LossTrend(sum(losses[:k]) / k, sum(losses[-k:]) / k, len(losses))


def run_checks(model: Any, history: list[dict[str, Any]], stop_rate: float | None) -> dict[str, Any]:
    zero, total = zero_lora_b(model)
    trend = loss_trend(training_losses(history))
    return {
        "lora_b_nonzero": {"ok": total > 0 and not zero, "total": total, "zero": zero[:10], "zero_count": len(zero)},
        "loss_fell": {"ok": trend.fell, "first": trend.first, "last": trend.last, "points": trend.points},
        "stop_rate": stop_rate,
    }


def summary(checks: dict[str, Any]) -> str:
    lora = checks["lora_b_nonzero"]
    loss = checks["loss_fell"]
    parts = [f"lora_B non-zero {lora['total'] - lora['zero_count']}/{lora['total']}"]
    if loss["ok"] is None:
        parts.append(f"loss trend unknown ({loss['points']} logged losses)")
    else:
        parts.append(f"loss {loss['first']:.3f} -> {loss['last']:.3f} ({'fell' if loss['ok'] else 'did NOT fall'})")
    if checks["stop_rate"] is not None:
        parts.append(f"stop rate {checks['stop_rate']:.2f}")
    return "post-training checks: " + "; ".join(parts)


def failures(checks: dict[str, Any], spec: ChecksSpec) -> list[str]:
    problems: list[str] = []
    lora = checks["lora_b_nonzero"]
    if spec.lora_b_nonzero and not lora["ok"]:
        first = f" (e.g. {lora['zero'][0]})" if lora["zero"] else ""
        problems.append(
            f"{lora['zero_count']} of {lora['total']} lora_B matrices are still all zero{first}: the adapter learned "
            "nothing there (gradient checkpointing without input gradients?)"
        )
    loss = checks["loss_fell"]
    if spec.loss_fell and loss["ok"] is False:
        problems.append(f"the training loss did not fall ({loss['first']:.4f} -> {loss['last']:.4f})")
    return problems
