"""Model, LoRA and SFTConfig construction from a recipe (LoRA, or QLoRA: 4-bit NF4 base via bitsandbytes)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.recipe import LoraSpec, QuantSpec, Recipe, RecipeError

log = logging.getLogger(__name__)

# Set by the tool, never by `sft:` in a recipe.
MANAGED_KEYS = ("output_dir", "report_to")


def on_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def set_cpu_threads(threads: int | None) -> None:
    """Tiny models gain nothing from several intra-op threads, and on a busy host they lose a lot (spinning)."""
    if threads is not None and not on_gpu():
        import torch

        torch.set_num_threads(threads)


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu() else torch.float32
    return getattr(torch, name)


def quantization_config(spec: QuantSpec) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, spec.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # FSDP shards the packed 4-bit weights as this dtype: keep it the compute one
    )


def attention_implementation(recipe: Recipe) -> str:
    from training.attention import implementation
    from training.plan import padding_free

    return implementation(recipe.runtime.attention, padding_free(recipe), on_gpu())


def load_model(base: Path, recipe: Recipe) -> Any:
    from transformers import AutoModelForCausalLM

    attn = attention_implementation(recipe)
    log.info("loading %s (%s, attention %s)", base, "4-bit" if recipe.quantization.enabled else recipe.base.dtype, attn)
    if not recipe.quantization.enabled:
        return AutoModelForCausalLM.from_pretrained(
            base, dtype=torch_dtype(recipe.base.dtype), attn_implementation=attn
        )
    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=getattr(__import__("torch"), recipe.quantization.compute_dtype),
        quantization_config=quantization_config(recipe.quantization),
        attn_implementation=attn,
    )
    if not recipe.quantization.upcast_non_quantized:
        return model  # TRL freezes the base, enables input grads for checkpointing and casts the adapter to bf16
    from peft import prepare_model_for_kbit_training

    # Norms, embeddings and head in float32, input grads on for checkpointing: PEFT's standard QLoRA preparation.
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=bool(recipe.sft.get("gradient_checkpointing", False))
    )


def checkpoint_layers(model: Any, every: int) -> list[bool]:
    """Keep gradient checkpointing on every `every`-th decoder layer only (0, n, 2n, ...); return the flags.

    transformers enables it on all of them when the Trainer starts; this runs after (`SelectiveCheckpointing`).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    flags: list[bool] = []
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            on = bool(module.gradient_checkpointing) and len(flags) % every == 0
            module.gradient_checkpointing = on
            flags.append(on)
    return flags


def lora_config(spec: LoraSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        bias=spec.bias,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        modules_to_save=spec.modules_to_save,
        task_type="CAUSAL_LM",
    )


def sft_kwargs(recipe: Recipe, output_dir: Path, data_format: str, gpu: bool) -> dict[str, Any]:
    """Keyword arguments for TRL's SFTConfig: the recipe's `sft` section plus what the tool decides (pure)."""
    for key in MANAGED_KEYS:
        if key in recipe.sft:
            raise RecipeError(f"sft.{key} is set by loragate train; remove it from the recipe")
    kwargs: dict[str, Any] = {
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "logging_strategy": "steps",
        **recipe.sft,
        "output_dir": str(output_dir),
        "report_to": [],
        "seed": recipe.seed,
    }
    kwargs.setdefault("data_seed", recipe.seed)
    for key in [k for k, v in kwargs.items() if k.endswith("_strategy") and v is False]:
        kwargs[key] = "no"  # YAML 1.1 reads a bare `no` as false
    if data_format == "messages":
        kwargs.setdefault("assistant_only_loss", True)
    if not gpu:
        kwargs["use_cpu"] = True
        kwargs.setdefault("bf16", False)  # TRL defaults bf16 on; mixed precision autocast is for GPUs here
    stop = recipe.early_stopping
    if stop.patience is not None:
        metric = stop.metric if stop.metric.startswith("eval_") else f"eval_{stop.metric}"
        greater = stop.greater_is_better if stop.greater_is_better is not None else "loss" not in metric
        kwargs.update(load_best_model_at_end=True, metric_for_best_model=metric, greater_is_better=greater)
    return kwargs


def make_sft_config(recipe: Recipe, output_dir: Path, data_format: str) -> Any:
    from trl import SFTConfig

    kwargs = sft_kwargs(recipe, output_dir, data_format, on_gpu())
    try:
        return SFTConfig(**kwargs)
    except TypeError as exc:
        raise RecipeError(f"sft: {exc} (the `sft` section takes TRL SFTConfig arguments)") from exc
    except ValueError as exc:
        raise RecipeError(f"sft: {exc}".splitlines()[0]) from exc
