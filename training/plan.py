"""The VRAM plan: the predicted peak of GPU memory of a training run, from the recipe and the base's config alone.

`loragate train --plan [--json]` prints it; every run checks it before loading the model and refuses (one line naming
the numbers) when the prediction plus `runtime.vram_headroom` (15%) exceeds the detected GPU's memory, unless
`--force`. Only the config is read: the architecture is instantiated on torch's meta device (no weights), so a
`loragate dev random-model --config-only` folder plans a 70B run on a laptop.

The arithmetic (`predict`) is a pure function of `PlanInputs`. Its parts, in bytes:
- weights: decoder linears in NF4 (0.5 byte/parameter plus absmax: 1/64 byte with double quantisation, 4/64 without)
  or bf16; the rest (embeddings, LM head, norms) in bf16, or float32 when QLoRA upcasts them (PEFT's
  `prepare_model_for_kbit_training`);
- adapter, its gradients and AdamW's two states, in the adapter's dtype (float32 for LoRA on a bf16 base as PEFT
  makes it, bf16 for QLoRA as TRL casts it; 8-bit optimizers keep 1 byte per state);
- activations for the tokens of one micro-step (per-device batch x max_length, the worst case): the bytes a decoder
  layer saves per token for backward (`layer_bytes_per_token`), kept for every layer without checkpointing; with
  checkpointing a checkpointed layer keeps only its input and the backward recomputes one layer at a time (its saved
  tensors plus the gradients in flight, `backward_bytes_per_token`); the block-diagonal mask sdpa builds for packed
  rows when the varlen kernel is not used;
- LM head and loss: TRL's fused head scores [4096 tokens x 32768 vocabulary] tiles, never the full logits, and
  returns a float32 gradient of the hidden states.
With FSDP (a `distributed.accelerate_config`), weights, adapter, gradients and optimizer are divided by the number of
processes and one decoder layer is gathered whole at a time.

The coefficients of the activation model were read off peaks measured on an H200 (torch 2.11, transformers 5.17,
bitsandbytes 0.50.2, TRL 1.16); README "Training at scale" compares the plan with every benchmarked configuration.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.errors import TrainingError
from training.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)

GIB = 1024**3
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}  # per parameter, by double quantisation
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl.kernels.chunked_logprob: TOKEN_CHUNK_SIZE, trainer chunk size
EIGHT_BIT_OPTIMIZERS = re.compile(r"8bit")
STATELESS_OPTIMIZERS = ("sgd", "adafactor")


class PlanError(TrainingError):
    """The run would not fit: the message names the prediction, the headroom and the GPU's memory in one line."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a base: sizes and parameter counts, read off its config on the meta device."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    decoder_linear_params: int  # every nn.Linear inside the decoder layers (what QLoRA quantises)
    lm_head_params: int  # 0 when tied to the embeddings
    other_params: int  # embeddings, norms, anything else left unquantised
    lora_params: int  # the adapter the recipe's LoRA config makes on this base
    lora_targets: dict[str, int] = field(default_factory=dict)  # module leaf name -> its input width

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_params_per_token(self) -> int:
        """N_lin of the MFU formula: every linear layer a token passes, the LM head included."""
        return self.decoder_linear_params + (self.lm_head_params or self.vocab * self.hidden)


@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    qlora: bool
    double_quant: bool = True
    upcast_non_quantized: bool = False  # QLoRA only: PEFT's float32 cast of norms, embeddings and head
    micro_batch: int = 4
    max_length: int = 2048
    packed: bool = True  # TRL padding-free packing (bfd): one flat row of micro_batch x max_length tokens
    gradient_checkpointing: bool = True
    checkpoint_every: int = 1
    lora_dropout: bool = True
    attention: str = "varlen"  # varlen (per-document kernel, no mask) | sdpa | eager
    optimizer: str = "adamw_torch_fused"
    processes: int = 1  # FSDP world size: what is sharded is divided by it
    kv_expanded: bool = True  # the kernel saves k/v repeated to the query heads (no native GQA in torch's varlen)


