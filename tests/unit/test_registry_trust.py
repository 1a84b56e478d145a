"""A blob of a local store is hashed once (at push, or at its first use), and still refused once it changed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from adapters_registry.errors import IntegrityError
from adapters_registry.layout import blob_key
from adapters_registry.registry import Registry, open_registry


def blob_file(registry: Registry, hex_digest: str) -> Path:
    path = registry.store.local_path(blob_key(hex_digest))
    assert path is not None
    return path


def overwrite_keeping_mtime(path: Path) -> None:
    """Change the content, then put the file's times back: what only a hash can tell from the original."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_pushed_blob_is_not_hashed_again_at_first_use_but_a_changed_one_is_refused(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    manifest = registry.push(adapter_dirs[0], "trusted", "tiny")
    weights = manifest.files["adapter_model.safetensors"]
    overwrite_keeping_mtime(blob_file(registry, weights))
    folder = registry.materialize(manifest)  # trusted since the push: no hash, so the change is not seen
    assert (folder / "adapter_model.safetensors").read_bytes() == blob_file(registry, weights).read_bytes()

    shutil.rmtree(folder)
    path = blob_file(registry, weights)
    path.write_bytes(path.read_bytes())  # a real write: a new modification time
    with pytest.raises(IntegrityError, match=f"blob sha256:{weights} is corrupted in the store"):
        registry.materialize(manifest)


def test_a_blob_pushed_elsewhere_is_hashed_at_its_first_use_here_then_trusted(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    manifest = registry.push(adapter_dirs[1], "elsewhere", "tiny")
    weights = manifest.files["adapter_model.safetensors"]
    first = open_registry(registry.location, cache_dir=tmp_path / "first-cache")  # another machine's cache
    shutil.rmtree(first.materialize(manifest))  # hashed there, found right, trusted from now on
    overwrite_keeping_mtime(blob_file(registry, weights))
    assert first.materialize(manifest).is_dir()  # trusted: not hashed again
    second = open_registry(registry.location, cache_dir=tmp_path / "second-cache")
    with pytest.raises(IntegrityError):  # never hashed by this cache: hashed now, and refused
        second.materialize(manifest)
