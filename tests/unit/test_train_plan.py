"""The VRAM plan: its arithmetic on Llama-3-8B, Mistral-7B and Llama-3-70B shapes (read from config files on the meta
device, no weights), `loragate train --plan [--json]`, and the one-line refusal of a run that would not fit.

The expected byte counts are written out from the published shapes; the 8B rows are also what the plan predicted on
the H200 run of 2026-12-03, where the measured peaks (torch.cuda.max_memory_allocated) were: QLoRA canonical 10.26 GiB,
LoRA canonical 21.01 GiB, QLoRA without checkpointing 72.01 GiB, QLoRA checkpointing every other layer 40.22 GiB.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from loragate.cli import main as loragate_main
from loragate.dev import FAMILIES
from tests.fixtures.training import RECIPES
from training.plan import (
    NF4_BYTES,
    Gpu,
    PlanError,
    PlanInputs,
    accelerate_processes,
    check,
    model_shape,
    parse_size,
    plan_inputs,
    predict,
)
from training.recipe import RecipeError, load_recipe

NF4 = 0.5 + 1 / 64 + 4 / 16384  # 4-bit codes + 8-bit absmax per 64 + float32 absmax-of-absmax per 256 blocks
T = 4 * 2048  # tokens of one canonical micro-step

# (decoder linear params, LM head params, embeddings + norms params, LoRA r=16 all-linear params)
PARAMS = {
    "llama-3-8b": (6_979_321_856, 525_336_576, 525_602_816, 41_943_040),
    "mistral-7b": (6_979_321_856, 134_217_728, 134_483_968, 41_943_040),
    "llama-3-70b": (68_451_041_280, 1_050_673_152, 1_051_992_064, 207_093_760),
}


def layer_bytes(d: int, f: int) -> int:
    """Per token: 2 norms x float32 copy (8d); q, repeated k and v, output (8d); gate, act, up (6f); LoRA dropout
    mask + bf16 copy on 6 d-wide inputs and the f-wide one (18d + 3f)."""
    return 8 * d + 8 * d + 6 * f + 18 * d + 3 * f


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """config.json alone, with the shapes `loragate dev random-model` uses (the published ones)."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("configs")
    out = {}
    for like, family in FAMILIES.items():
        folder = root / like
        model_type = "mistral" if family.architecture.startswith("Mistral") else "llama"
        config = AutoConfig.for_model(model_type, architectures=[family.architecture], vocab_size=family.vocab)
        for key, value in family.config.items():
            setattr(config, key, value)
        config.save_pretrained(folder)
        out[like] = folder
    return out


