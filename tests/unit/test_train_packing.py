"""Packing that cannot leak between samples: a document's logits are the same packed into one padding-free row (TRL's
bfd packing: position ids restarting per document, boundaries in cu_seq_lens) and alone, on the tiny model.

The control shows the test can fail: the same flat row without the boundaries (one causal sequence) changes every
document after the first. On the CPU `loragate_varlen` falls back to sdpa with a block mask built from the
boundaries; on a CUDA GPU it runs torch's varlen flash kernel (checked on the H200: max |diff| 0.008 in bf16 against
2.1 without boundaries, benchmarks/bench_train.py check).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.training import RECIPES
from training.attention import VARLEN, document_mask, register

TEXTS = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software",
    "The licenses for most software are designed to take away your freedom to share and change it. By contrast, "
    "the GNU General Public License is intended to guarantee your freedom to share and change free software.",
    "You may copy and distribute verbatim copies of the source code as you receive it",
)


def _packed_batch(tokenizer: Any) -> tuple[dict[str, Any], list[list[int]]]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(
        [{"input_ids": d} for d in docs]
    )
    return {k: v for k, v in batch.items() if k != "labels"}, docs


def _model(path: Path, attn: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def _diffs(packed: torch.Tensor, model: Any, docs: list[list[int]]) -> list[float]:
    out, start = [], 0
    with torch.no_grad():
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc])).logits[0]
            out.append(float((packed[start : start + len(doc)] - alone).abs().max()))
            start += len(doc)
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_varlen_attention_packed_equals_alone(tiny_model: Path, use_cache: bool) -> None:
    from transformers import AutoTokenizer

    batch, docs = _packed_batch(AutoTokenizer.from_pretrained(tiny_model))
    assert batch["position_ids"][0].tolist() == [i for d in docs for i in range(len(d))]
    assert batch["cu_seq_lens_q"].tolist() == [0, len(docs[0]), len(docs[0]) + len(docs[1]), sum(map(len, docs))]
    assert "attention_mask" not in batch
    model = _model(tiny_model, register())
    with torch.no_grad():
        packed = model(**batch, use_cache=use_cache).logits[0]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert max(_diffs(packed, model, docs)) < 1e-4
    control = _diffs(leaky, model, docs)
    assert control[0] < 1e-4 and min(control[1:]) > 0.05  # without boundaries the later documents change


def test_transformers_sdpa_detects_packed_position_ids(tiny_model: Path) -> None:
    """Plain sdpa builds the block mask from the position ids too, but only without a KV cache (as in training)."""
    from transformers import AutoTokenizer

    batch, docs = _packed_batch(AutoTokenizer.from_pretrained(tiny_model))
    model = _model(tiny_model, "sdpa")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        cached = model(**batch, use_cache=True).logits[0]
    assert max(_diffs(packed, model, docs)) < 1e-4
    assert max(_diffs(cached, model, docs)[1:]) > 0.05  # with a cache transformers skips the detection


def test_document_mask() -> None:
    mask = document_mask(torch.tensor([0, 2, 5]), 5, "cpu")[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_the_trainer_packs_padding_free_and_its_batches_do_not_leak(tiny_model: Path, tmp_path: Path) -> None:
    """The recipe path: `packing: true` -> TRL bfd, padding-free rows; every document of a real training batch
    gives the logits it gives alone."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from training.model import load_model, lora_config, make_sft_config
    from training.recipe import load_recipe
    from training.tasks import task_rows

    recipe = load_recipe(
        RECIPES / "tiny.yaml",
        [
            f"base.path={tiny_model}",
            "base.tiny=null",
            "sft.packing=true",
            "sft.max_length=128",
            "sft.per_device_train_batch_size=2",
            "runtime.attention=varlen",
            "sft.eval_strategy=no",
        ],
    )
    model = load_model(tiny_model, recipe)
    assert model.config._attn_implementation == VARLEN
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    trainer = SFTTrainer(
        model=model,
        args=make_sft_config(recipe, tmp_path, "prompt_completion"),
        train_dataset=Dataset.from_list(task_rows("topic", 64, seed=3)),
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    cu = batch["cu_seq_lens_q"].tolist()
    assert len(cu) > 4 and cu[-1] == batch["input_ids"].shape[1]  # many short documents in one flat row
    assert all(batch["position_ids"][0, start] == 0 for start in cu[:-1])
    peft_model = trainer.model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = peft_model(**inputs).logits[0]
    docs = [batch["input_ids"][0, a:b].tolist() for a, b in itertools.pairwise(cu)]
    assert max(_diffs(packed, peft_model, docs)) < 1e-4


def test_attention_can_be_switched_back_and_forth(tiny_model: Path) -> None:
    model = _model(tiny_model, "sdpa")
    model.set_attn_implementation(register())
    assert model.config._attn_implementation == VARLEN
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
