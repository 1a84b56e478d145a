"""Push-time validation: each refusal is built from a real adapter, made malformed, and must write nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_registry.contract import normalize_contract
from adapters_registry.errors import ValidationError
from adapters_registry.registry import Registry
from training.tiny_model import build_random_adapter

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "adapter"
    shutil.copytree(src, dest)
    return dest


def _edit_config(adapter: Path, **changes: Any) -> None:
    config = json.loads((adapter / CONFIG).read_text())
    config.update(changes)
    (adapter / CONFIG).write_text(json.dumps(config))


def _edit_tensors(adapter: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(adapter / WEIGHTS)
    fn(tensors)
    save_file(tensors, adapter / WEIGHTS)


def _stored(reg: Registry) -> list[str]:
    return reg.store.list_keys("adapters/") + reg.store.list_keys("blobs/")


def _refused(reg: Registry, adapter: Path, name: str = "bad") -> str:
    with pytest.raises(ValidationError) as info:
        reg.push(adapter, name, "tiny")
    assert _stored(reg) == []
    return str(info.value)


def _set_nan(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q0}.lora_A.weight"][0, 0] = float("nan")


def _set_inf(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q0}.lora_B.weight"] = t[f"{Q0}.lora_B.weight"].to(torch.bfloat16)
    t[f"{Q0}.lora_B.weight"][3, 1] = float("-inf")


def _narrow(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q0}.lora_A.weight"] = t[f"{Q0}.lora_A.weight"][:, :64].contiguous()


def _float64(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q0}.lora_A.weight"] = t[f"{Q0}.lora_A.weight"].to(torch.float64)


def _drop_b(t: dict[str, torch.Tensor]) -> None:
    del t[f"{Q0}.lora_B.weight"]


def _ghost_layer(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = t.pop(f"{Q0}.lora_A.weight")


def _stray(t: dict[str, torch.Tensor]) -> None:
    t["optimizer_state"] = torch.zeros(3)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_set_nan, f"tensor {Q0}.lora_A.weight holds NaN or infinite values (1 tensors affected)"),
        (_set_inf, f"tensor {Q0}.lora_B.weight holds NaN or infinite values (1 tensors affected)"),
        (_narrow, f"tensor {Q0}.lora_A.weight has shape [8, 64] but base 'tiny' with rank 8 needs [8, 128]"),
        (_float64, f"tensor {Q0}.lora_A.weight has dtype F64; only F32, BF16 and F16 are accepted"),
        (_drop_b, "module model.layers.0.self_attn.q_proj has no lora_B weight"),
        (
            _ghost_layer,
            "tensor base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight: module "
            "model.layers.7.self_attn.q_proj does not exist on base 'tiny'",
        ),
        (_stray, "unexpected tensor optimizer_state: not a LoRA weight of a module on base 'tiny'"),
    ],
    ids=["nan", "inf-bf16", "wrong-shape", "float64", "missing-lora-b", "unknown-module", "stray-tensor"],
)
def test_bad_tensors_are_refused(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path, mutate: Callable[..., None], reason: str
) -> None:
    adapter = _copy(adapter_dirs[0], tmp_path)
    _edit_tensors(adapter, mutate)
    assert _refused(registry, adapter) == f"{adapter / WEIGHTS}: {reason}"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"peft_type": "IA3"}, "peft_type is 'IA3'; only LORA adapters are accepted"),
        (
            {"init_lora_weights": "olora"},
            "init_lora_weights='olora' was not converted: this adapter only works with the base weights that its "
            "initialisation modified; save it with path_initial_model_for_weight_conversion to get a plain LoRA",
        ),
        (
            {"init_lora_weights": "corda"},
            "init_lora_weights='corda' was not converted: this adapter only works with the base weights that its "
            "initialisation modified; save it with path_initial_model_for_weight_conversion to get a plain LoRA",
        ),
        ({"target_modules": ["q_proj", "wq"]}, "target module 'wq' does not exist on base 'tiny'"),
        ({"r": "8"}, "r must be a positive integer, got '8'"),
    ],
    ids=["peft-type", "olora", "corda", "unknown-target", "rank-type"],
)
def test_bad_configs_are_refused(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path, changes: dict[str, Any], reason: str
) -> None:
    adapter = _copy(adapter_dirs[0], tmp_path)
    _edit_config(adapter, **changes)
    assert _refused(registry, adapter) == f"{adapter / CONFIG}: {reason}"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (
            "adapter_model.bin",
            "pickle-based .bin files are refused (they can run code when loaded); save with safetensors",
        ),
        (
            "training_args.pt",
            "pickle-based .pt files are refused (they can run code when loaded); save with safetensors",
        ),
        ("modeling_custom.py", "code files are refused in an adapter"),
        ("model-00001.safetensors", "unexpected weights file; an adapter has exactly one adapter_model.safetensors"),
        ("notes.docx", "unsupported file type '.docx'"),
    ],
)
def test_unsafe_files_are_refused(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path, extra: str, reason: str
) -> None:
    adapter = _copy(adapter_dirs[0], tmp_path)
    if extra.endswith((".bin", ".pt")):
        torch.save({"w": torch.zeros(2)}, adapter / extra)
    else:
        (adapter / extra).write_text("import os\n")
    assert _refused(registry, adapter) == f"{adapter / extra}: {reason}"


@pytest.mark.parametrize("missing", [CONFIG, WEIGHTS])
def test_missing_files_are_refused(registry: Registry, adapter_dirs: list[Path], tmp_path: Path, missing: str) -> None:
    adapter = _copy(adapter_dirs[0], tmp_path)
    (adapter / missing).unlink()
    assert _refused(registry, adapter) == f"{adapter / missing}: missing (required in every adapter)"


def test_unparseable_files_are_refused(registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> None:
    adapter = _copy(adapter_dirs[0], tmp_path)
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert _refused(registry, adapter).startswith(f"{adapter / WEIGHTS}: tensor ")
    assert _refused(registry, adapter).endswith(": data offsets outside the file (truncated?)")
    (adapter / WEIGHTS).write_bytes(b"PK\x03\x04 a zip file")
    assert _refused(registry, adapter) == f"{adapter / WEIGHTS}: not a safetensors file (header length out of range)"
    (adapter / CONFIG).write_text("{not json")
    assert _refused(registry, adapter).startswith(f"{adapter / CONFIG}: not valid JSON: ")


def test_rank_above_512_is_refused(registry: Registry, tiny_model: Path, tmp_path: Path) -> None:
    adapter = build_random_adapter(tiny_model, tmp_path / "r600", r=600, target_modules=["q_proj"])
    assert _refused(registry, adapter) == (
        f"{adapter / WEIGHTS}: rank 600 exceeds 512, the largest --max-lora-rank vLLM supports"
    )


def test_unconverted_pissa_is_refused(registry: Registry, tiny_model: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    get_peft_model(model, config).save_pretrained(tmp_path / "pissa")
    adapter = tmp_path / "pissa"
    assert _refused(registry, adapter) == (
        f"{adapter / CONFIG}: init_lora_weights='pissa' was not converted: this adapter only works with the base "
        "weights that its initialisation modified; save it with path_initial_model_for_weight_conversion to get a "
        "plain LoRA"
    )


def test_shapes_are_checked_against_the_bound_base(
    registry: Registry, adapter_dirs: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "hidden_size": 256}))
    registry.add_base(wide, "wide")
    with pytest.raises(ValidationError) as info:
        registry.push(adapter_dirs[0], "a", "wide")
    assert str(info.value) == (
        f"{adapter_dirs[0] / WEIGHTS}: tensor base_model.model.model.layers.0.mlp.down_proj.lora_B.weight has shape "
        "[128, 8] but base 'wide' with rank 8 needs [256, 8]"
    )
    assert _stored(registry) == []


def test_names_are_checked(registry: Registry, adapter_dirs: list[Path]) -> None:
    assert _refused(registry, adapter_dirs[0], name="tiny") == (
        "adapter name 'tiny' is the name of a registered base model; pick another"
    )
    assert _refused(registry, adapter_dirs[0], name="a/b") == (
        "invalid adapter name 'a/b': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )


def test_bad_contract_is_refused(registry: Registry, adapter_dirs: list[Path]) -> None:
    with pytest.raises(ValueError) as expected:
        normalize_contract({"choice": []})
    with pytest.raises(ValidationError) as info:
        registry.push(adapter_dirs[0], "a", "tiny", contract={"choice": []})
    assert str(info.value) == f"output contract refused: {expected.value}"
    assert _stored(registry) == []


@pytest.mark.parametrize(
    ("lora_kw", "reason"),
    [
        ({"use_dora": True}, "DoRA (use_dora=true)"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] carries full module weights"),
        ({"trainable_token_indices": [5, 6]}, "trainable token deltas (trainable_token_indices)"),
        ({"lora_bias": True}, "trained biases (bias='none', lora_bias=True)"),
    ],
    ids=["dora", "modules-to-save", "trainable-tokens", "lora-bias"],
)
def test_merge_only_adapters_are_accepted_and_marked(
    registry: Registry, tiny_model: Path, tmp_path: Path, lora_kw: dict[str, Any], reason: str
) -> None:
    adapter = build_random_adapter(tiny_model, tmp_path / "a", r=4, target_modules=["q_proj", "v_proj"], **lora_kw)
    manifest = registry.push(adapter, "m", "tiny")
    assert (manifest.serving, manifest.serving_reason) == ("merge-only", reason)
    assert registry.resolve("m").serving == "merge-only"


def test_plain_lora_is_served_as_lora(registry: Registry, adapter_dirs: list[Path]) -> None:
    manifest = registry.push(adapter_dirs[0], "plain", "tiny")
    assert (manifest.serving, manifest.serving_reason) == ("lora", None)
    assert (manifest.r, manifest.lora_alpha, manifest.dtype, manifest.peft_type) == (8, 16.0, "float32", "LORA")
    assert manifest.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_training_metadata_must_be_json(registry: Registry, adapter_dirs: list[Path]) -> None:
    with pytest.raises(ValidationError) as info:
        registry.push(adapter_dirs[0], "a", "tiny", training={"metrics": {"loss": float("nan")}})
    assert str(info.value) == "training metadata must be plain JSON: Out of range float values are not JSON compliant"
    assert _stored(registry) == []


def test_base_directories_are_checked(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        registry.add_base(tmp_path, "empty")
    assert str(info.value) == f"{tmp_path / 'config.json'}: missing (a base model directory needs its config.json)"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "hidden_size": 8,
                                                      "num_hidden_layers": 1, "vocab_size": 10}))  # fmt: skip
    with pytest.raises(ValidationError) as info:
        registry.add_base(tmp_path, "odd")
    assert str(info.value).startswith(f"{tmp_path}: transformers cannot build this architecture: ")
    assert "\n" not in str(info.value)
    assert [b.name for b in registry.list_bases()] == ["tiny"]
