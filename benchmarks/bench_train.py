"""Training throughput and memory per configuration: trained tokens/s, MFU, peak VRAM, step time, and the VRAM plan.

    python benchmarks/bench_train.py bench --base DIR [--configs NAME,...] [--steps 6 --warmup 2] --out bench.json
    python benchmarks/bench_train.py calibrate --out DIR     # peaks of 2- and 4-layer 8B-wide models vs the plan
    python benchmarks/bench_train.py device --out DIR        # the GPU call: random 8B, canonical run, publish, bench
CPU dry run on the tiny model (no GPU, tiny numbers): python benchmarks/bench_train.py bench --tiny --out /tmp/b.json

Each configuration is the canonical recipe (training/recipes/llama3-8b-qlora.yaml) with one thing changed: LoRA bf16
vs QLoRA, packing on (TRL padding-free bfd rows, the varlen kernel) or off (padded batches), gradient checkpointing on
every layer / every other layer / off, max length 2048 or 4096 (batch 2 at 4096, so a micro-step stays ~8k tokens).
One model load per quantisation mode is shared by its configurations (the LoRA is added, trained and unloaded per
configuration, through TRL's SFTTrainer exactly as `loragate train` builds it); gradient accumulation is 1, so a
step is a micro-step. The first `--warmup` steps are not timed. The canonical configuration runs twice (first and
last of its group) so the table shows its own noise.

- trained tokens: non-pad tokens of the measured steps (the flat packed row; attention-mask sums when padded);
- step time: wall time from one step's end to the next (data, forward, backward, optimizer), median;
- MFU: model FLOPs per trained token 4*N_lin + 6*N_lora + 3*A, where N_lin counts every linear layer a token passes
  (LM head included), N_lora the adapter, A = 2 * layers * d_attn * L_eff with L_eff = sum(len^2) / sum(len) over the
  documents of the step (each token attends to its own document, causally); against 989 TFLOP/s (H200 dense bf16
  spec) and 790 TFLOP/s (an 8192^3 bf16 matmul measured on the lent H200);
- peak VRAM: torch.cuda.max_memory_allocated / max_memory_reserved over the configuration's steps (the model's
  weights included), against the VRAM plan (training/plan.py) of the same configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.plan import ModelShape  # noqa: E402
from training.recipe import Recipe, load_recipe  # noqa: E402

log = logging.getLogger("bench_train")

RECIPE = ROOT / "training" / "recipes" / "llama3-8b-qlora.yaml"
PEAK_SPEC, PEAK_MEASURED = 989e12, 790e12
GIB = 1024**3


@dataclass(frozen=True)
class Config:
    quant: str  # qlora | lora
    packed: bool = True
    gc: str = "full"  # full | every2 | off
    length: int = 2048
    batch: int = 4
    attention: str = "auto"
    dropout: float = 0.05
    tag: str = ""

    @property
    def name(self) -> str:
        base = f"{self.quant}-{'packed' if self.packed else 'padded'}-{self.length}-gc-{self.gc}"
        if self.attention != "auto":
            base += f"-{self.attention}"
        if self.dropout != 0.05:
            base += f"-dropout{self.dropout:g}"
        return base + (f"-{self.tag}" if self.tag else "")


CANONICAL_Q = Config("qlora")
CANONICAL_L = Config("lora")
CONFIGS: list[Config] = [  # in order of importance: a spent time budget skips from the end of each group
    CANONICAL_Q,
    Config("qlora", packed=False),
    Config("qlora", gc="every2"),
    Config("qlora", gc="off"),
    Config("qlora", length=4096, batch=2),
    replace(CANONICAL_Q, tag="again"),
    Config("qlora", dropout=0.0),  # what LoRA dropout costs
    Config("qlora", attention="sdpa"),  # sdpa's dense block mask instead of the varlen kernel
    CANONICAL_L,
    Config("lora", packed=False),
    Config("lora", gc="off"),
    Config("lora", gc="every2"),
    Config("lora", length=4096, batch=2),
    replace(CANONICAL_L, tag="again"),
]


def by_name(names: str | None) -> list[Config]:
    if not names:
        return list(CONFIGS)
    known = {c.name: c for c in CONFIGS}
    known["lora-packed-2048-gc-full-sdpa"] = Config("lora", attention="sdpa")
    out = []
    for name in names.split(","):
        if name not in known:
            raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(known)}")
        out.append(known[name])
    return out


def config_recipe(base_recipe: Recipe, base: Path, cfg: Config, steps: int) -> Recipe:
    sft = {
        **base_recipe.sft,
        "packing": cfg.packed,
        "max_length": cfg.length,
        "per_device_train_batch_size": cfg.batch,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": cfg.gc != "off",
        "max_steps": steps,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "num_train_epochs": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    return base_recipe.model_copy(
        update={
            "base": base_recipe.base.model_copy(update={"path": str(base), "hub": None}),
            "quantization": base_recipe.quantization.model_copy(update={"enabled": cfg.quant == "qlora"}),
            "lora": base_recipe.lora.model_copy(update={"lora_dropout": cfg.dropout}),
            "runtime": base_recipe.runtime.model_copy(
                update={"checkpoint_every": 2 if cfg.gc == "every2" else 1, "attention": cfg.attention}
            ),
            "sft": sft,
        }
    )


# --- measuring ----------------------------------------------------------------------------------------------------


class CountingCollator:
    """Wraps the trainer's collator: per batch, its non-pad tokens and the sum of squared document lengths."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[tuple[int, int]] = []
        self.shapes: list[tuple[int, int]] = []  # the padded [rows, length] each batch occupies on the GPU

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        out = self.inner(examples)
        self.shapes.append((int(out["input_ids"].shape[0]), int(out["input_ids"].shape[1])))
        if "cu_seq_lens_q" in out:
            lengths = out["cu_seq_lens_q"].diff().tolist()
        elif "attention_mask" in out:
            lengths = out["attention_mask"].sum(-1).tolist()
        else:
            lengths = [out["input_ids"].numel()]
        self.batches.append((int(sum(lengths)), int(sum(n * n for n in lengths))))
        return out


