"""Real merges on the tiny model: LoRA, QLoRA (trained on a bitsandbytes 4-bit load), DoRA, modules_to_save,
the refusal path and broken inputs. Equivalence numbers were measured on this machine; the bounds below leave
room only for the one-token noise that bf16 rounding of the merged weights causes on a random base's flat logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from training.merge import MANIFEST_NAME, MergeError, MergeOptions, MergeRefused, merge_adapter
from training.tiny_model import build_random_adapter

# What training records (training/publish.py); this adapter was trained without double quantisation.
QLORA_TRAINING = {"hyperparameters": {"qlora": True, "quantization": {"quant_type": "nf4", "double_quant": False}}}
PROBES = 8
TOKENS = PROBES * 16


def make_qlora_adapter(base: Path, out: Path, *, seed: int = 5, steps: int = 3) -> Path:
    """A real QLoRA adapter: PEFT (standard init, B = 0) on a bitsandbytes NF4 load of the base, trained a few steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.manual_seed(seed)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer(["The licensee may copy and distribute verbatim copies."], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-adapters")
    return {
        "lora": build_random_adapter(tiny_model, root / "lora", seed=11),
        "dora": build_random_adapter(tiny_model, root / "dora", seed=12, use_dora=True),
        "mts": build_random_adapter(
            tiny_model, root / "mts", seed=13, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
        ),
        "qlora": make_qlora_adapter(tiny_model, root / "qlora"),
    }


def _manifest(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / MANIFEST_NAME).read_text())
    return data


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_lora_merge_exports_checked_model(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    provenance = {"ref": "bot@3", "base_fingerprint": "sha256:abc"}
    result = merge_adapter(tiny_model, adapters["lora"], out, provenance=provenance)

    report = result.report
    assert (report.probes, report.tokens, report.passed, report.forced) == (PROBES, TOKENS, True, False)
    assert report.greedy_agreement >= 127 / 128  # measured 127/128 (bf16 rounding flips one near-tie)
    assert report.mean_token_kl < 1e-5  # measured 7.6e-07
    assert report.max_logit_diff < 0.02  # measured 0.0076
    assert result.merge_base == "original"
    assert _leftovers(tmp_path) == ["merged"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", MANIFEST_NAME} <= set(
        _leftovers(out)
    )
    manifest = _manifest(out)
    assert manifest["source"] == provenance
    assert manifest["merge"] == {"base": "original", "quantization": None, "precision": "bf16", "dtype": "bfloat16"}
    assert manifest["equivalence"]["greedy_agreement"] == report.greedy_agreement

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert str(merged.dtype) == "torch.bfloat16"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template


def test_fp32_export_is_exact(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    report = merge_adapter(tiny_model, adapters["lora"], tmp_path / "m", MergeOptions(precision="fp32")).report
    assert report.greedy_agreement == 1.0
    assert report.max_logit_diff < 1e-4  # float32 re-association only


def test_qlora_merges_into_dequantized_base(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    dequantized = merge_adapter(tiny_model, adapters["qlora"], tmp_path / "deq", training=QLORA_TRAINING)
    assert dequantized.merge_base == "dequantized"
    assert dequantized.report.reference == "4-bit base + adapter (PEFT)"
    assert dequantized.report.greedy_agreement == 1.0  # measured: 128/128, mean KL 3.5e-07
    assert _manifest(tmp_path / "deq")["merge"]["quantization"] == {
        "quant_type": "nf4",
        "double_quant": False,
        "compute_dtype": "bfloat16",
    }
    assert _manifest(tmp_path / "deq")["adapter"]["qlora"] is True
    config = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain bf16 checkpoint any engine loads
    assert config["dtype"] == "bfloat16"

    # The original-base merge drifts from what was trained: forced through, it records the worse numbers.
    original = merge_adapter(
        tiny_model,
        adapters["qlora"],
        tmp_path / "orig",
        MergeOptions(qlora_base="original", force=True),
        training=QLORA_TRAINING,
    )
    assert original.merge_base == "original"
    assert original.report.greedy_agreement < 0.95  # measured 87.5% (112/128)
    assert original.report.mean_token_kl > 100 * dequantized.report.mean_token_kl  # measured 3.1e-04, ~900x
    assert (original.report.passed, original.report.forced) == (False, True)
    assert _manifest(tmp_path / "orig")["equivalence"]["forced"] is True


@pytest.mark.parametrize("kind", ["dora", "mts"])
def test_merge_only_adapters_merge(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path, kind: str) -> None:
    result = merge_adapter(tiny_model, adapters[kind], tmp_path / kind)
    assert result.report.passed
    assert result.report.greedy_agreement >= 127 / 128
    adapter = _manifest(tmp_path / kind)["adapter"]
    assert (adapter["use_dora"], adapter["modules_to_save"]) == (
        (True, None) if kind == "dora" else (False, ["lm_head"])
    )


def test_refuses_qlora_into_original_base(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "nope"
    with pytest.raises(MergeRefused, match="nothing written") as info:
        merge_adapter(tiny_model, adapters["qlora"], out, MergeOptions(qlora_base="original"), training=QLORA_TRAINING)
    assert info.value.report.greedy_agreement == 112 / 128
    assert _leftovers(tmp_path) == []


def test_refuses_below_a_strict_threshold(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    # bf16 export agrees on 127/128 tokens; a 100% requirement refuses it.
    with pytest.raises(MergeRefused, match=r"agreement 99\.22% < 100%"):
        merge_adapter(tiny_model, adapters["lora"], tmp_path / "strict", MergeOptions(min_agreement=1.0))
    assert _leftovers(tmp_path) == []


def test_broken_adapter_file_leaves_nothing(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapters["lora"] / "adapter_config.json").read_bytes())
    weights = (adapters["lora"] / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(MergeError, match="cannot apply the adapter"):
        merge_adapter(tiny_model, broken, tmp_path / "out")
    assert _leftovers(tmp_path) == ["broken"]


def test_existing_output_is_refused(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge_adapter(tiny_model, adapters["lora"], out)
    assert _leftovers(out) == ["keep.txt"]
    assert _leftovers(tmp_path) == ["out"]


def test_adapter_chat_template_wins(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from training.merge import _load_tokenizer

    adapter = tmp_path / "with-template"
    shutil.copytree(adapters["lora"], adapter)
    assert _load_tokenizer(tiny_model, adapter).chat_template == _load_tokenizer(tiny_model, tiny_model).chat_template
    (adapter / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert _load_tokenizer(tiny_model, adapter).chat_template == "{{ messages[0]['content'] }}"
