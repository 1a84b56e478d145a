"""Held-out evaluation of a base model and its adapter, side by side.

Metrics per model: loss and perplexity on the split (the trainer's own masking, so only answer tokens count),
exact match of greedy generations against the reference answer, stop rate (share of generations that end with
the end-of-turn token within `max_new_tokens`), and format compliance against the recipe's output contract
(parseable JSON valid against the schema, a regex full match, or one of the choices). With
`evaluation.constrained`, generations are also made under the contract with outlines. The forgetting canary is
the language-model loss on a small general text set; its base-vs-adapter delta says how much was forgotten.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data import Row
from training.preflight import eos_token_ids, prompt_messages
from training.recipe import EvalSpec

log = logging.getLogger(__name__)

CANARY = (
    "The quick brown fox jumps over the lazy dog.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "This program is distributed in the hope that it will be useful, but without any warranty.",
    "You may copy and distribute verbatim copies of the source code as you receive it.",
    "The library is free software; you can redistribute it and modify it under the same terms.",
    "Each contributor grants you a non-exclusive, worldwide, royalty-free copyright license.",
    "The names of the authors may not be used to endorse products derived from this work.",
    "A document is considered transparent if its format is available to the general public.",
)


@dataclass(frozen=True)
class Generation:
    text: str
    stopped: bool


def reference(row: Row) -> str:
    last = row["messages"][-1] if "messages" in row else row["completion"][-1]
    return str(last["content"])


def exact_match(prediction: str, expected: str) -> bool:
    return prediction.strip() == expected.strip()


def complies(text: str, contract: dict[str, Any]) -> bool:
    """`contract` is normalised (adapters_registry.contract.normalize_contract)."""
    kind = contract["type"]
    if kind == "regex":
        return re.fullmatch(contract["regex"], text.strip()) is not None
    if kind == "choice":
        return text.strip() in contract["choice"]
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return not list(jsonschema.Draft202012Validator(contract["schema"]).iter_errors(value))


def generate(model: Any, tokenizer: Any, rows: list[Row], spec: EvalSpec) -> list[Generation]:
    import torch

    eos_ids = eos_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[Generation] = []
    model.eval()
    try:
        for start in range(0, len(rows), spec.batch_size):
            batch = rows[start : start + spec.batch_size]
            prompts = [
                tokenizer.apply_chat_template(prompt_messages(r), add_generation_prompt=True, tokenize=False)
                for r in batch
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                ids = model.generate(
                    **enc,
                    max_new_tokens=spec.max_new_tokens,
                    do_sample=False,
                    eos_token_id=sorted(eos_ids),
                    pad_token_id=tokenizer.pad_token_id,
                )
            for row_ids in ids[:, enc["input_ids"].shape[1] :].tolist():
                stopped = any(t in eos_ids for t in row_ids)
                out.append(Generation(tokenizer.decode(row_ids, skip_special_tokens=True), stopped))
    finally:
        tokenizer.padding_side = side
    return out


def generate_constrained(
    model: Any, tokenizer: Any, rows: list[Row], spec: EvalSpec, contract: dict[str, Any]
) -> list[str]:
    import outlines
    from outlines.types import JsonSchema, Regex

    kind = contract["type"]
    if kind == "json_schema":
        output_type: Any = JsonSchema(contract["schema"], whitespace_pattern=r"[ ]?")  # compact, like the answers
    elif kind == "regex":
        output_type = Regex(contract["regex"])
    else:
        output_type = Regex("|".join(re.escape(c) for c in contract["choice"]))
    generator = outlines.Generator(outlines.from_transformers(model, tokenizer), output_type)
    texts: list[str] = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(prompt_messages(row), add_generation_prompt=True, tokenize=False)
        texts.append(str(generator(prompt, max_new_tokens=spec.max_new_tokens)))
    return texts


def split_loss(model: Any, trainer: Any, rows: list[Row], batch_size: int) -> float:
    """Mean loss per trained token over `rows`, masked exactly as in training.

    Batches come from the trainer's own collator (with padding-free packing: one flat row with per-document position
    ids and boundaries, all passed on) and go through TRL's fused LM head, which never builds the full logits.
    """
    import torch
    from datasets import Dataset

    prepared = trainer._prepare_dataset(
        Dataset.from_list(rows), trainer.processing_class, trainer.args, False, None, "evaluation"
    )
    total, tokens = 0.0, 0
    model.eval()
    for start in range(0, len(prepared), batch_size):
        items = [prepared[i] for i in range(start, min(start + batch_size, len(prepared)))]
        batch = trainer.data_collator([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            out = model(**batch, use_cache=False, fused_lm_head=True)
        total += float(-out.log_probs.sum())
        tokens += int(out.label_mask.sum())
    return total / max(tokens, 1)


def canary_texts(path: str | None) -> list[str]:
    if path is None:
        return list(CANARY)
    lines = Path(path).read_text().splitlines()
    texts = [json.loads(line)["text"] if line.lstrip().startswith("{") else line for line in lines if line.strip()]
    return texts


def canary_loss(model: Any, tokenizer: Any, texts: list[str]) -> float:
    import torch

    total, tokens = 0.0, 0
    model.eval()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    return total / max(tokens, 1)


def score(generations: list[Generation], rows: list[Row], contract: dict[str, Any] | None) -> dict[str, float]:
    """Exact match, stop rate and (with a contract) format compliance of generations against their rows."""
    n = max(len(rows), 1)
    metrics = {
        "exact_match": sum(exact_match(g.text, reference(r)) for g, r in zip(generations, rows, strict=True)) / n,
        "stop_rate": sum(g.stopped for g in generations) / n,
    }
    if contract is not None:
        metrics["format_compliance"] = sum(complies(g.text, contract) for g in generations) / n
    return metrics


def evaluate_model(
    model: Any, trainer: Any, rows: list[Row], spec: EvalSpec, contract: dict[str, Any] | None
) -> dict[str, Any]:
    tokenizer = trainer.processing_class
    rows = rows[: spec.max_examples]
    loss = split_loss(model, trainer, rows, spec.batch_size)
    generations = generate(model, tokenizer, rows, spec)
    metrics: dict[str, Any] = {"rows": len(rows), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    metrics.update(score(generations, rows, contract))
    metrics["samples"] = [
        {"expected": reference(r), "generated": g.text, "stopped": g.stopped}
        for g, r in zip(generations[:3], rows, strict=False)
    ]
    if spec.constrained and contract is not None:
        texts = generate_constrained(model, tokenizer, rows, spec, contract)
        metrics["constrained_exact_match"] = sum(
            exact_match(t, reference(r)) for t, r in zip(texts, rows, strict=True)
        ) / max(len(rows), 1)
        metrics["constrained_format_compliance"] = sum(complies(t, contract) for t in texts) / max(len(rows), 1)
    return metrics


def evaluate_run(trainer: Any, rows: list[Row], spec: EvalSpec, contract: dict[str, Any] | None) -> dict[str, Any]:
    """Adapter vs base (the same weights with the adapter disabled) on `rows`, plus the forgetting canary."""
    model = trainer.model
    tokenizer = trainer.processing_class
    texts = canary_texts(spec.canary)
    adapter = evaluate_model(model, trainer, rows, spec, contract)
    adapter_canary = canary_loss(model, tokenizer, texts)
    with model.disable_adapter():
        base = evaluate_model(model, trainer, rows, spec, contract)
        base_canary = canary_loss(model, tokenizer, texts)
    return {
        "base": base,
        "adapter": adapter,
        "canary": {"base_loss": base_canary, "adapter_loss": adapter_canary, "delta": adapter_canary - base_canary},
    }
