"""Local, content-addressed copies of blobs and assembled version folders, for reading without trusting the store.

`BlobCache.blob_path(hex)` returns a local file whose sha256 was checked: on a local store the blob itself, on a
remote store a download kept under `<cache>/blobs`. `assemble(files, key)` builds a folder of named files from blobs
(hard links when possible) in a temporary folder and renames it into place, so a folder that exists is complete.
Nothing is created before the first download or assembly; a cache that cannot be written (a read-only registry
holds a local registry's default cache) fails with one `StorageError` line naming it and $LORAGATE_REGISTRY_CACHE,
and leaves no partial folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

from adapters_registry.errors import IntegrityError, NotFoundError, StorageError
from adapters_registry.layout import ADAPTERS, BLOBS, blob_key, cached_blob
from adapters_registry.store import ObjectStore, sha256_file

log = logging.getLogger(__name__)


def stale_entries(root: Path, folders: Collection[str], blobs: Collection[str]) -> list[Path]:
    """A cache's version folders (`adapters/<digest>`) and downloaded blobs (`blobs/<hh>/<hex>`) outside the keep
    sets (digest hexes of the versions still needed, sha256 hexes of the files still needed)."""
    stale = [p for p in sorted(root.glob(f"{ADAPTERS}*")) if p.is_dir() and p.name not in folders]
    return stale + [p for p in sorted(root.glob(f"{BLOBS}*/*")) if p.is_file() and p.name not in blobs]


def remove_entry(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class BlobCache:
    def __init__(self, store: ObjectStore, root: Path) -> None:
        self.store = store
        self.root = root
        self._tmp = root / ".tmp"

    def _unwritable(self, exc: OSError) -> StorageError:
        return StorageError(
            f"cannot write the local cache at {self.root}: {exc.strerror or type(exc).__name__}; "
            "set LORAGATE_REGISTRY_CACHE to a writable folder"
        )

    def _staging_file(self, parent: Path) -> Path:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self._tmp)
        except OSError as exc:
            raise self._unwritable(exc) from exc
        os.close(fd)
        return Path(name)

    def blob_path(self, hex_digest: str, *, verify: bool = True) -> Path:
        key = blob_key(hex_digest)
        in_place = self.store.local_path(key)
        if in_place is not None:
            if not self.store.exists(key):
                raise NotFoundError(f"blob sha256:{hex_digest} is missing from the store")
            if not verify or self._trusted(in_place, hex_digest):
                return in_place
            try:
                actual = sha256_file(in_place)
            except OSError as exc:
                raise StorageError(f"{in_place}: {exc.strerror or type(exc).__name__}") from exc
            if actual != hex_digest:
                raise IntegrityError(f"blob sha256:{hex_digest} is corrupted in the store (content hash differs)")
            self._trust(in_place, hex_digest)
            return in_place
        cached = self.root / cached_blob(hex_digest)
        if cached.is_file():
            return cached  # verified before it was renamed into place
        tmp = self._staging_file(cached.parent)
        try:
            if not self.store.get_file(key, tmp):
                raise NotFoundError(f"blob sha256:{hex_digest} is missing from the store")
            if (actual := sha256_file(tmp)) != hex_digest:
                raise IntegrityError(f"blob sha256:{hex_digest} downloaded with sha256:{actual}: refusing it")
            try:
                tmp.chmod(0o644)
                os.replace(tmp, cached)
            except OSError as exc:
                raise self._unwritable(exc) from exc
        except OSError as exc:  # the download itself could not be written (a full disk)
            raise self._unwritable(exc) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return cached

    # A blob of a local store is hashed once: when it was pushed (`trust`), or at its first use here. Its file's
    # identity then (device, inode, size, modification time) is kept under <cache>/trusted/; while the file is the
    # same, its content is taken as checked. Any write to it changes the modification time, so a blob changed since
    # is hashed again and refused if it no longer matches. (Bit rot that leaves the metadata alone is not seen:
    # `loragate registry verify` hashes everything.)
    @staticmethod
    def _identity(path: Path) -> str:
        st = path.stat()
        return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}"

    def _trusted(self, path: Path, hex_digest: str) -> bool:
        try:
            return (self.root / "trusted" / hex_digest).read_text() == self._identity(path)
        except OSError:
            return False

    def _trust(self, path: Path, hex_digest: str) -> None:
        with contextlib.suppress(OSError):  # a read-only cache only costs a hash the next time
            marker = self.root / "trusted" / hex_digest
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(self._identity(path))

    def trust(self, hex_digests: Iterable[str]) -> None:
        """Blobs whose content the caller has just hashed (a push): their first use here needs no hash."""
        for hex_digest in hex_digests:
            in_place = self.store.local_path(blob_key(hex_digest))
            if in_place is not None and in_place.is_file():
                self._trust(in_place, hex_digest)

    def assemble(self, files: dict[str, str], folder: str) -> Path:
        """A folder `<cache>/<folder>` holding `files` (relpath -> sha256), each verified."""
        target = self.root / folder
        if target.is_dir():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self._tmp))
            staging.chmod(0o755)  # engines may run as another user (shared volume)
        except OSError as exc:
            raise self._unwritable(exc) from exc
        try:
            for rel, hex_digest in sorted(files.items()):
                src = self.blob_path(hex_digest)
                dest = staging / rel
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(src, dest)
                    except OSError:
                        shutil.copyfile(src, dest)
                except OSError as exc:
                    raise self._unwritable(exc) from exc
            try:
                staging.rename(target)
            except OSError as exc:
                if not target.is_dir():  # otherwise another process assembled the same content first
                    raise self._unwritable(exc) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(staging)
        log.debug("assembled %s", target)
        return target
