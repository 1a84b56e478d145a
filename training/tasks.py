"""Built-in synthetic tasks: deterministic chat datasets a tiny model can learn, checkable by exact match.

Each prompt hides one keyword among filler words; the answer names the keyword's class. Every word is a single
token of the tiny model's tokenizer, and every answer starts with a token unique within its task, so a
two-layer model can learn the task with a LoRA adapter in a few hundred steps.

- `topic`: the answer is the class name as plain text (`license`, `software`, `document`, `author`).
- `action-json`: the answer is a JSON object `{"<verb>": true}`; `ACTION_JSON_CONTRACT` is its output contract.
  (The verb comes first: with `{"action": "<verb>"}` the class token sits eight tokens into the answer, and the
  tiny model did not learn it in 3 epochs: exact match 0.20, chance level, while the format was perfect.)
- `echo`: the answer repeats the prompt's words. Lengths follow a log-normal like chat SFT data (median about 150
  words, ~300 tokens with a Llama-3-sized tokenizer, a tail to ~2,000 tokens), so it exercises packing, truncation
  and long batches on real-size models; answers use a 59-word vocabulary, so even a random-weight base's loss falls.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]

FILLERS = tuple(
    [
        "this",
        "that",
        "with",
        "some",
        "each",
        "other",
        "these",
        "more",
        "only",
        "same",
        "also",
        "which",
        "such",
        "then",
        "there",
        "will",
        "must",
        "shall",
        "have",
        "from",
        "under",
        "without",
        "above",
        "here",
    ]
)

TOPICS: dict[str, tuple[str, ...]] = {
    "license": ("patent", "warranty", "copyright", "terms", "conditions", "permission"),
    "software": ("program", "library", "source", "executable", "code", "version"),
    "document": ("file", "files", "text", "title", "section", "notice"),
    "author": ("user", "recipients", "authors", "public", "third", "author"),
}

ACTIONS: dict[str, tuple[str, ...]] = {
    "copy": ("copy", "copies", "copyright"),
    "modify": ("modify", "modified", "change"),
    "distribute": ("distribute", "distributed", "convey"),
    "publish": ("publish", "published", "offer"),
}

# Exactly one of the action flags, set to true: `{"modify": true}`.
ACTION_JSON_CONTRACT: dict[str, Any] = {
    "type": "object",
    "properties": {action: {"const": True} for action in sorted(ACTIONS)},
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
}


def _sentence(rng: random.Random, keyword: str, min_fill: int = 1, max_fill: int = 3) -> str:
    words = [rng.choice(FILLERS) for _ in range(rng.randint(min_fill, max_fill))]
    words.insert(rng.randint(0, len(words)), keyword)
    return " ".join(words)


def _classify(rng: random.Random, classes: dict[str, tuple[str, ...]]) -> tuple[str, str]:
    label = rng.choice(sorted(classes))
    return label, rng.choice(classes[label])


def topic(rows: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    out: list[Row] = []
    for _ in range(rows):
        label, keyword = _classify(rng, TOPICS)
        out.append(
            {
                "prompt": [{"role": "user", "content": f"Topic: {_sentence(rng, keyword)}"}],
                "completion": [{"role": "assistant", "content": label}],
            }
        )
    return out


def action_json(rows: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    out: list[Row] = []
    for _ in range(rows):
        label, keyword = _classify(rng, ACTIONS)
        out.append(
            {
                "prompt": [{"role": "user", "content": f"Request: {_sentence(rng, keyword)}"}],
                # Compact JSON, the form the serving grammar produces when the gateway enforces the contract
                # (vLLM's xgrammar with disable_any_whitespace): trained and enforced answers then agree.
                "completion": [{"role": "assistant", "content": json.dumps({label: True}, separators=(",", ":"))}],
            }
        )
    return out


ECHO_WORDS = tuple(sorted({*FILLERS, *(w for ws in (*TOPICS.values(), *ACTIONS.values()) for w in ws)}))


def echo(rows: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    out: list[Row] = []
    for _ in range(rows):
        words = min(1000, max(4, int(rng.lognormvariate(5.0, 0.8))))
        text = " ".join(rng.choice(ECHO_WORDS) for _ in range(words))
        out.append(
            {
                "prompt": [{"role": "user", "content": f"Repeat: {text}"}],
                "completion": [{"role": "assistant", "content": text}],
            }
        )
    return out


TASKS: dict[str, Callable[[int, int], list[Row]]] = {"topic": topic, "action-json": action_json, "echo": echo}


def task_rows(task: str, rows: int, seed: int) -> list[Row]:
    try:
        make = TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(sorted(TASKS))}") from None
    return make(rows, seed)
