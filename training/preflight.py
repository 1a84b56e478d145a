"""Loss-mask preflight: render the first examples exactly as the trainer will, and refuse a broken mask.

The examples go through TRL's own dataset preparation (the tokenizer's chat template, never string concatenation),
so the view shows the labels the loss will really see. Two mistakes are refused before any training step:
the prompt is trained on (it should be masked), or the assistant's end-of-turn token is masked out of the loss
(the model would never learn to stop; the loss still looks healthy, so this only shows at inference).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data import Row
from training.errors import TrainingError

log = logging.getLogger(__name__)

IGNORE = -100
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"
PREFLIGHT_FILE = "preflight.txt"


class PreflightError(TrainingError):
    """The loss mask is wrong for at least one example; the message says which and why."""


@dataclass(frozen=True)
class MaskedExample:
    input_ids: list[int]
    trained: list[bool]
    prompt_len: int


def prompt_messages(row: Row) -> list[dict[str, str]]:
    if "messages" in row:
        return list(row["messages"][:-1])
    return list(row["prompt"])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check_example(example: MaskedExample, eos_ids: set[int], index: int) -> list[str]:
    """The problems with one example's mask (pure; empty when it is right)."""
    problems: list[str] = []
    trained_prompt = sum(example.trained[: example.prompt_len])
    if trained_prompt:
        problems.append(
            f"example {index}: {trained_prompt} prompt token(s) are trained on; the prompt must be masked out of the "
            "loss (prompt-completion data: leave sft.completion_only_loss unset; messages data: assistant_only_loss)"
        )
    answer = range(example.prompt_len, len(example.input_ids))
    if not any(example.trained[i] for i in answer):
        problems.append(f"example {index}: no token of the assistant's answer is trained on")
    eos_positions = [i for i in answer if example.input_ids[i] in eos_ids]
    if not eos_positions:
        problems.append(
            f"example {index}: the chat template emits no end-of-turn token after the assistant's answer; "
            "the model would never learn to stop"
        )
    elif not example.trained[eos_positions[0]]:
        problems.append(
            f"example {index}: the assistant's end-of-turn token is masked out of the loss; the model would never "
            "learn to stop (put it inside {% generation %}...{% endgeneration %} in the chat template)"
        )
    return problems


def render(example: MaskedExample, tokenizer: Any) -> str:
    """Inline view: trained tokens inside [[ ]], masked tokens as plain text."""
    parts: list[str] = []
    for token_id, trained in zip(example.input_ids, example.trained, strict=True):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(parts)


def masked_examples(trainer: Any, rows: list[Row]) -> list[MaskedExample]:
    """Prepare `rows` through the trainer's own pipeline (no packing) and pair each with its prompt length."""
    from datasets import Dataset

    tokenizer = trainer.processing_class
    prepared = trainer._prepare_dataset(  # TRL's tokenisation + label building, exactly as used for training
        Dataset.from_list(rows), tokenizer, trainer.args, packing=False, formatting_func=None, dataset_name="preflight"
    )
    if len(prepared) != len(rows):
        raise PreflightError(
            f"{len(rows) - len(prepared)} of the first {len(rows)} examples have no trained token at all "
            "(TRL drops them); check the chat template's {% generation %} markers and the data format"
        )
    out: list[MaskedExample] = []
    for row, item in zip(rows, prepared, strict=True):
        ids = list(item["input_ids"])
        labels = list(item["labels"])
        prompt_ids = tokenizer.apply_chat_template(
            prompt_messages(row), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(prompt_ids, dict):
            prompt_ids = prompt_ids["input_ids"]
        out.append(MaskedExample(ids, [label != IGNORE for label in labels], common_prefix(list(prompt_ids), ids)))
    return out


def eos_token_ids(tokenizer: Any, generation_eos: int | list[int] | None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(generation_eos)
    return ids


def run_preflight(trainer: Any, rows: list[Row], out_dir: Path, count: int = 5) -> str:
    """Write and return the loss-mask view of the first `count` rows; raise PreflightError when a mask is wrong."""
    tokenizer = trainer.processing_class
    examples = masked_examples(trainer, rows[:count])
    eos_ids = eos_token_ids(tokenizer, getattr(trainer.model.generation_config, "eos_token_id", None))
    lines = [
        f"Loss-mask preflight: the first {len(examples)} training examples as the trainer tokenises them.",
        f"Tokens inside {TRAINED_OPEN} {TRAINED_CLOSE} are trained on; the rest is masked out of the loss.",
        "",
    ]
    problems: list[str] = []
    for i, example in enumerate(examples):
        trained = sum(example.trained)
        size = len(example.input_ids)
        lines.append(f"--- example {i}: {size} tokens, {trained} trained, prompt {example.prompt_len}")
        lines.append(render(example, tokenizer))
        problems.extend(check_example(example, eos_ids, i))
    if problems:
        lines += ["", "REFUSED:", *problems]
    view = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PREFLIGHT_FILE).write_text(view)
    if problems:
        raise PreflightError(f"{problems[0]} ({len(problems)} problem(s); see {out_dir / PREFLIGHT_FILE})")
    return view
