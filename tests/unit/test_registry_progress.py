"""Base hashing reports its progress: every byte the fingerprint (and a copy) hashes, for the CLI's bar."""

from __future__ import annotations

import shutil
from pathlib import Path

from adapters_registry.fingerprint import WEIGHT_SUFFIXES
from adapters_registry.registry import open_registry


def test_base_add_reports_the_bytes_it_hashes(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = sum(p.stat().st_size for p in model.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    everything = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    seen: list[int] = []
    open_registry(tmp_path / "reg").add_base(model, "tiny", progress=seen.append)
    assert sum(seen) == weights and weights > 0
    seen.clear()
    open_registry(tmp_path / "reg2").add_base(model, "tiny", copy=True, progress=seen.append)
    assert sum(seen) == weights + everything  # fingerprinted, then every file hashed again as it is copied