@dataclass(frozen=True)
class Plan:
    parts: dict[str, int]
    predicted_peak_bytes: int
    tokens_per_micro_step: int
    inputs: PlanInputs

    def to_json(self) -> dict[str, Any]:
        inputs = asdict(self.inputs)
        shape = inputs.pop("shape")
        return {
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_peak_gib": round(self.predicted_peak_bytes / GIB, 3),
            "parts": self.parts,
            "tokens_per_micro_step": self.tokens_per_micro_step,
            "inputs": inputs,
            "shape": shape,
        }


# --- the arithmetic (pure) ----------------------------------------------------------------------------------------


def adapter_bytes_per_param(inputs: PlanInputs) -> int:
    """TRL casts a quantised base's adapter to bf16; PEFT keeps a bf16 base's adapter in float32."""
    return 2 if inputs.qlora else 4


def optimizer_bytes_per_param(inputs: PlanInputs) -> float:
    name = inputs.optimizer.lower()
    if any(name.startswith(s) for s in STATELESS_OPTIMIZERS):
        return 0.0
    if EIGHT_BIT_OPTIMIZERS.search(name):
        return 2.0  # two uint8 states (the per-block scales are small)
    return 2.0 * adapter_bytes_per_param(inputs)  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype


def layer_bytes_per_token(inputs: PlanInputs) -> float:
    """Bytes one decoder layer saves for backward, per token (bf16 activations; see the module docstring)."""
    s = inputs.shape
    d, f, q, kv = s.hidden, s.intermediate, s.q_dim, s.kv_dim
    wide = 4 if inputs.upcast_non_quantized and inputs.qlora else 2  # residual stream and MLP in float32 when upcast
    total = 2 * 4.0 * d  # two RMSNorms save their float32 copy of the input
    kv_saved = q if inputs.kv_expanded else kv
    total += 2 * q + 2 * 2 * kv_saved + 2 * q  # the kernel keeps q, k, v, its output (and a small logsumexp)
    total += 3 * wide * f  # SiLU keeps gate, the product keeps act and up
    total += _lora_saved_bytes(inputs)
    return total


def _lora_saved_bytes(inputs: PlanInputs) -> float:
    """LoRA keeps its dropped-out input (plus the dropout mask) per target; without dropout the shared input."""
    s = inputs.shape
    total = 0.0
    if inputs.lora_dropout:
        for width in s.lora_targets.values():
            total += 3.0 * width  # bool mask + bf16 copy
    else:
        shared = {name for name in s.lora_targets if name not in ("o_proj", "down_proj")}
        attn_in = bool(shared & {"q_proj", "k_proj", "v_proj"})
        mlp_in = bool(shared & {"gate_proj", "up_proj"})
        total += 2.0 * s.hidden * (attn_in + mlp_in)  # the two norm outputs, each shared by its projections
        total += 2.0 * s.intermediate * ("down_proj" in s.lora_targets)
        total += 2.0 * s.q_dim * ("o_proj" in s.lora_targets) * (inputs.attention != "varlen")
    return total


def backward_bytes_per_token(inputs: PlanInputs) -> float:
    """What the backward of one decoder layer holds beyond its saved tensors: three MLP-wide gradients in flight."""
    return 3 * 2.0 * inputs.shape.intermediate


def head_bytes(inputs: PlanInputs, tokens: int) -> float:
    """TRL's fused LM head and loss in backward: one [4096 x 32768] bf16 tile, and per token the final norm's
    float32 input, the gathered hidden states, their float32 gradient and its bf16 cast, the embeddings' output."""
    s = inputs.shape
    tile = min(tokens, TRL_TOKEN_TILE) * min(TRL_VOCAB_TILE, s.vocab) * 2
    head_weight_cast = TRL_VOCAB_TILE * s.hidden * 2 if inputs.qlora and inputs.upcast_non_quantized else 0
    return tile + head_weight_cast + tokens * s.hidden * 18.0


def checkpointed_layers(inputs: PlanInputs) -> int:
    if not inputs.gradient_checkpointing:
        return 0
    return math.ceil(inputs.shape.layers / inputs.checkpoint_every)


