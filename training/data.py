"""Training data: load JSONL or local `datasets` files, split by a stable hash, dedupe, normalise the format.

Order matters and is fixed: rows are split into train/eval/test by a salted SHA-256 of their prompt *before* any
processing, so a row keeps its split when the file is re-ordered, appended to or re-tokenised, and identical
prompts never straddle train and test. Duplicates are then removed within each split only. Two formats are
accepted, conversational both: `{"messages": [...]}` and `{"prompt": [...], "completion": [...]}` (plain-string
prompt/completion is wrapped into a user and an assistant message).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.errors import TrainingError
from training.recipe import DataSpec

log = logging.getLogger(__name__)

Row = dict[str, Any]
Format = Literal["messages", "prompt_completion"]
SplitName = Literal["train", "eval", "test"]
MIN_EVAL_ROWS = 200
DATASETS_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(TrainingError):
    """Unusable training data; the message names the file/row and the reason in one line."""


@dataclass
class Splits:
    train: list[Row]
    eval: list[Row]
    test: list[Row]
    format: Format
    duplicates_removed: dict[str, int] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "eval": len(self.eval), "test": len(self.test)}


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def load_rows(spec: DataSpec) -> list[Row]:
    if spec.generate is not None:
        from training.tasks import task_rows

        try:
            return task_rows(spec.generate.task, spec.generate.rows, spec.generate.seed)
        except ValueError as exc:
            raise DataError(f"data.generate: {exc}") from exc
    assert spec.path is not None
    return read_file(Path(spec.path))


def read_file(path: Path) -> list[Row]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix == ".jsonl":
        rows: list[Row] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object")
            rows.append(row)
        return rows
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict; point data.path at one split (it is re-split here)")
        return [dict(r) for r in loaded]
    builder = DATASETS_SUFFIXES.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported file type; use .jsonl, .json, .parquet, .csv or a saved dataset dir")
    return [dict(r) for r in datasets.load_dataset(builder, data_files=str(path), split="train")]


def prompt_part(row: Row) -> Any:
    """What the split hash is computed over: the input side of the row."""
    if "messages" in row and isinstance(row["messages"], list):
        return row["messages"][:-1]
    return row.get("prompt", row)


def split_of(row: Row, salt: str, eval_fraction: float, test_fraction: float) -> SplitName:
    digest = hashlib.sha256(f"{salt}\0{canonical(prompt_part(row))}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + eval_fraction:
        return "eval"
    return "train"


def dedupe(rows: list[Row]) -> tuple[list[Row], int]:
    seen: set[str] = set()
    kept: list[Row] = []
    for row in rows:
        key = canonical(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def detect_format(row: Row) -> Format:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise DataError(f"row has keys {sorted(row)}; expected `messages` or `prompt` + `completion`")


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs string `role` and `content`")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def normalise(row: Row, fmt: Format, where: str) -> Row:
    """The row as TRL expects it: `messages` (ending with the assistant) or conversational prompt/completion."""
    found = detect_format(row)
    if found != fmt:
        raise DataError(f"{where}: a {found} row in a {fmt} dataset; use one format per dataset")
    if fmt == "messages":
        messages = _check_messages(row["messages"], f"{where}.messages")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the turn to learn)")
        return {"messages": messages}
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    completion = _check_messages(completion, f"{where}.completion")
    if completion[0]["role"] != "assistant":
        raise DataError(f"{where}.completion: must be the assistant's message")
    return {"prompt": _check_messages(prompt, f"{where}.prompt"), "completion": completion}


def make_splits(rows: list[Row], spec: DataSpec) -> Splits:
    if not rows:
        raise DataError("the dataset is empty")
    buckets: dict[SplitName, list[Row]] = {"train": [], "eval": [], "test": []}
    for row in rows:
        buckets[split_of(row, spec.split_salt, spec.eval_fraction, spec.test_fraction)].append(row)
    removed: dict[str, int] = {}
    if spec.dedupe:
        for name in buckets:
            buckets[name], removed[name] = dedupe(buckets[name])
    fmt: Format = detect_format(rows[0]) if spec.format == "auto" else spec.format
    normalised = {
        name: [normalise(row, fmt, f"{name} row {i}") for i, row in enumerate(part)] for name, part in buckets.items()
    }
    splits = Splits(normalised["train"], normalised["eval"], normalised["test"], fmt, removed)
    for split_name, size in splits.sizes().items():
        if size == 0:
            raise DataError(
                f"the {split_name} split is empty ({len(rows)} rows in all); add data or change the fractions"
            )
    if len(splits.eval) < MIN_EVAL_ROWS:
        log.warning(
            "eval split has %s rows (< %s): eval loss and exact match will be noisy", len(splits.eval), MIN_EVAL_ROWS
        )
    return splits


def dataset_hash(splits: Splits) -> str:
    """Content hash of the three splits; independent of row order (the split and shuffle seeds fix the order)."""
    digest = hashlib.sha256()
    for name in ("train", "eval", "test"):
        for line in sorted(canonical(row) for row in getattr(splits, name)):
            digest.update(f"{name}\0{line}\n".encode())
    return f"sha256:{digest.hexdigest()}"