def step_meter() -> Any:
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.begin = 0.0

        def _sync(self) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._sync()
            self.ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepMeter()


def flops_per_token(shape: ModelShape, l_eff: float) -> float:
    attention = 2 * shape.layers * shape.q_dim * l_eff
    return 4 * shape.linear_params_per_token + 6 * shape.lora_params + 3 * attention


def hardware_flops_per_token(shape: ModelShape, l_eff: float, recomputed_layers: int) -> float:
    """Model FLOPs plus the checkpointed layers' second forward (what the GPU really executes)."""
    per_layer_linear = shape.decoder_linear_params / shape.layers
    per_layer_lora = shape.lora_params / shape.layers
    per_layer_attention = 2 * shape.q_dim * l_eff
    return flops_per_token(shape, l_eff) + recomputed_layers * (
        2 * per_layer_linear + 2 * per_layer_lora + per_layer_attention
    )


def gpu_peaks() -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        return 0, 0
    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


def reset_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def restore_base(model: Any) -> Any:
    """Undo what one configuration did to the shared base: LoRA layers, TRL's head patch, checkpointing, hooks."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.unload()
    model.__dict__.pop("forward", None)  # TRL's fused LM head is an instance attribute
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    with contextlib.suppress(AttributeError, ValueError):
        model.disable_input_require_grads()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def run_config(
    model: Any,
    tokenizer: Any,
    recipe: Recipe,
    cfg: Config,
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    shape: Any,
    profile_dir: Path | None = None,
) -> tuple[dict[str, Any], Any]:
    from datasets import Dataset
    from trl import SFTTrainer

    from training.callbacks import SelectiveCheckpointing, console_callbacks
    from training.model import attention_implementation, lora_config, make_sft_config
    from training.plan import plan_inputs, predict

    steps = args.warmup + args.steps  # timed: warmup..steps; profiled (when asked): the two steps after them
    crecipe = config_recipe(recipe, Path(recipe.base.path or ""), cfg, steps + (2 if profile_dir else 0))
    # The attention kernel is chosen at load time; a configuration that asks for another one switches the shared model
    # (the 2026-12-03 H200 run lacked this, so its "-sdpa" rows ran the varlen kernel: README "Training at scale").
    attention = attention_implementation(crecipe)
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    meter = step_meter()
    callbacks: list[Any] = [meter]
    if cfg.gc == "every2":
        callbacks.append(SelectiveCheckpointing(2))
    profile: dict[str, Any] = {}
    if profile_dir is not None:
        callbacks.append(profiler_callback(profile_dir, steps, cfg.quant, profile))
    trainer = SFTTrainer(
        model=model,
        args=make_sft_config(crecipe, workdir, "prompt_completion"),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(crecipe.lora),
        callbacks=callbacks,
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    console_callbacks(trainer)
    reset_gpu()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    allocated, reserved = gpu_peaks()
    ends = meter.ends[:steps]
    steps_done = len(ends)
    if steps_done <= args.warmup:
        raise RuntimeError(f"{cfg.name}: only {steps_done} steps ran (too few rows?)")
    measured = counter.batches[args.warmup : steps_done]
    # Step i's wall time: from the end of step i-1 (the start of training for the first) to its end.
    intervals = [b - a for a, b in itertools.pairwise([meter.begin, *ends])][args.warmup :]
    tokens = sum(t for t, _ in measured)
    squares = sum(s for _, s in measured)
    seconds = sum(intervals)
    l_eff = squares / max(tokens, 1)
    rate = tokens / seconds if seconds else 0.0
    model_flops = flops_per_token(shape, l_eff)
    recomputed = 0 if cfg.gc == "off" else (shape.layers + 1) // 2 if cfg.gc == "every2" else shape.layers
    inputs = plan_inputs(crecipe, shape, gpu=True, kernel=_varlen_ok(), native_gqa=_native_gqa())
    plan = predict(inputs)
    # The plan of the largest micro-batch this run really had (padded batches rarely reach batch x max_length).
    batch_rows, batch_length = max(counter.shapes[:steps_done], key=lambda rl: rl[0] * rl[1])
    seen = predict(
        replace(inputs, micro_batch=1, max_length=batch_rows * batch_length)
        if cfg.packed
        else replace(inputs, micro_batch=batch_rows, max_length=batch_length)
    )
    result = {
        "config": cfg.name,
        **asdict(cfg),
        "steps_measured": len(intervals),
        "trained_tokens": tokens,
        "tokens_per_step": tokens / max(len(intervals), 1),
        "l_eff": round(l_eff, 1),
        "seconds": round(seconds, 4),
        "step_s_median": round(statistics.median(intervals), 4),
        "tokens_per_s": round(rate, 1),
        "model_tflops_per_token": model_flops / 1e12,
        "mfu_spec": rate * model_flops / PEAK_SPEC,
        "mfu_measured_peak": rate * model_flops / PEAK_MEASURED,
        "hfu_spec": rate * hardware_flops_per_token(shape, l_eff, recomputed) / PEAK_SPEC,
        "peak_allocated_bytes": allocated,
        "peak_reserved_bytes": reserved,
        "plan_bytes": plan.predicted_peak_bytes,
        "plan_parts": plan.parts,
        "plan_over_allocated": plan.predicted_peak_bytes / allocated if allocated else None,
        "max_micro_batch_shape": [batch_rows, batch_length],
        "plan_at_max_micro_batch_bytes": seen.predicted_peak_bytes,
        "plan_at_max_over_allocated": seen.predicted_peak_bytes / allocated if allocated else None,
        "attention_implementation": model.config._attn_implementation,
        "losses": meter.losses,
        "wall_s": round(wall, 2),
        "profile": profile or None,
    }
    del trainer
    model = restore_base(model)
    shutil.rmtree(workdir, ignore_errors=True)
    reset_gpu()
    return result, model


def _varlen_ok() -> bool:
    from training.attention import varlen_available

    return varlen_available()


def _native_gqa() -> bool:
    from training.attention import varlen_native_gqa

    return varlen_native_gqa()


def profiler_callback(out: Path, first: int, tag: str, summary: dict[str, Any]) -> Any:
    """Profile steps first+1 and first+2 with torch.profiler into profile-TAG.txt; `summary` gets the categories."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.prof: Any = None
            self.t0 = 0.0
            self.first = first
            self.last = first + 2

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == self.first and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.prof is not None and state.global_step == self.last:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                summary.update(write_profile(self.prof, wall, self.last - self.first, out / f"profile-{tag}.txt"))
                self.prof = None

    return Profile()