def predict(inputs: PlanInputs) -> Plan:
    s = inputs.shape
    tokens = inputs.micro_batch * inputs.max_length
    procs = max(inputs.processes, 1)

    other_bytes = 4 if inputs.qlora and inputs.upcast_non_quantized else 2
    if inputs.qlora:
        decoder = s.decoder_linear_params * NF4_BYTES[inputs.double_quant]
    else:
        decoder = s.decoder_linear_params * 2.0
    rest = (s.other_params + s.lm_head_params) * other_bytes
    weights = (decoder + rest) / procs
    gathered = decoder / s.layers if procs > 1 else 0.0  # FSDP all-gathers one decoder layer at a time

    adapter_b = adapter_bytes_per_param(inputs)
    adapter = s.lora_params * adapter_b / procs
    grads = s.lora_params * adapter_b / procs
    optimizer = s.lora_params * optimizer_bytes_per_param(inputs) / procs

    per_layer = layer_bytes_per_token(inputs)
    residual = 4 if inputs.upcast_non_quantized and inputs.qlora else 2
    kept = checkpointed_layers(inputs)
    checkpoints = kept * residual * s.hidden * tokens
    full_layers = (s.layers - kept) * per_layer * tokens
    # On top of what stays saved, the peak is either the head's backward or a layer's: one checkpointed layer
    # recomputed at a time (when the top layer keeps its activations, its backward frees them before the first
    # recompute) plus the gradients in flight. Only the larger phase is counted.
    top_recomputed = kept > 0 and (s.layers - 1) % inputs.checkpoint_every == 0
    recompute = per_layer * tokens if top_recomputed else 0.0
    backward = backward_bytes_per_token(inputs) * tokens
    lm_head = head_bytes(inputs, tokens)
    if lm_head > recompute + backward:
        recompute = backward = 0.0
    else:
        lm_head = 0.0
    # transformers builds a bool [rows, 1, row, row] mask once per forward: block-diagonal from the position ids of
    # a packed row (also under the varlen kernel, which ignores it), padding otherwise.
    row = tokens if inputs.packed else inputs.max_length
    rows = 1 if inputs.packed else inputs.micro_batch
    mask = float(rows * row * row)
    if inputs.attention == "eager":
        mask += rows * s.heads * row * row * 2 * 2  # scores and probabilities of one layer in flight

    parts = {
        "weights": int(weights),
        "fsdp_gathered_layer": int(gathered),
        "adapter": int(adapter),
        "gradients": int(grads),
        "optimizer": int(optimizer),
        "activations_checkpoints": int(checkpoints),
        "activations_layers": int(full_layers),
        "activations_recompute": int(recompute),
        "activations_backward": int(backward),
        "attention_mask": int(mask),
        "lm_head_loss": int(lm_head),  # counted when the head's backward, not a layer's, is the peak
    }
    return Plan(parts, sum(parts.values()), tokens, inputs)


# --- reading the recipe and the base ------------------------------------------------------------------------------