@pytest.mark.parametrize("like", sorted(PARAMS))
def test_shapes_from_the_config_alone(config_dirs: dict[str, Path], like: str) -> None:
    shape = model_shape(config_dirs[like], "all-linear", 16)
    assert (shape.decoder_linear_params, shape.lm_head_params, shape.other_params, shape.lora_params) == PARAMS[like]
    assert set(shape.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert shape.lora_targets["down_proj"] == shape.intermediate


def _canonical(config_dirs: dict[str, Path], like: str, recipe: str = "llama3-8b-qlora.yaml") -> PlanInputs:
    loaded = load_recipe(RECIPES / recipe, [f"base.path={config_dirs[like]}"])
    return plan_inputs(loaded, model_shape(config_dirs[like], "all-linear", 16), gpu=True, kernel=True)


def test_8b_qlora_canonical(config_dirs: dict[str, Path]) -> None:
    lin, head, other, lora = PARAMS["llama-3-8b"]
    plan = predict(_canonical(config_dirs, "llama-3-8b"))
    expected = {
        "weights": int(lin * NF4 + (head + other) * 2),
        "fsdp_gathered_layer": 0,
        "adapter": lora * 2,  # TRL keeps a quantised base's adapter in bf16
        "gradients": lora * 2,
        "optimizer": lora * 4,
        "activations_checkpoints": 32 * 2 * 4096 * T,
        "activations_layers": 0,
        "activations_recompute": layer_bytes(4096, 14336) * T,
        "activations_backward": 3 * 2 * 14336 * T,
        "attention_mask": T * T,
        "lm_head_loss": 0,  # smaller than a layer's backward here
    }
    assert plan.parts == expected
    assert plan.predicted_peak_bytes == 11_154_890_752  # 10.39 GiB; measured on the H200: 10.26 GiB
    assert plan.tokens_per_micro_step == T


def test_8b_lora_bf16(config_dirs: dict[str, Path]) -> None:
    lin, head, other, lora = PARAMS["llama-3-8b"]
    plan = predict(_canonical(config_dirs, "llama-3-8b", "llama3-8b-lora.yaml"))
    assert plan.parts["weights"] == (lin + head + other) * 2
    assert plan.parts["adapter"] + plan.parts["gradients"] + plan.parts["optimizer"] == lora * 4 * 4  # float32 x 4
    assert plan.predicted_peak_bytes == 21_848_662_016  # 20.35 GiB; measured: 21.01 GiB


@pytest.mark.parametrize(
    ("change", "expected_peak", "parts"),
    [
        # no checkpointing: every layer keeps its activations; the head's backward is then the larger phase
        (
            {"gradient_checkpointing": False},
            77_307_453_440,  # 72.00 GiB; measured 72.01 GiB
            {"activations_layers": 32 * layer_bytes(4096, 14336) * T, "lm_head_loss": 4096 * 32768 * 2 + T * 4096 * 18},
        ),
        # every other layer: 16 checkpointed, 16 keep everything; the top layer (31) is not recomputed
        (
            {"checkpoint_every": 2},
            43_216_150_528,  # 40.25 GiB; measured 40.22 GiB
            {"activations_checkpoints": 16 * 2 * 4096 * T, "activations_layers": 16 * layer_bytes(4096, 14336) * T},
        ),
        # no dropout: LoRA keeps the two shared norm outputs and the down projection's input
        (
            {"lora_dropout": False},
            10_567_688_192,
            {"activations_recompute": (16 * 4096 + 6 * 14336 + 4 * 4096 + 2 * 14336) * T},
        ),
        # double quantisation off: float32 absmax per 64 weights
        ({"double_quant": False}, 11_154_890_752 + int(6_979_321_856 * (NF4_BYTES[False] - NF4)), {}),
    ],
)
def test_8b_qlora_variants(
    config_dirs: dict[str, Path], change: dict[str, object], expected_peak: int, parts: dict[str, int]
) -> None:
    plan = predict(replace(_canonical(config_dirs, "llama-3-8b"), **change))  # type: ignore[arg-type]
    for name, value in parts.items():
        assert plan.parts[name] == value, name
    assert plan.predicted_peak_bytes == expected_peak


def test_mistral_7b_qlora(config_dirs: dict[str, Path]) -> None:
    lin, head, other, _ = PARAMS["mistral-7b"]
    plan = predict(_canonical(config_dirs, "mistral-7b", "mistral-7b-qlora.yaml"))
    assert plan.parts["weights"] == int(lin * NF4 + (head + other) * 2)  # the 32k vocabulary: a 4x smaller head
    assert plan.parts["activations_recompute"] == layer_bytes(4096, 14336) * T  # same decoder layers as Llama-3-8B
    assert plan.predicted_peak_bytes == 9_590_415_360


def test_70b_qlora_fsdp_divides_what_is_sharded(config_dirs: dict[str, Path]) -> None:
    lin, head, other, lora = PARAMS["llama-3-70b"]
    inputs = _canonical(config_dirs, "llama-3-70b", "llama3-70b-qlora-fsdp.yaml")
    assert inputs.processes == 2  # read from training/accelerate/fsdp_qlora_70b.yaml
    plan = predict(inputs)
    assert plan.parts["weights"] == int((lin * NF4 + (head + other) * 2) / 2)
    assert plan.parts["fsdp_gathered_layer"] == int(lin * NF4 / 80)
    assert plan.parts["optimizer"] == lora * 4 // 2
    assert plan.parts["activations_checkpoints"] == 80 * 2 * 8192 * T  # activations are per GPU, not sharded
    assert plan.parts["activations_recompute"] == layer_bytes(8192, 28672) * T
    single = predict(replace(inputs, processes=1))
    assert single.predicted_peak_bytes > plan.predicted_peak_bytes + 17 * 1024**3


def test_accelerate_config_is_validated(tmp_path: Path, config_dirs: dict[str, Path]) -> None:
    bad = tmp_path / "fsdp.yaml"
    bad.write_text(
        "distributed_type: FSDP\nmixed_precision: bf16\nnum_processes: 4\nfsdp_config: {fsdp_use_orig_params: true}\n"
    )
    recipe = load_recipe(RECIPES / "llama3-70b-qlora-fsdp.yaml", [f"distributed.accelerate_config={bad}"])
    with pytest.raises(RecipeError, match="FSDP QLoRA needs fsdp_use_orig_params: false"):
        accelerate_processes(recipe)
    bad.write_text("distributed_type: FSDP\nmixed_precision: fp16\n")
    with pytest.raises(RecipeError, match="mixed_precision bf16"):
        accelerate_processes(recipe)
    good = load_recipe(RECIPES / "llama3-70b-qlora-fsdp.yaml", ["distributed.num_processes=8"])
    assert accelerate_processes(good) == 8


@pytest.mark.parametrize(
    ("text", "size"),
    [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("1.5e10", 15 * 10**9), ("512 MiB", 512 * 2**20), ("7", 7)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_refuses_junk() -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("lots")


def test_check_verdicts(config_dirs: dict[str, Path]) -> None:
    plan = predict(_canonical(config_dirs, "llama-3-8b"))
    h200 = Gpu("NVIDIA H200", 150_109_880_320)
    assert check(plan, h200, 0.15, force=False).endswith(": fits")
    small = Gpu("NVIDIA A10G", 12 * 2**30)  # 10.39 GiB x 1.15 = 11.95 GiB: fits, by 0.05 GiB
    assert check(plan, small, 0.15, force=False).endswith(": fits")
    tight = Gpu("NVIDIA L4", 11 * 2**30)
    assert "running anyway (--force)" in check(plan, tight, 0.15, force=True)
    with pytest.raises(PlanError) as info:
        check(plan, tight, 0.15, force=False)
    assert str(info.value).startswith(
        "VRAM plan: predicted peak 10.4 GiB + 15% headroom = 11.9 GiB > 11.0 GiB on NVIDIA L4 (weights 5.3 GiB, "
    )
    assert "no GPU here, not checked" in check(plan, None, 0.15, force=False)


# --- the CLI ------------------------------------------------------------------------------------------------------


def test_plan_json_from_the_cli(config_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "train",
        "--config",
        str(RECIPES / "llama3-8b-qlora.yaml"),
        "--set",
        f"base.path={config_dirs['llama-3-8b']}",
    ]
    assert loragate_main([*argv, "--plan", "--json", "--gpu-memory", "139GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted_peak_bytes"] == 11_154_890_752 == sum(out["parts"].values())
    assert out["fits"] is True and out["gpu"]["total_bytes"] == 139 * 2**30
    assert out["inputs"]["packed"] is True and out["inputs"]["micro_batch"] == 4 and out["shape"]["vocab"] == 128256
    assert loragate_main([*argv, "--plan"]) == 0
    table = capsys.readouterr().out
    assert "predicted peak" in table and "10.4 GiB" in table and "GPU: none detected" in table
    assert loragate_main([*argv, "--plan", "--set", "lora.r=64"]) == 2  # --plan validates the recipe too
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "rank 64 is above the engines' max_lora_rank 16 "
            "(pass --merge-only if this adapter will only ever be merged)"
        )
    )


def test_a_run_that_does_not_fit_is_refused_in_one_line(
    config_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [
        "train",
        "--config",
        str(RECIPES / "llama3-8b-lora.yaml"),
        "--set",
        f"base.path={config_dirs['llama-3-8b']}",
    ]
    assert loragate_main([*argv, "--output-dir", str(out), "--gpu-memory", "16GiB"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in lines if line.startswith("error: ")]) == 1
    assert lines[-1] == (
        "error: VRAM plan: predicted peak 20.3 GiB + 15% headroom = 23.4 GiB > 16.0 GiB on --gpu-memory 16.0 GiB "
        "(weights 15.0 GiB, adapter+optimizer 0.6 GiB, activations 4.8 GiB for 8192 tokens, LM head/loss 0.0 GiB); "
        "lower sft.per_device_train_batch_size or sft.max_length, turn on sft.gradient_checkpointing or --qlora, "
        "or pass --force"
    )
    assert json.loads((out / "plan.json").read_text())["fits"] is False
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    ("recipe", "qlora", "hub"),
    [
        ("llama3-8b-qlora.yaml", True, "meta-llama/Meta-Llama-3-8B-Instruct"),
        ("llama3-8b-lora.yaml", False, "meta-llama/Meta-Llama-3-8B-Instruct"),
        ("mistral-7b-qlora.yaml", True, "mistralai/Mistral-7B-Instruct-v0.3"),
        ("llama3-70b-qlora-fsdp.yaml", True, "meta-llama/Meta-Llama-3-70B-Instruct"),
    ],
)
def test_real_recipes_spell_out_the_guide(recipe: str, qlora: bool, hub: str) -> None:
    loaded = load_recipe(RECIPES / recipe)
    assert loaded.base.hub == hub and loaded.base.path is None
    assert loaded.lora.model_dump(include={"r", "lora_alpha", "lora_dropout", "target_modules", "bias"}) == {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
        "bias": "none",
    }
    guide = {
        "learning_rate": 2e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "num_train_epochs": 3,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "max_length": 2048,
        "packing": True,
        "gradient_checkpointing": True,
    }
    assert {k: loaded.sft[k] for k in guide} == guide
    q = loaded.quantization
    assert (q.enabled, q.quant_type, q.double_quant, q.compute_dtype) == (qlora, "nf4", True, "bfloat16")
    assert loaded.runtime.vram_headroom == 0.15 and loaded.checks.lora_b_nonzero and loaded.checks.loss_fell
    assert (loaded.distributed.accelerate_config is not None) == recipe.startswith("llama3-70b")
    local = load_recipe(RECIPES / recipe, ["base.path=/models/x"])
    assert local.base.path == "/models/x"  # a local folder wins over the hub id
