"""Training recipes: a YAML file validated by pydantic, with `--set key.path=value` overrides.

The defaults are the practical guide's: LoRA r=16, alpha=32, dropout 0.05 on all linear layers, no bias; lr 2e-4
with a cosine schedule and 3% warmup, 3 epochs. `sft` is handed to TRL's `SFTConfig` as keyword arguments, so every
knob TRL has (packing, gradient_checkpointing, max_length, ...) is available without being re-declared here;
`resolved_config()` records them all, implicit defaults included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.errors import TrainingError

SFT_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # TRL 1.x: a float below 1 is a fraction of the total steps
    "num_train_epochs": 3,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "max_length": 512,
    "logging_steps": 10,
    "gradient_checkpointing": False,
    "packing": False,
    "save_total_limit": 2,
}


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class RecipeError(TrainingError):
    """A recipe that cannot be loaded or resolved; the message is one line for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyBase(_Section):
    """Build the local tiny Llama (training.tiny_model) and give it a short language-model training of its own."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    seed: int = 0
    pretrain_steps: int = Field(default=0, ge=0)
    pretrain_batch_size: int = Field(default=16, ge=1)
    pretrain_seq_len: int = Field(default=128, ge=8)
    pretrain_lr: float = Field(default=3e-3, gt=0)


class BaseSpec(_Section):
    """The base model: a local folder (`path`), a Hugging Face hub id (`hub`), or the built tiny Llama (`tiny`).

    `path` wins over `hub`, so `--set base.path=DIR` points a hub recipe at a local copy (or a
    `loragate dev random-model` stand-in). A hub id is read from the local Hugging Face cache; it is downloaded
    only when HF_HUB_OFFLINE=0 (runs default to offline).
    """

    path: str | None = None
    hub: str | None = None
    revision: str | None = None  # with `hub`: a branch, tag or commit
    tiny: TinyBase | None = None
    name: str | None = None  # the base's name in the registry (for --publish)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on a GPU, float32 on the CPU

    @model_validator(mode="after")
    def _one_source(self) -> BaseSpec:
        if (self.path is None and self.hub is None) == (self.tiny is None):
            raise ValueError("base: give exactly one of `path` (or `hub`) or `tiny`")
        if self.hub is not None and not HUB_ID.match(self.hub):
            raise ValueError(f"base.hub {self.hub!r} is not a hub id (owner/name)")
        return self


class GenerateSpec(_Section):
    task: str
    rows: int = Field(default=1000, ge=10)
    seed: int = 0


class DataSpec(_Section):
    path: str | None = None  # a JSONL file, or a local file `datasets` reads (.json, .jsonl, .parquet, .csv)
    generate: GenerateSpec | None = None  # a built-in deterministic task (training/tasks.py)
    format: Literal["auto", "messages", "prompt_completion"] = "auto"
    eval_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    split_salt: str = "loragate"
    dedupe: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.path is None) == (self.generate is None):
            raise ValueError("data: give exactly one of `path` or `generate`")
        return self


class LoraSpec(_Section):
    r: int = Field(default=16, ge=1)
    lora_alpha: float = 32
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None


class QuantSpec(_Section):
    """QLoRA: 4-bit NF4 base with double quantisation; compute (and FSDP storage) dtype bf16.

    `upcast_non_quantized` is PEFT's `prepare_model_for_kbit_training`: every weight left unquantised (norms,
    embeddings, LM head) goes to float32, and with them the residual stream. `false` keeps them in the compute dtype:
    about 2 GB less for an 8B model with a 128k vocabulary, and bf16 activations throughout.
    """

    enabled: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    upcast_non_quantized: bool = True


class EarlyStopping(_Section):
    patience: int | None = Field(default=None, ge=1)  # None: off
    metric: str = "eval_loss"
    greater_is_better: bool | None = None  # None: inferred from the metric's name (loss -> lower is better)
    threshold: float = 0.0


class EvalSpec(_Section):
    max_new_tokens: int = Field(default=32, ge=1)
    max_examples: int = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=1)
    per_epoch_generation: bool = True  # exact match etc. on the eval split after every epoch
    contract: dict[str, Any] | None = None  # output contract: a JSON schema, {"regex": ...} or {"choice": [...]}
    constrained: bool = False  # also generate under the contract with outlines
    canary: str | None = None  # a text/JSONL file of general text; None: the built-in canary


class ServingSpec(_Section):
    max_lora_rank: int = Field(default=16, ge=1)  # the target engines' --max-lora-rank
    merge_only: bool = False


class RuntimeSpec(_Section):
    """How the steps run: the attention kernel, selective checkpointing and the VRAM headroom the plan demands."""

    # auto: varlen flash attention (per-document, from TRL's padding-free cu_seq_lens) on a CUDA GPU, sdpa elsewhere.
    attention: Literal["auto", "varlen", "sdpa", "eager"] = "auto"
    checkpoint_every: int = Field(default=1, ge=1)  # with sft.gradient_checkpointing: every n-th decoder layer
    vram_headroom: float = Field(default=0.15, ge=0, lt=1)  # refuse when plan x (1 + headroom) > GPU memory


class ChecksSpec(_Section):
    """Post-training checks; a failed one fails the run (outputs are kept, nothing is published)."""

    lora_b_nonzero: bool = True  # every lora_B matrix moved off its zero init
    loss_fell: bool = True  # the mean of the last logged training losses is below the mean of the first


class DistributedSpec(_Section):
    """What `accelerate launch` will run this recipe with, so the VRAM plan can divide what is sharded."""

    accelerate_config: str | None = None  # an accelerate YAML (relative to the recipe file)
    num_processes: int | None = Field(default=None, ge=1)  # overrides the YAML's num_processes


class Recipe(_Section):
    name: str = "adapter"
    seed: int = 42
    cpu_threads: int | None = Field(default=None, ge=1)  # torch intra-op threads on the CPU; None: torch's default
    base: BaseSpec
    data: DataSpec
    lora: LoraSpec = LoraSpec()
    quantization: QuantSpec = QuantSpec()
    sft: dict[str, Any] = Field(default_factory=dict)
    early_stopping: EarlyStopping = EarlyStopping()
    evaluation: EvalSpec = EvalSpec()
    serving: ServingSpec = ServingSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    checks: ChecksSpec = ChecksSpec()
    distributed: DistributedSpec = DistributedSpec()

    @model_validator(mode="after")
    def _sft_defaults(self) -> Recipe:
        self.sft = {**SFT_DEFAULTS, **{k: number(v) for k, v in self.sft.items()}}
        return self


def number(value: Any) -> Any:
    """YAML 1.1 reads `2e-4` (no dot) as a string; take such strings as the float they spell."""
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalar or flow syntax (`3`, `2e-4`, `true`, `[q_proj, v_proj]`, `null`)."""
    try:
        return number(yaml.safe_load(text))
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested mapping (a copy); unknown keys are left for validation."""
    out: dict[str, Any] = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE (e.g. lora.r=8)")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return out


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RecipeError(f"{path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    raw = apply_overrides(raw, overrides or [])
    # Relative data/base/canary paths are relative to the recipe file.
    for section, key in (
        ("data", "path"),
        ("base", "path"),
        ("evaluation", "canary"),
        ("distributed", "accelerate_config"),
    ):
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            raw[section][key] = str((path.parent / value).resolve())
    return recipe_from_dict(raw, where=str(path))


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise RecipeError(f"{where}: {loc}: {first['msg']}") from exc


def resolved_config(recipe: Recipe, sft_config: dict[str, Any]) -> dict[str, Any]:
    """Everything that decided the run: the recipe with defaults filled in, and TRL's full SFTConfig."""
    return {"recipe": recipe.model_dump(mode="json"), "sft_config": sft_config}
