"""The local-directory backend: one file per key under a root directory.

Every write goes to a temporary file in `<root>/.tmp` first. Plain writes then `os.replace` it; create-only writes
`os.link` it (which fails when the target exists, so two writers cannot both win); compare-and-swap writes hold an
exclusive `flock` on a per-key lock file in `<root>/.locks` while they compare and replace. `delete_if_older` first
renames the file aside (atomic), so a concurrent `touch` either lands before the age check or finds no file.

Nothing is created until the first write (which creates the root and its private folders), so reading a mistyped
path leaves no folder behind. OS errors become one-line `StorageError`s that name the registry, the cause (a
read-only mount, missing permission) and the key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from adapters_registry.errors import StorageError
from adapters_registry.store import ObjectStat, ObjectStore, check_storage_key

_PRIVATE = (".tmp", ".locks", ".cache")


class LocalStore(ObjectStore):
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        self.location = str(self.root)

    def _failed(self, exc: OSError, doing: str, key: str | None = None) -> StorageError:
        """One line: what could not be done where, why, and for which key."""
        cause = exc.strerror or type(exc).__name__
        return StorageError(f"cannot {doing} the registry at {self.root}: {cause}{f' ({key})' if key else ''}")

    def _prepare(self) -> None:
        """Create the root and its private folders (on the first write only)."""
        for sub in (".tmp", ".locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_storage_key(key)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def probe(self) -> bool:
        try:
            with os.scandir(self.root):
                return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise self._failed(exc, "read") from exc

    def check_writable(self) -> None:
        if not self.root.is_dir():
            return  # the first write creates it, and reports its own failure
        try:
            self._prepare()
            fd, name = tempfile.mkstemp(dir=self.root / ".tmp", prefix="probe-")
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise self._failed(exc, "write to") from exc

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._failed(exc, "read", key) from exc

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise self._failed(exc, "read", key) from exc

    @contextlib.contextmanager
    def _staged(self, write: object) -> Iterator[Path]:
        """A temporary file in the store (same filesystem), removed afterwards whatever happens."""
        fd, name = tempfile.mkstemp(dir=self.root / ".tmp")
        tmp = Path(name)
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide blobs from engines running as another user
            with os.fdopen(fd, "wb") as fh:
                if isinstance(write, bytes):
                    fh.write(write)
                else:
                    assert isinstance(write, Path)
                    with write.open("rb") as src:
                        shutil.copyfileobj(src, fh, 1 << 20)
                fh.flush()
                os.fsync(fh.fileno())
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def _write(self, key: str, content: bytes | Path, if_absent: bool) -> bool:
        target = self._path(key)
        try:
            if if_absent and target.exists():
                return False
            self._prepare()
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._staged(content) as tmp:
                if not if_absent:
                    os.replace(tmp, target)
                    return True
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
        except OSError as exc:
            if exc.errno == errno.EEXIST and if_absent:
                return False
            if isinstance(content, Path) and exc.filename == str(content):
                raise StorageError(f"{content}: {exc.strerror}") from exc  # the source could not be read
            raise self._failed(exc, "write to", key) from exc
        return True

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        return self._write(key, data, if_absent)

    def put_file(self, key: str, path: Path, if_absent: bool = False) -> bool:
        return self._write(key, path, if_absent)

    def get_file(self, key: str, dest: Path) -> bool:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._failed(exc, "read", key) from exc
        return True

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        lock = self.root / ".locks" / hashlib.sha256(key.encode()).hexdigest()
        try:
            self._prepare()
            fh = lock.open("a")
        except OSError as exc:
            raise self._failed(exc, "write to", key) from exc
        with fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def get_with_token(self, key: str) -> tuple[bytes, str] | None:
        data = self.get_bytes(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def put_if_match(self, key: str, data: bytes, token: str | None) -> bool:
        with self._locked(key):
            current = self.get_with_token(key)
            if (current[1] if current else None) != token:
                return False
            return self._write(key, data, if_absent=False)

    def _scan(self, directory: str, partial: str) -> list[os.DirEntry[str]]:
        base = self.root / directory if directory else self.root
        try:
            with os.scandir(base) as entries:
                return [e for e in entries if e.name.startswith(partial) and not (not directory and e.name in _PRIVATE)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self._failed(exc, "read", directory or None) from exc

    def list_keys(self, prefix: str) -> list[str]:
        directory, _, partial = prefix.rpartition("/")
        keys: list[str] = []

        def unreadable(exc: OSError) -> None:  # os.walk would skip the folder silently: a hole in the listing
            if not isinstance(exc, FileNotFoundError):
                raise self._failed(exc, "read", os.path.relpath(exc.filename or "", self.root)) from exc

        for entry in self._scan(directory, partial):
            rel = f"{directory}/{entry.name}" if directory else entry.name
            if entry.is_dir(follow_symlinks=False):
                for dirpath, _dirs, files in os.walk(entry.path, onerror=unreadable):
                    reldir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
                    keys.extend(f"{reldir}/{f}" for f in files)
            else:
                keys.append(rel)
        return sorted(keys)

    def list_children(self, prefix: str) -> list[str]:
        return sorted(e.name for e in self._scan(prefix.rstrip("/"), ""))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise self._failed(exc, "write to", key) from exc

    def stats(self, prefix: str) -> dict[str, ObjectStat]:
        out: dict[str, ObjectStat] = {}
        for key in self.list_keys(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:
                continue  # deleted since the listing
            except OSError as exc:
                raise self._failed(exc, "read", key) from exc
            out[key] = ObjectStat(st.st_size, st.st_mtime)
        return out

    def now(self) -> float:
        return time.time()

    def touch(self, key: str) -> bool:
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._failed(exc, "write to", key) from exc
        return True

    def delete_if_older(self, key: str, cutoff: float) -> bool:
        target = self._path(key)
        aside = self.root / ".tmp" / f"gc-{uuid.uuid4().hex}"
        try:
            self._prepare()
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                return False
            if aside.stat().st_mtime <= cutoff:
                aside.unlink()
                return True
            with contextlib.suppress(FileExistsError):  # touched meanwhile: put it back, unless a push re-uploaded it
                os.link(aside, target)
            aside.unlink()
        except OSError as exc:
            raise self._failed(exc, "write to", key) from exc
        return False