def model_shape(base: Path, target_modules: str | list[str], r: int) -> ModelShape:
    """The base's sizes and the adapter's parameter count, from its config on the meta device (no weights read)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    text = config.get_text_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lm_head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    tied = lm_head is not None and lm_head.weight is embeddings.weight
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    decoder_linear = sum(
        sub.weight.numel() for layer in layers for sub in layer.modules() if isinstance(sub, torch.nn.Linear)
    )
    head = 0 if tied or lm_head is None else lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):  # the adapter's tensors too: no memory, no initialisation
        peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=target_modules, task_type="CAUSAL_LM"))
    lora_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    targets: dict[str, int] = {}
    first = layers[0] if layers else None
    for name, module in peft_model.named_modules():
        if name.endswith(".lora_A.default") and first is not None:
            leaf = name.split(".")[-3]
            targets.setdefault(leaf, int(module.in_features))
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return ModelShape(
        model_type=str(text.model_type),
        hidden=int(text.hidden_size),
        intermediate=int(text.intermediate_size),
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab=int(text.vocab_size),
        decoder_linear_params=int(decoder_linear),
        lm_head_params=int(head),
        other_params=int(total - decoder_linear - head),
        lora_params=int(lora_params),
        lora_targets=targets,
    )


def accelerate_processes(recipe: Recipe) -> int:
    """Processes the recipe's accelerate config launches with FSDP or ZeRO-3 (what shards the model); 1 without."""
    spec = recipe.distributed
    if spec.accelerate_config is None:
        return spec.num_processes or 1
    import yaml

    path = Path(spec.accelerate_config)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RecipeError(f"distributed.accelerate_config {path}: {exc.strerror}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"distributed.accelerate_config {path}: not a YAML mapping")
    kind = str(raw.get("distributed_type", "NO")).upper()
    if kind not in ("FSDP", "DEEPSPEED", "MULTI_GPU", "NO"):
        raise RecipeError(f"distributed.accelerate_config {path}: distributed_type {kind} is not planned")
    if recipe.quantization.enabled and kind == "FSDP":
        mixed = str(raw.get("mixed_precision", "no"))
        if mixed != "bf16" or recipe.quantization.compute_dtype != "bfloat16":
            raise RecipeError(
                f"distributed.accelerate_config {path}: FSDP QLoRA needs mixed_precision bf16 and "
                "quantization.compute_dtype bfloat16 (the 4-bit storage dtype FSDP shards)"
            )
        if (raw.get("fsdp_config") or {}).get("fsdp_use_orig_params", False):
            raise RecipeError(f"distributed.accelerate_config {path}: FSDP QLoRA needs fsdp_use_orig_params: false")
    processes = spec.num_processes or int(raw.get("num_processes", 1))
    return processes if kind in ("FSDP", "DEEPSPEED") else 1


def resolved_attention(recipe: Recipe, gpu: bool, kernel: bool = True) -> str:
    """The attention the run will use: `auto` is the varlen kernel for packed (padding-free) rows on a GPU.

    `kernel`: whether the varlen kernel exists (a plan made on a CPU assumes the GPU has it).
    """
    choice = recipe.runtime.attention
    if choice == "auto":
        choice = "varlen" if gpu and padding_free(recipe) else "sdpa"
    if choice == "varlen" and not (gpu and kernel):
        return "sdpa"
    return choice


def padding_free(recipe: Recipe) -> bool:
    """TRL turns padding-free on for bfd packing (its default strategy) or when asked."""
    sft = recipe.sft
    strategy = str(sft.get("packing_strategy", "bfd"))
    return bool(sft.get("padding_free", False)) or (bool(sft.get("packing", False)) and strategy.startswith("bfd"))


def plan_inputs(
    recipe: Recipe, shape: ModelShape, gpu: bool = True, kernel: bool = True, native_gqa: bool = False
) -> PlanInputs:
    """`kernel`: the varlen kernel exists; `native_gqa`: it takes fewer key/value heads than query heads."""
    sft = recipe.sft
    attention = resolved_attention(recipe, gpu, kernel)
    return PlanInputs(
        shape=shape,
        qlora=recipe.quantization.enabled,
        double_quant=recipe.quantization.double_quant,
        upcast_non_quantized=recipe.quantization.upcast_non_quantized,
        micro_batch=int(sft["per_device_train_batch_size"]),
        max_length=int(sft["max_length"]),
        packed=padding_free(recipe),
        gradient_checkpointing=bool(sft.get("gradient_checkpointing", False)),
        checkpoint_every=recipe.runtime.checkpoint_every,
        lora_dropout=recipe.lora.lora_dropout > 0,
        attention=attention,
        optimizer=str(sft.get("optim", "adamw_torch_fused")),
        processes=accelerate_processes(recipe),
        kv_expanded=not (attention == "varlen" and native_gqa) and shape.kv_heads != shape.heads,
    )


def plan_recipe(recipe: Recipe, base: Path, gpu: bool = True, kernel: bool = True, native_gqa: bool = False) -> Plan:
    shape = model_shape(base, recipe.lora.target_modules, recipe.lora.r)
    return predict(plan_inputs(recipe, shape, gpu, kernel, native_gqa))


# --- the check ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    name: str
    total_bytes: int


def detect_gpu() -> Gpu | None:
    """The smallest visible CUDA device (every rank must fit), or None on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    smallest = min(props, key=lambda p: p.total_memory)
    return Gpu(str(smallest.name), int(smallest.total_memory))


SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """`24GiB`, `80GB`, `1.5e10`: a byte count (argparse type for --gpu-memory)."""
    match = SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 24GiB, 80GB, 1.5e10)")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "b").lower()])


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def fits(plan: Plan, gpu: Gpu, headroom: float) -> bool:
    return plan.predicted_peak_bytes * (1 + headroom) <= gpu.total_bytes


def refusal(plan: Plan, gpu: Gpu, headroom: float) -> str:
    p = plan.parts
    states = p["adapter"] + p["gradients"] + p["optimizer"]
    acts = sum(v for k, v in p.items() if k.startswith("activations_") or k == "attention_mask")
    return (
        f"VRAM plan: predicted peak {gib(plan.predicted_peak_bytes)} + {headroom:.0%} headroom = "
        f"{gib(plan.predicted_peak_bytes * (1 + headroom))} > {gib(gpu.total_bytes)} on {gpu.name} "
        f"(weights {gib(p['weights'] + p['fsdp_gathered_layer'])}, adapter+optimizer {gib(states)}, "
        f"activations {gib(acts)} for {plan.tokens_per_micro_step} tokens, LM head/loss {gib(p['lm_head_loss'])}); "
        "lower sft.per_device_train_batch_size or sft.max_length, turn on sft.gradient_checkpointing or --qlora, "
        "or pass --force"
    )


def check(plan: Plan, gpu: Gpu | None, headroom: float, force: bool) -> str:
    """Raise PlanError when the run would not fit; return the one-line verdict that is logged otherwise."""
    if gpu is None:
        return f"VRAM plan: predicted peak {gib(plan.predicted_peak_bytes)}; no GPU here, not checked"
    verdict = (
        f"VRAM plan: predicted peak {gib(plan.predicted_peak_bytes)} + {headroom:.0%} headroom = "
        f"{gib(plan.predicted_peak_bytes * (1 + headroom))} of {gib(gpu.total_bytes)} on {gpu.name}"
    )
    if fits(plan, gpu, headroom):
        return verdict + ": fits"
    if force:
        return verdict + ": does NOT fit, running anyway (--force)"
    raise PlanError(refusal(plan, gpu, headroom))


def render(plan: Plan, gpu: Gpu | None, headroom: float) -> str:
    """The human-readable table of `loragate train --plan`."""
    i = plan.inputs
    s = i.shape
    mode = "QLoRA NF4" + (" + double quant" if i.double_quant else "") if i.qlora else "LoRA bf16"
    gc = f"every {i.checkpoint_every}" if i.gradient_checkpointing and i.checkpoint_every > 1 else None
    lines = [
        f"base: {s.model_type}, {s.layers} layers, hidden {s.hidden}, vocab {s.vocab}; "
        f"adapter {s.lora_params / 1e6:.1f}M parameters",
        f"run: {mode}; micro-step {i.micro_batch} x {i.max_length} = {plan.tokens_per_micro_step} tokens, "
        f"{'packed (padding-free)' if i.packed else 'padded'}, attention {i.attention}, "
        f"checkpointing {gc or ('every layer' if i.gradient_checkpointing else 'off')}, optimizer {i.optimizer}"
        + (f", sharded over {i.processes} processes" if i.processes > 1 else ""),
    ]
    width = max(len(k) for k in plan.parts)
    lines += [f"  {name:<{width}}  {gib(value):>10}" for name, value in plan.parts.items() if value]
    lines.append(f"  {'predicted peak':<{width}}  {gib(plan.predicted_peak_bytes):>10}")
    if gpu is None:
        lines.append("GPU: none detected (give --gpu-memory to check against a size)")
    else:
        needed = plan.predicted_peak_bytes * (1 + headroom)
        verdict = "fits" if fits(plan, gpu, headroom) else "does NOT fit"
        lines.append(f"GPU: {gpu.name}, {gib(gpu.total_bytes)}; with {headroom:.0%} headroom {gib(needed)}: {verdict}")
    return "\n".join(lines)


def plan_json(plan: Plan, gpu: Gpu | None, headroom: float) -> str:
    out = plan.to_json()
    out["headroom"] = headroom
    out["gpu"] = None if gpu is None else {"name": gpu.name, "total_bytes": gpu.total_bytes}
    out["fits"] = None if gpu is None else fits(plan, gpu, headroom)
    return json.dumps(out, sort_keys=False)