CATEGORIES = (
    ("bnb dequantize / 4-bit", ("dequant", "kdequant", "bnb", "gemv_4bit", "quantize")),
    ("attention (flash varlen / sdpa)", ("flash", "fmha", "attention", "attn")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("LM head + loss (TRL triton)", ("triton", "trl")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90")),
    ("norm / reduce", ("reduce", "norm", "rms")),
    ("dropout / elementwise / copies", ("elementwise", "vectorized", "copy", "fill", "bernoulli", "dropout", "cat")),
)


def categorize(name: str) -> str:
    if name in ("_forward_kernel", "_backward_kernel"):  # TRL's chunked log-prob kernels
        return "LM head + loss (TRL triton)"
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other kernels"


def write_profile(prof: Any, wall: float, steps: int, out: Path) -> dict[str, Any]:
    events = [e for e in prof.key_averages() if getattr(e, "device_type", None) is not None]
    kernels: dict[str, float] = {}
    for event in prof.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA") and event.device_time_total:
            kernels[event.name] = kernels.get(event.name, 0.0) + float(event.device_time_total)
    by_cat: dict[str, float] = {}
    for name, us in kernels.items():
        cat = categorize(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us
    busy = sum(by_cat.values()) / 1e6
    lines = [f"profile: {steps} steps, wall {wall:.3f} s, GPU kernel time {busy:.3f} s ({busy / wall:.0%} busy)", ""]
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cat:<36} {us / 1e6:8.3f} s  {us / 1e6 / wall:6.1%} of wall")
    lines.append(
        f"{'GPU idle (gaps between kernels)':<36} {max(wall - busy, 0):8.3f} s  {max(wall - busy, 0) / wall:6.1%}"
    )
    lines += ["", "top kernels by GPU time:"]
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:40]:
        lines.append(f"{us / 1e3:10.1f} ms  {categorize(name)[:14]:<14}  {name[:150]}")
    lines += ["", "top operators (key_averages, by device time):"]
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=80)
    lines.append(table)
    del events
    out.write_text("\n".join(lines) + "\n")
    return {"wall_s": wall, "steps": steps, "busy_s": busy, "categories_s": {k: v / 1e6 for k, v in by_cat.items()}}


