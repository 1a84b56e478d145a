"""LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer: recipe in, evaluated adapter out.

Run (CPU, tiny model, a few minutes):
    loragate train --config training/recipes/tiny.yaml --output-dir runs/tiny
    loragate train --config training/recipes/tiny.yaml --output-dir runs/tiny-q --qlora
    loragate train --config training/recipes/tiny-json.yaml --output-dir runs/json --publish tiny-json
    loragate train --config my.yaml --set lora.r=8 --set sft.learning_rate=1e-4 --set sft.num_train_epochs=2
Real models (a hub id is not fetched: point base.path at a local folder, e.g. `loragate dev random-model`):
    loragate train --config training/recipes/llama3-8b-qlora.yaml --set base.path=/models/llama-3-8b --plan
    loragate train --config training/recipes/llama3-8b-qlora.yaml --set base.path=/models/llama-3-8b
Multi-GPU (see README "Training"): accelerate launch --config_file training/accelerate/fsdp_qlora.yaml \
    -m loragate train --config my.yaml --qlora
Library: `run(recipe, output_dir, ...)` (what `loragate train` calls), `train(...)`, `show_plan(recipe, ...)`.

Every run first checks the VRAM plan (training/plan.py) against the GPU and refuses one that would not fit with
15% headroom (`--force` runs it anyway); after training, the post-training checks (training/checks.py) must pass
before anything is published.

The output folder holds `adapter/` (adapter_model.safetensors, adapter_config.json, chat_template.jinja,
metrics.json, training.json), plus metrics.json, training.json, preflight.txt, train.log and checkpoints/ (a
re-run with the same output folder resumes from the last checkpoint).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from training.data import Splits, dataset_hash, load_rows, make_splits
from training.recipe import Recipe, RecipeError, load_recipe, resolved_config

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
PACKAGES = ("loragate", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "outlines")


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it after the weights and optimizer: a checkpoint's seal


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint a run left whole; one cut short by a kill mid-save (no readable state) is skipped."""
    if not folder.is_dir():
        return None
    numbered = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    for _, path in sorted(numbered, reverse=True):
        try:
            json.loads((path / TRAINER_STATE).read_text())
            return path
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s (no readable %s)", path, TRAINER_STATE)
    return None


@dataclass(frozen=True)
class RunResult:
    adapter_dir: Path
    metrics: dict[str, Any]
    manifest_ref: str | None = None


def _with_flags(recipe: Recipe, qlora: bool | None, merge_only: bool | None) -> Recipe:
    updates: dict[str, Any] = {}
    if qlora is not None:
        updates["quantization"] = recipe.quantization.model_copy(update={"enabled": qlora})
    if merge_only is not None:
        updates["serving"] = recipe.serving.model_copy(update={"merge_only": merge_only})
    return recipe.model_copy(update=updates)


def _gpu(gpu_memory: int | None) -> Any:
    from training.plan import Gpu, detect_gpu

    if gpu_memory is not None:
        return Gpu(f"--gpu-memory {gpu_memory / 1024**3:.1f} GiB", gpu_memory)
    return detect_gpu()


def show_plan(
    recipe: Recipe, *, qlora: bool | None = None, gpu_memory: int | None = None, as_json: bool = False
) -> str:
    """`loragate train --plan`: the VRAM plan of the recipe's run, from the base's config alone (after the serving
    lint and the accelerate config's checks, so a recipe is validated on a machine without its GPUs)."""
    from training import plan, serving_lint
    from training.base_model import resolve_base
    from training.errors import TrainingError

    recipe = _with_flags(recipe, qlora, None)
    try:
        base = resolve_base(recipe.base)
        serving_lint.check(recipe.lora, recipe.serving.max_lora_rank, base, recipe.serving.merge_only)  # validates too
    except FileNotFoundError as exc:
        raise TrainingError(str(exc)) from exc
    planned = plan.plan_recipe(recipe, base)
    gpu = _gpu(gpu_memory)
    headroom = recipe.runtime.vram_headroom
    return plan.plan_json(planned, gpu, headroom) if as_json else plan.render(planned, gpu, headroom)


def check_plan(recipe: Recipe, base: Path, output_dir: Path, force: bool, gpu_memory: int | None) -> None:
    """The VRAM check at the start of a run: refuse (PlanError) a run the GPU cannot hold with headroom."""
    from training import plan
    from training.attention import varlen_available, varlen_native_gqa
    from training.model import on_gpu

    gpu = _gpu(gpu_memory)
    planned = plan.plan_recipe(
        recipe, base, gpu=on_gpu() or gpu is not None, kernel=varlen_available(), native_gqa=varlen_native_gqa()
    )
    (output_dir / "plan.json").write_text(plan.plan_json(planned, gpu, recipe.runtime.vram_headroom) + "\n")
    log.info(plan.check(planned, gpu, recipe.runtime.vram_headroom, force))


