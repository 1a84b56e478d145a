"""`verify`: re-hash what the registry stores and report each problem as one line.

Checks every file of every live version against its recorded sha256 (blobs in the store, and downloaded copies in
the local cache), each version's digest against its file list, and each base: copied weights re-hashed, weights
registered by path re-fingerprinted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from adapters_registry.cache import BlobCache
from adapters_registry.errors import RegistryError
from adapters_registry.layout import blob_key, cached_version_dir
from adapters_registry.manifest import AdapterManifest, BaseManifest, files_digest
from adapters_registry.store import ObjectStore, sha256_file

if TYPE_CHECKING:
    from adapters_registry.registry import Registry


def verify_registry(reg: Registry, ref: str | None = None) -> list[str]:
    problems: list[str] = []
    for m in [reg.resolve(ref)] if ref else reg.list_adapters():
        if files_digest(m.files) != m.digest:
            problems.append(f"{m.ref}: manifest digest does not match its file list")
        for rel, hex_digest in sorted(m.files.items()):
            problems.extend(f"{m.ref}: {rel}: {p}" for p in check_blob(reg.store, hex_digest))
            problems.extend(check_cached(reg.cache, m, rel, hex_digest))
    if ref is None:
        for base in reg.list_bases():
            problems.extend(f"base {base.name}: {p}" for p in check_base(reg.store, base))
    return problems


def check_blob(store: ObjectStore, hex_digest: str) -> list[str]:
    key = blob_key(hex_digest)
    path = store.local_path(key)
    if path is not None:
        if not path.is_file():
            return [f"blob sha256:{hex_digest[:12]}... is missing"]
        actual = sha256_file(path)
    else:
        data = store.get_bytes(key)
        if data is None:
            return [f"blob sha256:{hex_digest[:12]}... is missing"]
        actual = hashlib.sha256(data).hexdigest()
    return [] if actual == hex_digest else [f"corrupted: sha256 is {actual[:12]}..., expected {hex_digest[:12]}..."]


def check_cached(cache: BlobCache, m: AdapterManifest, rel: str, hex_digest: str) -> list[str]:
    path = cache.root / cached_version_dir(m.digest_hex) / rel
    if cache.store.local_path(blob_key(hex_digest)) is not None or not path.is_file():
        return []  # local stores hard-link the blob itself, already checked
    return [] if sha256_file(path) == hex_digest else [f"{m.ref}: {rel}: corrupted in the local cache at {path}"]


def check_base(store: ObjectStore, base: BaseManifest) -> list[str]:
    from adapters_registry.fingerprint import describe_base

    if base.files:
        return [f"{rel}: {p}" for rel, h in sorted(base.files.items()) for p in check_blob(store, h)]
    if not base.path or not (Path(base.path) / "config.json").is_file():
        return []  # weights live elsewhere (another machine); nothing to check here
    try:
        facts = describe_base(Path(base.path))
    except RegistryError as exc:
        return [str(exc)]
    return [] if facts.fingerprint == base.fingerprint else [f"{base.path} no longer matches its fingerprint"]
