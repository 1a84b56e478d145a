"""The storage interface every backend implements: a flat key -> bytes map with atomic writes.

Keys are '/'-separated relative paths (`blobs/sha256/ab/abcd...`). Writes are all-or-nothing: a reader never sees a
partial object. `put_bytes(..., if_absent=True)` is a create-only write (False when the key exists), and
`put_if_match` is a compare-and-swap on the token that `get_with_token` returned. Every object has a modification
time on the store's own clock (`stats`, `now`), which `touch` refreshes and `delete_if_older` checks; the garbage
collector relies on them (see gc.py).

Opening a store writes nothing: a local directory is created by its first write, so a read of a mistyped location
creates nothing (`probe` tells an empty or missing location from a reachable one). Every backend failure surfaces as
`StorageError` with a one-line message, never as a bare `OSError`.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters_registry.errors import StorageError

_KEY_RE = re.compile(r"[A-Za-z0-9._@:+=-]+(/[A-Za-z0-9._@:+=-]+)*")


def check_storage_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}")
    return key


Progress = Callable[[int], object]  # told the bytes hashed so far, chunk by chunk (a progress bar's `update`)


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    with path.open("rb") as fh:
        if progress is None:
            return hashlib.file_digest(fh, "sha256").hexdigest()
        digest = hashlib.sha256()
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
            progress(len(chunk))
        return digest.hexdigest()


@dataclass(frozen=True)
class ObjectStat:
    size: int
    mtime: float  # seconds since the epoch, on the store's clock


class ObjectStore(ABC):
    """Backend interface. `location` is what `open_registry` was given (a directory or an s3:// URL)."""

    location: str

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        """Write atomically; with `if_absent` only when the key does not exist. True when written."""

    @abstractmethod
    def get_with_token(self, key: str) -> tuple[bytes, str] | None:
        """The bytes and an opaque change token for `put_if_match`, or None when absent."""

    @abstractmethod
    def put_if_match(self, key: str, data: bytes, token: str | None) -> bool:
        """Replace the object only if it still has `token` (None: only if absent). True when written."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key starting with `prefix`, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the key; no error when it is already gone."""

    @abstractmethod
    def stats(self, prefix: str) -> dict[str, ObjectStat]:
        """Size and modification time of every key starting with `prefix`, in one listing (not one request per key)."""

    @abstractmethod
    def now(self) -> float:
        """The store's clock, comparable with `ObjectStat.mtime`."""

    @abstractmethod
    def touch(self, key: str) -> bool:
        """Set the object's modification time to now, content unchanged. False when it does not exist."""

    @abstractmethod
    def delete_if_older(self, key: str, cutoff: float) -> bool:
        """Delete the key unless it was written or touched after `cutoff`; True when deleted.

        A `touch` that returned True before this call started makes it keep the key.
        """

    @abstractmethod
    def probe(self) -> bool:
        """True when the location holds anything, False when it is empty or missing; StorageError when unreachable.

        One cheap request (no full listing): the readiness check and the existence check of read commands use it.
        """

    def check_writable(self) -> None:  # noqa: B027 (optional: a remote store learns it from its first write)
        """Raise StorageError now if this process cannot write here (so a write fails before it starts)."""

    def list_children(self, prefix: str) -> list[str]:
        """The names one level below `prefix` (which ends with '/'), sorted: `adapters/` -> adapter names."""
        return sorted({key[len(prefix) :].split("/", 1)[0] for key in self.list_keys(prefix)})

    def exists(self, key: str) -> bool:
        return self.get_bytes(key) is not None

    def put_file(self, key: str, path: Path, if_absent: bool = False) -> bool:
        return self.put_bytes(key, path.read_bytes(), if_absent=if_absent)

    def get_file(self, key: str, dest: Path) -> bool:
        """Download the object to `dest` (overwritten). False when absent."""
        data = self.get_bytes(key)
        if data is None:
            return False
        dest.write_bytes(data)
        return True

    def local_path(self, key: str) -> Path | None:
        """A path to read the object in place, for backends on the local filesystem; None otherwise."""
        return None