def train(recipe: Recipe | Path | str, output_dir: Path, **kw: Any) -> Path:
    """Train, evaluate and save; return the adapter folder. `kw`: qlora, merge_only, publish, registry, resume."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe))
    return run(recipe, output_dir, **kw).adapter_dir


def run(
    recipe: Recipe,
    output_dir: Path,
    *,
    qlora: bool | None = None,
    merge_only: bool | None = None,
    publish: str | None = None,
    registry: str | None = None,
    resume: bool = True,
    force: bool = False,
    gpu_memory: int | None = None,
) -> RunResult:
    recipe = _with_flags(recipe, qlora, merge_only)

    from training import serving_lint
    from training.base_model import resolve_base
    from training.errors import TrainingError
    from training.model import set_cpu_threads

    set_cpu_threads(recipe.cpu_threads)

    output_dir.mkdir(parents=True, exist_ok=True)
    handler = _file_log(output_dir / "train.log")
    try:
        try:
            base = resolve_base(recipe.base)
        except FileNotFoundError as exc:
            raise TrainingError(str(exc)) from exc
        serving_lint.check(recipe.lora, recipe.serving.max_lora_rank, base, recipe.serving.merge_only)
        check_plan(recipe, base, output_dir, force, gpu_memory)
        contract = _contract(recipe)
        splits = make_splits(load_rows(recipe.data), recipe.data)
        digest = dataset_hash(splits)
        log.info("data: %s (%s), dataset %s", splits.sizes(), splits.format, digest)
        return _train(recipe, base, splits, digest, contract, output_dir, publish, registry, resume)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _train(
    recipe: Recipe,
    base: Path,
    splits: Splits,
    digest: str,
    contract: dict[str, Any] | None,
    output_dir: Path,
    publish: str | None,
    registry: str | None,
    resume: bool,
) -> RunResult:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from training.callbacks import (
        GenerationEval,
        LogToFile,
        SelectiveCheckpointing,
        Throughput,
        console_callbacks,
        early_stopping,
    )
    from training.checks import CheckError, failures, run_checks, summary
    from training.evaluate import evaluate_run
    from training.model import load_model, lora_config, make_sft_config
    from training.preflight import run_preflight

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_model(base, recipe)
    checkpoints = output_dir / CHECKPOINTS_DIR
    sft_config = make_sft_config(recipe, checkpoints, splits.format)
    generation_eval = GenerationEval(splits.eval, recipe.evaluation, contract, tokenizer)
    throughput = Throughput()
    callbacks: list[Any] = [LogToFile(), throughput]
    callbacks += [generation_eval] if recipe.evaluation.per_epoch_generation else []
    callbacks += early_stopping(recipe.early_stopping)
    if recipe.sft.get("gradient_checkpointing") and recipe.runtime.checkpoint_every > 1:
        callbacks.append(SelectiveCheckpointing(recipe.runtime.checkpoint_every))
    trainer = SFTTrainer(
        model=model,
        args=sft_config,
        train_dataset=Dataset.from_list(splits.train),
        eval_dataset=Dataset.from_list(splits.eval),
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora),
        callbacks=callbacks,
    )
    console_callbacks(trainer)
    view = run_preflight(trainer, splits.train, output_dir)
    log.info("loss-mask preflight (%s):\n%s", output_dir / "preflight.txt", view)

    checkpoint = last_complete_checkpoint(checkpoints) if resume else None
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    speed = throughput.summary()
    if speed:
        log.info("training: %s", ", ".join(f"{k} {v:,.0f}" for k, v in speed.items()))

    log.info("evaluating base and adapter on %s held-out rows", min(len(splits.test), recipe.evaluation.max_examples))
    metrics = evaluate_run(trainer, splits.test, recipe.evaluation, contract)
    metrics["train"] = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)} | speed
    metrics["per_epoch"] = _per_epoch(trainer.state.log_history, generation_eval.history)
    metrics["data"] = {"sizes": splits.sizes(), "duplicates_removed": splits.duplicates_removed, "hash": digest}
    metrics["checks"] = run_checks(trainer.model, trainer.state.log_history, metrics["adapter"]["stop_rate"])
    log.info(summary(metrics["checks"]))

    info = {
        **resolved_config(recipe, sft_config.to_dict()),
        "base_path": str(base),
        "seed": recipe.seed,
        "dataset_hash": digest,
        "packages": package_versions(),
        "command": sys.argv,
    }
    adapter_dir = _save(trainer, tokenizer, output_dir, metrics, info)
    log.info(
        "exact_match: base %.3f -> adapter %.3f", metrics["base"]["exact_match"], metrics["adapter"]["exact_match"]
    )
    problems = failures(metrics["checks"], recipe.checks)
    if problems:
        raise CheckError(f"post-training check failed: {'; '.join(problems)} (outputs kept in {output_dir})")
    ref = None
    if publish:
        from training.publish import publish_run

        published = publish_run(adapter_dir, publish, recipe, base, metrics, digest, contract, registry, splits.test)
        ref = published.ref
        log.info("published %s", ref)
    return RunResult(adapter_dir, metrics, ref)


def _save(trainer: Any, tokenizer: Any, output_dir: Path, metrics: dict[str, Any], info: dict[str, Any]) -> Path:
    adapter_dir = output_dir / ADAPTER_DIR
    trainer.model.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "chat_template.jinja").write_text(tokenizer.chat_template)
    for folder in (adapter_dir, output_dir):
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        (folder / "training.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return adapter_dir


def _per_epoch(history: list[dict[str, Any]], generation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    evals = [h for h in history if "eval_loss" in h]
    rows = [{"epoch": h.get("epoch"), "eval_loss": h["eval_loss"]} for h in evals]
    for row, extra in zip(rows, generation, strict=False):
        row.update(extra)
    return rows


def _contract(recipe: Recipe) -> dict[str, Any] | None:
    if recipe.evaluation.contract is None:
        return None
    from adapters_registry.contract import normalize_contract

    try:
        return normalize_contract(recipe.evaluation.contract)
    except ValueError as exc:
        raise RecipeError(f"evaluation.contract: {exc}") from exc


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler
