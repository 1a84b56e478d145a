"""Writing blobs for a push or a copied base: before the record that references them, kept young for gc.

A blob already stored is `touch`ed instead of uploaded, so that an old orphan a gc is about to delete counts as
young again; one that vanished meanwhile is uploaded again. After the record is committed, any blob a concurrent gc
deleted before it could see the record is restored (see gc.py for the whole argument).
"""

from __future__ import annotations

import logging
from pathlib import Path

from adapters_registry.errors import ConflictError
from adapters_registry.layout import blob_key
from adapters_registry.store import ObjectStore, sha256_file

log = logging.getLogger(__name__)


def upload_blobs(store: ObjectStore, files: dict[str, str], folder: Path) -> list[str]:
    """Upload the files whose blob is absent; the relpaths of those already stored."""
    return [rel for rel, h in files.items() if not store.put_file(blob_key(h), folder / rel, if_absent=True)]


def refresh_blobs(store: ObjectStore, files: dict[str, str], folder: Path, rels: list[str]) -> None:
    """Touch blobs that were already stored (perhaps old orphans a gc is about to delete)."""
    for rel in rels:
        if not store.touch(blob_key(files[rel])):
            log.info("%s: blob of %s vanished (gc); uploading it again", folder, rel)
            _reupload(store, rel, files[rel], folder)


def restore_blobs(store: ObjectStore, files: dict[str, str], folder: Path) -> None:
    """After the commit: re-upload any blob a concurrent gc deleted before it could see the new record."""
    for rel, hex_digest in files.items():
        if not store.exists(blob_key(hex_digest)):
            log.warning("%s: blob of %s vanished after the commit (gc); uploading it again", folder, rel)
            _reupload(store, rel, hex_digest, folder)


def _reupload(store: ObjectStore, rel: str, hex_digest: str, folder: Path) -> None:
    if sha256_file(folder / rel) != hex_digest:
        raise ConflictError(f"{folder}: {rel} changed during the push; try again")
    store.put_file(blob_key(hex_digest), folder / rel, if_absent=True)
