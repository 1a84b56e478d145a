from __future__ import annotations

import hashlib
from pathlib import Path

from training.tiny_model import TinyModelSpec, build_tiny_model, cache_key, cached_tiny_model


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_is_deterministic(tmp_path: Path) -> None:
    spec = TinyModelSpec(vocab_size=512)
    a = build_tiny_model(tmp_path / "a", spec)
    b = build_tiny_model(tmp_path / "b", spec)
    assert _digests(a) == _digests(b)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(_digests(a))


def test_cache_key_changes_with_spec() -> None:
    assert cache_key(TinyModelSpec()) != cache_key(TinyModelSpec(seed=1))


def test_cached_build_is_reused(tmp_path: Path) -> None:
    spec = TinyModelSpec(vocab_size=400)
    first = cached_tiny_model(spec, cache_dir=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_tiny_model(spec, cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp build left behind


def test_transformers_and_peft_load_it(tiny_model: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = tok(text, return_tensors="pt").input_ids
    base_logits = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert not torch.allclose(base_logits, peft_model(ids).logits)


def test_assistant_tokens_are_marked_for_loss(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    out = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert marked == "yo<|im_end|>"
