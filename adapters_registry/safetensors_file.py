"""A strict reader for the safetensors format: header parsing and a finiteness check without torch.

The format is an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`, then the
raw tensor bytes. Reading it here (rather than through `safetensors`) lets every malformation become a one-line
reason and keeps `push` free of a torch import.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAX_HEADER = 100 * 1024 * 1024
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# dtype -> (unsigned view, exponent mask): a float is NaN/inf exactly when all its exponent bits are set.
_EXPONENT: dict[str, tuple[np.dtype[Any], int]] = {
    "F32": (np.dtype("<u4"), 0x7F800000),
    "F16": (np.dtype("<u2"), 0x7C00),
    "BF16": (np.dtype("<u2"), 0x7F80),
}
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> list[TensorInfo]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            raise SafetensorsError("not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError("not a safetensors file (header length out of range)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsError("not a safetensors file (header is not a JSON object)")
    data_start = 8 + n
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise SafetensorsError(f"tensor {name}: malformed header entry") from exc
        if dtype not in ITEM_SIZE:
            raise SafetensorsError(f"tensor {name}: unknown dtype {dtype}")
        if not (0 <= begin <= end and data_start + end <= size):
            raise SafetensorsError(f"tensor {name}: data offsets outside the file (truncated?)")
        if (end - begin) != math.prod(shape) * ITEM_SIZE[dtype]:
            raise SafetensorsError(f"tensor {name}: {end - begin} bytes do not hold shape {list(shape)} of {dtype}")
        tensors.append(TensorInfo(name, dtype, shape, data_start + begin, data_start + end))
    return tensors


def non_finite_tensors(path: Path, tensors: list[TensorInfo]) -> list[str]:
    """Names of the float tensors holding a NaN or an infinity."""
    bad: list[str] = []
    if not tensors or path.stat().st_size == 0:
        return bad
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for t in tensors:
            if t.dtype not in _EXPONENT or t.end == t.start:
                continue
            view, mask = _EXPONENT[t.dtype]
            bits = np.frombuffer(mm, dtype=view, count=(t.end - t.start) // view.itemsize, offset=t.start)
            if bool(np.any((bits & mask) == mask)):
                bad.append(t.name)
            del bits  # release the buffer export before the mmap closes
    return bad