# --- bench --------------------------------------------------------------------------------------------------------


def bench_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    from training.tasks import task_rows

    return task_rows("echo", count, seed)


def tiny_recipe(recipe: Recipe) -> Recipe:
    """The CPU dry run: tiny model shapes, short lengths, float32, no QLoRA compute dtype problems."""
    sft = {**recipe.sft, "bf16": False, "use_cpu": True}
    return recipe.model_copy(update={"sft": sft, "cpu_threads": 1})


def cmd_bench(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from training.model import load_model
    from training.plan import model_shape

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    deadline = time.monotonic() + args.budget_s
    configs = by_name(args.configs)
    base = Path(args.base) if args.base else _tiny_base()
    recipe = load_recipe(RECIPE)
    if args.tiny:
        recipe = tiny_recipe(recipe)
        configs = [replace(c, length=min(c.length, 128) if c.length == 2048 else 256) for c in configs]
    recipe = recipe.model_copy(update={"base": recipe.base.model_copy(update={"path": str(base), "hub": None})})
    tokenizer = AutoTokenizer.from_pretrained(base)
    shape = model_shape(base, recipe.lora.target_modules, recipe.lora.r)
    rows = bench_rows(args.rows)
    results: list[dict[str, Any]] = []
    out = Path(args.out)
    meta = environment()
    profile_dir = Path(args.profile_dir) if args.profile_dir else None
    for quant in ("qlora", "lora"):
        group = [c for c in configs if c.quant == quant]
        if not group:
            continue
        started = time.monotonic()
        qrecipe = config_recipe(recipe, base, group[0], 1)
        model = load_model(base, qrecipe)
        load_s = time.monotonic() - started
        log.info("%s: model loaded in %.1f s", quant, load_s)
        last = 0.0
        for cfg in group:
            if time.monotonic() + max(last, 5.0) > deadline:
                log.warning("skipping %s: the time budget is spent", cfg.name)
                results.append({"config": cfg.name, "skipped": "time budget"})
                continue
            t0 = time.monotonic()
            profile = profile_dir if cfg in (CANONICAL_Q, CANONICAL_L) else None
            try:
                result, model = run_config(model, tokenizer, recipe, cfg, rows, args, shape, profile)
                result["model_load_s"] = round(load_s, 1)
            except Exception as exc:  # one configuration's failure (an OOM, say) must not lose the others
                log.exception("%s failed", cfg.name)
                result = {"config": cfg.name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                with contextlib.suppress(Exception):
                    model = restore_base(model)
                reset_gpu()
            last = time.monotonic() - t0
            results.append(result)
            out.write_text(json.dumps({"environment": meta, "shape": asdict(shape), "results": results}, indent=2))
            log.info("%s", row_text(result))
        del model
        reset_gpu()
    print(table(results))
    return 0


def _tiny_base() -> Path:
    from training.tiny_model import cached_tiny_model

    return cached_tiny_model()


def row_text(r: dict[str, Any]) -> str:
    if "tokens_per_s" not in r:
        return f"{r['config']}: {r.get('error') or r.get('skipped')}"
    return (
        f"{r['config']}: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu_spec']:.1%} (989) {r['mfu_measured_peak']:.1%} "
        f"(790), step {r['step_s_median']:.3f} s, peak {r['peak_allocated_bytes'] / GIB:.2f} GiB alloc "
        f"{r['peak_reserved_bytes'] / GIB:.2f} reserved, plan {r['plan_bytes'] / GIB:.2f} GiB"
    )


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| configuration | tokens/step | trained tok/s | MFU vs 989 | MFU vs 790 | step s (median) | peak alloc GiB "
        "| peak reserved GiB | plan GiB | plan / alloc | plan at largest batch / alloc |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['config']} | {r.get('error') or r.get('skipped')} |" + " |" * 9)
            continue
        ratio = r["plan_over_allocated"]
        lines.append(
            f"| {r['config']} | {r['tokens_per_step']:.0f} | {r['tokens_per_s']:,.0f} | {r['mfu_spec']:.1%} | "
            f"{r['mfu_measured_peak']:.1%} | {r['step_s_median']:.3f} | {r['peak_allocated_bytes'] / GIB:.2f} | "
            f"{r['peak_reserved_bytes'] / GIB:.2f} | {r['plan_bytes'] / GIB:.2f} | "
            + (f"{ratio:.2f} |" if ratio else "n/a |")
            + (f" {r['plan_at_max_over_allocated']:.2f} |" if ratio else " n/a |")
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    from importlib import metadata

    import torch

    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = props.name
        out["gpu_total_bytes"] = props.total_memory
        out["cuda"] = torch.version.cuda
    return out


# --- calibrate ----------------------------------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Peaks of 2- and 4-layer models with Llama-3-8B widths: per-layer bytes per token, against the plan."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="calib-"))
    results = []
    for layers in (2, 4):
        folder = root / f"l{layers}"
        build_reduced(folder, layers, args.tiny)
        ns = argparse.Namespace(**{**vars(args), "base": str(folder), "out": str(out / f"calib-{layers}.json")})
        ns.configs = args.configs or ",".join(
            [
                "qlora-packed-2048-gc-full",
                "qlora-packed-2048-gc-off",
                "qlora-padded-2048-gc-full",
                "lora-packed-2048-gc-full",
                "lora-packed-2048-gc-off",
                "qlora-packed-2048-gc-full-sdpa",
            ]
        )
        cmd_bench(ns)
        results.append(json.loads((out / f"calib-{layers}.json").read_text()))
    (out / "calibrate.json").write_text(json.dumps(results, indent=2))
    return 0


def build_reduced(folder: Path, layers: int, tiny: bool = False) -> None:
    """A random Llama-3-8B with `layers` decoder layers (`tiny`: also narrow, for a CPU dry run)."""
    import loragate.dev as dev

    family = dev.FAMILIES["llama-3-8b"]
    config = {**family.config, "num_hidden_layers": layers}
    if tiny:
        config.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    dev.FAMILIES[f"llama-3-8b-l{layers}"] = replace(family, config=config)
    dev.build_random_model(f"llama-3-8b-l{layers}", folder)


# --- check: the first GPU call (environment, kernels, calibration, the canonical path on a 4-layer model) -------


def varlen_signature() -> str | None:
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        return f"missing: {exc}"
    return str(inspect.signature(varlen_attn))


def packing_equivalence(folder: Path, device: str) -> dict[str, Any]:
    """Logits of three documents packed into one padding-free row against each alone, per attention kernel."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from training.attention import register

    tokenizer = AutoTokenizer.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(300, 8000, (n,), generator=generator).tolist() for n in (61, 130, 87)]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collator([{"input_ids": d} for d in docs])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out: dict[str, Any] = {}
    for impl in (register(), "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=impl).to(device).eval()
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            packed = model(**inputs, use_cache=False).logits[0].float()
            leaky = model(input_ids=inputs["input_ids"], use_cache=False).logits[0].float()  # no boundaries
            diffs, leaks, scale = [], [], 0.0
            start = 0
            for doc in docs:
                alone = model(input_ids=torch.tensor([doc], device=device)).logits[0].float()
                piece = packed[start : start + len(doc)]
                diffs.append(float((piece - alone).abs().max()))
                leaks.append(float((leaky[start : start + len(doc)] - alone).abs().max()))
                scale = max(scale, float(alone.abs().max()))
                start += len(doc)
        out[impl] = {"max_abs_diff": diffs, "without_boundaries_max_abs_diff": leaks, "logit_scale": scale}
        del model
    return out


def cmd_check(args: argparse.Namespace) -> int:
    """The first GPU call: versions, the varlen kernel, packing equivalence, plan calibration, a canonical smoke run."""
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {"environment": environment(), "varlen_signature": varlen_signature(), "timings_s": {}}

    def save() -> None:
        (out / "check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    def step(name: str, fn: Any) -> Any:
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as exc:
            log.exception("%s failed", name)
            value = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        report[name] = value
        report["timings_s"][name] = round(time.monotonic() - t0, 1)
        save()
        return value

    narrow = work / "narrow"
    if not narrow.exists():
        build_reduced(narrow, 2, tiny=True)
    step("packing_equivalence", lambda: packing_equivalence(narrow, device))
    folders = {}
    for layers in (2, 4):
        folders[layers] = work / f"l{layers}"
        if not folders[layers].exists():
            build_reduced(folders[layers], layers, tiny=args.tiny)

    def calibrate(layers: int) -> Any:
        ns = argparse.Namespace(
            **{**vars(args), "base": str(folders[layers]), "out": str(out / f"calib-{layers}.json")}
        )
        ns.configs = args.configs or ",".join(
            [
                "qlora-packed-2048-gc-full",
                "qlora-packed-2048-gc-off",
                "qlora-padded-2048-gc-full",
                "lora-packed-2048-gc-full",
                "lora-packed-2048-gc-off",
                "qlora-packed-2048-gc-full-sdpa",
                "qlora-packed-2048-gc-full-dropout0",
            ]
        )
        ns.profile_dir = str(out) if layers == 4 else None
        cmd_bench(ns)
        return "ok"

    step("calibrate_2", lambda: calibrate(2))
    step("calibrate_4", lambda: calibrate(4))
    step("smoke", lambda: canonical_run(folders[4], work / "smoke", work / "registry", out, args, "smoke"))
    print(json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=1, default=str)[-8000:])
    return 0


def canonical_run(model: Path, run_dir: Path, registry: Path, out: Path, args: argparse.Namespace, tag: str) -> Any:
    """`loragate train` on the canonical recipe with --publish, as a user runs it; its outputs summarised."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    shutil.rmtree(run_dir, ignore_errors=True)
    cli = [sys.executable, "-c", "from loragate.cli import main; raise SystemExit(main())"]
    command = [
        *cli,
        "train",
        "--config",
        str(RECIPE),
        "--set",
        f"base.path={model}",
        "--output-dir",
        str(run_dir),
        "--publish",
        args.publish,
        "--registry",
        str(registry),
        *(x for s in args.set for x in ("--set", s)),
    ]
    with (out / f"{tag}.log").open("w") as logf:
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, check=False)
    summary: dict[str, Any] = {"command": command[3:], "status": status.returncode}
    for name in ("metrics.json", "plan.json"):
        with contextlib.suppress(OSError, ValueError):
            summary[name] = json.loads((run_dir / name).read_text())
    adapter = run_dir / "adapter"
    with contextlib.suppress(OSError):
        shutil.copy(adapter / "adapter_config.json", out / f"{tag}_adapter_config.json")
        summary["adapter_header"] = json.loads(safetensors_header(adapter / "adapter_model.safetensors"))
    show = subprocess.run(
        [*cli, "registry", "show", args.publish, "--json", "--registry", str(registry)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    summary["registry_show"] = show.stdout[-20000:] if show.returncode == 0 else show.stderr[-3000:]
    return summary


# --- device: the whole GPU call -----------------------------------------------------------------------------------


def cmd_device(args: argparse.Namespace) -> int:
    """On the GPU: random 8B folder, the canonical recipe through `loragate train` + publish, then the benchmark."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    report: dict[str, Any] = {"environment": environment(), "timings_s": {}}
    t_start = time.monotonic()

    def save() -> None:
        (out / "device.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    model = Path(args.model_dir) if args.model_dir else work / "llama-3-8b"
    if not (model / "config.json").exists():
        t0 = time.monotonic()
        shutil.rmtree(model, ignore_errors=True)
        from loragate.dev import build_random_model

        build_random_model("llama-3-8b", model)
        report["timings_s"]["random_model"] = round(time.monotonic() - t0, 1)
        reset_gpu()
        save()

    t0 = time.monotonic()
    report["canonical"] = canonical_run(model, work / "canonical", work / "registry", out, args, "canonical")
    report["timings_s"]["canonical_run"] = round(time.monotonic() - t0, 1)
    save()

    left = args.budget_s - (time.monotonic() - t_start)
    t0 = time.monotonic()
    bench = [
        *(
            sys.executable,
            str(Path(__file__).resolve()),
            "bench",
            "--base",
            str(model),
            "--out",
            str(out / "bench.json"),
        ),
        *("--steps", str(args.steps), "--warmup", str(args.warmup), "--rows", str(args.rows)),
        *("--budget-s", str(max(left - 10, 30)), "--profile-dir", str(out)),
    ]
    if args.configs:
        bench += ["--configs", args.configs]
    if args.tiny:
        bench += ["--tiny"]
    with (out / "bench.log").open("w") as logf:
        code = subprocess.run(bench, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, check=False).returncode
    report["timings_s"]["bench"] = round(time.monotonic() - t0, 1)
    report["bench_status"] = code
    save()
    print((out / "bench.log").read_text()[-6000:])
    return 0


def safetensors_header(path: Path) -> str:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return f.read(size).decode()


def cmd_vllm_check(args: argparse.Namespace) -> int:
    """Here (CPU vLLM): the adapter a GPU run brought back passes vLLM's LoRA config parser and weight-name rules."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    folder = Path(args.out)
    config = json.loads((folder / f"{args.tag}_adapter_config.json").read_text())
    report = json.loads((folder / ("device.json" if args.tag == "canonical" else "check.json")).read_text())
    header = report[args.tag if args.tag != "canonical" else "canonical"]["adapter_header"]
    helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": args.max_position_embeddings})
    helper.validate_legal(LoRAConfig(max_lora_rank=args.max_lora_rank, max_loras=1))
    modules: dict[str, dict[str, list[int]]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        module, is_a = parse_fine_tuned_lora_name(name)
        modules.setdefault(module, {})["A" if is_a else "B"] = meta["shape"]
    ranks = {shapes["A"][0] for shapes in modules.values()} | {shapes["B"][1] for shapes in modules.values()}
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    print(
        f"vLLM PEFTHelper: r={helper.r} alpha={helper.lora_alpha} scaling={helper.vllm_lora_scaling_factor:g} "
        f"target_modules={helper.target_modules}; validate_legal(max_lora_rank={args.max_lora_rank}) passed; "
        f"{len(modules)} modules ({', '.join(leaves)}), each with lora_A and lora_B: "
        f"{all(set(v) == {'A', 'B'} for v in modules.values())}; ranks in the weights {sorted(ranks)}; "
        f"dtypes {sorted({m['dtype'] for k, m in header.items() if k != '__metadata__'})}"
    )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("bench", "calibrate", "device", "check"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
        p.add_argument("--steps", type=int, default=6, help="measured steps per configuration")
        p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
        p.add_argument("--rows", type=int, default=700, help="echo-task rows to draw batches from")
        p.add_argument("--budget-s", type=float, default=1e9, help="skip the configurations that would run past it")
        p.add_argument("--base", default=None, help="model folder (default: the tiny model)")
        p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny lengths, float32")
        p.add_argument("--profile-dir", default=None, help="profile the canonical QLoRA configuration into DIR")
    vcheck = sub.add_parser("vllm-check")
    vcheck.add_argument("--out", required=True, help="the folder a GPU call brought back")
    vcheck.add_argument("--tag", default="canonical", help="canonical (device call) or smoke (check call)")
    vcheck.add_argument("--max-lora-rank", type=int, default=16)
    vcheck.add_argument("--max-position-embeddings", type=int, default=8192)
    for name in ("device", "check"):
        p = sub.choices[name]
        p.add_argument("--workdir", default="/tmp/loragate-bench")
        p.add_argument("--model-dir", default=None, help="an existing model folder (default: build a random 8B)")
        p.add_argument("--publish", default="llama3-8b-echo")
        p.add_argument("--set", action="append", default=[], help="extra --set for the canonical run")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = make_parser().parse_args(argv)
    handlers = {
        "bench": cmd_bench,
        "calibrate": cmd_calibrate,
        "device": cmd_device,
        "check": cmd_check,
        "vllm-check": cmd_vllm_check,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
