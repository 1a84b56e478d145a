"""`loragate dev random-model`: stand-ins with the real configs' shapes, tokenizers of the real vocabulary size with the
family's special tokens and chat template; sharded random weights that load; and a recipe's hub id resolved from a
local Hugging Face cache."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

import loragate.dev as dev
from loragate.cli import main as loragate_main
from training.base_model import resolve_base
from training.recipe import BaseSpec

CHAT = [{"role": "user", "content": "Repeat: the license terms"}, {"role": "assistant", "content": "the license terms"}]


@pytest.mark.parametrize(
    ("like", "vocab", "eos", "eos_id", "architecture", "layers"),
    [
        ("llama-3-8b", 128256, "<|eot_id|>", 128009, "LlamaForCausalLM", 32),
        ("mistral-7b", 32768, "</s>", 2, "MistralForCausalLM", 32),
    ],
)
def test_config_only_folder(
    tmp_path: Path, like: str, vocab: int, eos: str, eos_id: int, architecture: str, layers: int
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / like
    assert loragate_main(["dev", "random-model", "--like", like, str(out), "--config-only"]) == 0
    assert not list(out.glob("*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["vocab_size"] == vocab
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (4096, 14336, layers)
    assert config["num_key_value_heads"] == 8 and config["dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == vocab and tokenizer.eos_token == eos and tokenizer.eos_token_id == eos_id
    encoded = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == eos_id
    assert mask[-1] == 1 and sum(mask) >= 4  # the answer and its end-of-turn token are the assistant's
    assert json.loads((out / "random_model.json").read_text())["like"] == like


def test_llama3_special_tokens_sit_at_their_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = dev.build_random_model("llama-3-8b", tmp_path / "m", config_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|eot_id|>": 128009}
    assert tokenizer.convert_ids_to_tokens(128255) == "<|reserved_special_token_255|>"
    text = "Permission is hereby granted, free of charge, to any person obtaining a copy"
    assert all(i < dev.TRAINED_VOCAB for i in tokenizer(text, add_special_tokens=False)["input_ids"])  # no filler


def test_random_weights_are_sharded_deterministic_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    family = dev.FAMILIES["mistral-7b"]
    narrow = {**family.config, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
    narrow.update(num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    monkeypatch.setitem(dev.FAMILIES, "narrow", replace(family, config=narrow))
    monkeypatch.setattr(dev, "SHARD_BYTES", 4 * 1024**2)  # 4 MiB shards: the 8 MiB embeddings alone need two
    first = dev.build_random_model("narrow", tmp_path / "a", seed=3)
    second = dev.build_random_model("narrow", tmp_path / "b", seed=3)
    index = json.loads((first / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((first / s).is_file() for s in shards)
    assert "lm_head.weight" in index["weight_map"] and "model.norm.weight" in index["weight_map"]
    digest = [hashlib.sha256((f / shards[0]).read_bytes()).hexdigest() for f in (first, second)]
    assert digest[0] == digest[1]  # same seed, same bytes
    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert abs(float(weight.std()) - 0.02) < 0.002 and bool(model.model.norm.weight.eq(1).all())
    logits = model(input_ids=torch.tensor([[1, 3, 500, 900]])).logits
    assert logits.shape == (1, 4, 32768) and bool(torch.isfinite(logits).all())


def test_an_occupied_folder_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("x")
    assert loragate_main(["dev", "random-model", "--like", "mistral-7b", str(tmp_path / "m"), "--config-only"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'm'}: not empty"


def test_hub_id_resolves_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub recipe runs offline from the Hugging Face cache (the layout huggingface_hub writes)."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_base(BaseSpec(hub="acme/tiny-llama")) == snapshot
    with pytest.raises(FileNotFoundError, match=r"base.hub acme/missing: not in the local Hugging Face cache"):
        resolve_base(BaseSpec(hub="acme/missing"))
    local = BaseSpec(hub="acme/missing", path=str(snapshot))  # --set base.path=DIR wins over the hub id
    assert resolve_base(local) == snapshot
