"""Golden prompts: what a version's parity gate runs before it gets any of an alias's traffic (gateway/parity.py).

A version carries them from its push (`push --golden FILE`, or by default the training run's held-out test rows),
stored as one content-addressed blob beside its files and named in its manifest (`AdapterManifest.golden`). Each
row is a chat prompt and, usually, the reference answer:

    {"messages": [{"role": "user", "content": "..."}], "reference": "..."}

Read from the training data's own formats as well: `{"messages": [... , {"role": "assistant", ...}]}` (the last
assistant turn is the reference) and `{"prompt": [...] | "...", "completion": [...] | "..."}`. A row without a
reference (`messages` ending in a user turn) is judged against the current version's answer instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_registry.errors import NotFoundError, ValidationError
from adapters_registry.layout import blob_key
from adapters_registry.manifest import GoldenSet
from adapters_registry.store import ObjectStore

MAX_GOLDEN_ROWS = 1_000
MAX_GOLDEN_BYTES = 4 << 20
MAX_GOLDEN_TOKENS = 4_096
ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})

GoldenRow = dict[str, Any]  # {"messages": [...], "reference": str | None}


@dataclass(frozen=True)
class GoldenInput:
    """Golden prompts given to a push: rows in any accepted form, where they came from, the tokens an answer."""

    rows: list[Any]
    source: str
    max_tokens: int | None = None


def normalize_rows(rows: Any, where: str) -> list[GoldenRow]:
    """The rows in canonical form; ValidationError naming the row and the reason in one line."""
    if not isinstance(rows, list) or not rows:
        raise ValidationError(f"{where}: golden prompts are a non-empty list of rows")
    if len(rows) > MAX_GOLDEN_ROWS:
        raise ValidationError(f"{where}: {len(rows)} golden rows, more than the {MAX_GOLDEN_ROWS} a gate runs")
    return [_row(row, f"{where} row {number}") for number, row in enumerate(rows, 1)]


def _row(row: Any, where: str) -> GoldenRow:
    if not isinstance(row, dict):
        raise ValidationError(f"{where}: a golden row is a JSON object, not {type(row).__name__}")
    reference = row.get("reference")
    if "messages" in row:
        extra = sorted(set(row) - {"messages", "reference"})
        messages = _messages(row["messages"], where)
        if messages[-1]["role"] == "assistant":
            if reference is not None:
                raise ValidationError(f"{where}: a reference and a final assistant turn; give one of them")
            reference = messages.pop()["content"]
            if not messages:
                raise ValidationError(f"{where}: no prompt before the assistant's answer")
    elif "prompt" in row:
        extra = sorted(set(row) - {"prompt", "completion", "reference"})
        prompt = row["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, where)
        if "completion" in row:
            completion = row["completion"]
            if isinstance(completion, list):
                completion = _messages(completion, where)[-1]["content"]
            reference = completion
    else:
        raise ValidationError(f"{where}: a golden row needs `messages` or `prompt`")
    if extra:
        raise ValidationError(f"{where}: unexpected key(s) {', '.join(extra)}")
    if reference is not None and not isinstance(reference, str):
        raise ValidationError(f"{where}: the reference answer must be a string")
    if messages[-1]["role"] == "assistant":
        raise ValidationError(f"{where}: the prompt ends with an assistant turn")
    return {"messages": messages, "reference": reference}


def _messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValidationError(f"{where}: `messages` must be a non-empty list")
    out = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValidationError(f"{where}: every message needs a role ({', '.join(sorted(ROLES))})")
        if not isinstance(message.get("content"), str):
            raise ValidationError(f"{where}: every message's content must be a string")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def read_golden_file(path: Path) -> list[GoldenRow]:
    """Rows from a JSONL file (a JSON list works too), normalised; ValidationError with the line and reason."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot read golden prompts {path}: {exc}") from exc
    if len(text) > MAX_GOLDEN_BYTES:
        raise ValidationError(f"{path}: {len(text):,} bytes of golden prompts, more than {MAX_GOLDEN_BYTES:,}")
    if text.lstrip().startswith("["):
        try:
            return normalize_rows(json.loads(text), str(path))
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{path}: not valid JSON: {exc}") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{path} line {number}: not valid JSON: {exc.msg}") from exc
    return normalize_rows(rows, str(path))


def encode(rows: list[GoldenRow]) -> bytes:
    """Canonical JSONL: the same rows always make the same blob."""
    lines = (json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")) for row in rows)
    return ("\n".join(lines) + "\n").encode()


def golden_set(rows: list[GoldenRow], source: str, max_tokens: int | None) -> tuple[GoldenSet, bytes]:
    """The manifest's record of the rows and the blob that holds them."""
    if max_tokens is not None and not 1 <= max_tokens <= MAX_GOLDEN_TOKENS:
        raise ValidationError(f"golden max_tokens must be 1-{MAX_GOLDEN_TOKENS}, not {max_tokens}")
    data = encode(rows)
    if len(data) > MAX_GOLDEN_BYTES:
        raise ValidationError(f"{source}: {len(data):,} bytes of golden prompts, more than {MAX_GOLDEN_BYTES:,}")
    record = GoldenSet(
        sha256=hashlib.sha256(data).hexdigest(),
        rows=len(rows),
        references=sum(row["reference"] is not None for row in rows),
        source=source,
        max_tokens=max_tokens,
    )
    return record, data


def store_blob(store: ObjectStore, record: GoldenSet, data: bytes) -> None:
    """Write the blob, or touch it when stored already (a young blob survives a concurrent gc: see blobs.py)."""
    key = blob_key(record.sha256)
    if not store.put_bytes(key, data, if_absent=True) and not store.touch(key):
        store.put_bytes(key, data, if_absent=True)


def load_rows(store: ObjectStore, record: GoldenSet, ref: str) -> list[GoldenRow]:
    """The rows a manifest's golden set names, checked against its sha256."""
    data = store.get_bytes(blob_key(record.sha256))
    if data is None:
        raise NotFoundError(f"{ref}'s golden prompts (blob {record.sha256[:12]}) are missing from the registry")
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise ValidationError(f"{ref}'s golden prompts are corrupted (sha256 differs from the manifest's)")
    return [json.loads(line) for line in data.decode().splitlines() if line]
