"""Serving lint: refuse, before training, an adapter the gateway could not hot-load into vLLM as a LoRA.

vLLM serves plain LoRA only: no DoRA magnitude vectors, no fully-trained `modules_to_save` copies, no trained
biases, and no rank above the engines' `--max-lora-rank`. Target modules must exist on the base. A recipe with
`serving.merge_only: true` (or `--merge-only`) skips the serving rules, since the adapter will only be merged.
"""

from __future__ import annotations

from pathlib import Path

from training.errors import TrainingError
from training.recipe import LoraSpec

ALL_LINEAR = "all-linear"


class LintError(TrainingError):
    """The adapter this recipe would produce cannot be served as a LoRA; the message lists why."""


def serving_problems(lora: LoraSpec, max_lora_rank: int) -> list[str]:
    problems: list[str] = []
    if lora.use_dora:
        problems.append("DoRA (lora.use_dora) cannot be hot-loaded by vLLM")
    if lora.modules_to_save:
        problems.append(f"modules_to_save {lora.modules_to_save} trains full module copies vLLM cannot load")
    if lora.bias != "none":
        problems.append(f"lora.bias={lora.bias!r} trains biases vLLM's LoRA layers ignore")
    if lora.r > max_lora_rank:
        problems.append(f"rank {lora.r} is above the engines' max_lora_rank {max_lora_rank}")
    return problems


def missing_targets(target_modules: str | list[str], module_names: set[str]) -> list[str]:
    """Target names matching no module of the base (by last name component or full dotted path)."""
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            return []
        target_modules = [target_modules]
    leaves = {name.rsplit(".", 1)[-1] for name in module_names}
    return [t for t in target_modules if t not in leaves and not any(n.endswith(f".{t}") for n in module_names)]


def lint(lora: LoraSpec, max_lora_rank: int, module_names: set[str], merge_only: bool) -> list[str]:
    problems = [] if merge_only else serving_problems(lora, max_lora_rank)
    missing = missing_targets(lora.target_modules, module_names)
    if missing:
        problems.append(f"target modules {missing} do not exist on the base")
    return problems


def base_module_names(base: Path) -> set[str]:
    """Module names of the base, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return {name for name, _ in model.named_modules() if name}


def check(lora: LoraSpec, max_lora_rank: int, base: Path, merge_only: bool) -> None:
    problems = lint(lora, max_lora_rank, base_module_names(base), merge_only)
    if problems:
        hint = "" if merge_only else " (pass --merge-only if this adapter will only ever be merged)"
        raise LintError("serving lint: " + "; ".join(problems) + hint)
