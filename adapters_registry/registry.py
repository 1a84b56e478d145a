"""The registry: immutable adapter versions bound to registered base models, on any `ObjectStore`.

The keys it writes are drawn in layout.py. A push uploads blobs first and creates the version record last, so a
push killed half-way leaves unreferenced blobs and no visible version; two concurrent pushes race on the create-only
record and the loser takes the next number. `gc` deletes unreferenced blobs once they are old enough; a push touches
the blobs it finds already stored so that they count as young (see gc.py).

Writes check first that the store can be written (`ObjectStore.check_writable`), so a read-only registry refuses a
push, promote or remove with one line before anything is hashed or written. Names are unique regardless of case (on a
case-insensitive disk `UPPER` and `upper` would share a folder). A version that a later `rollback` of some alias
would reach is removed only with `force`. `resolve` keeps its last answer for each reference: when the store is
unreachable it answers from there for up to `stale_resolve_s` (a gateway keeps serving the adapters it knows through
a registry outage) and retries the store at most every `retry_unreachable_s` meanwhile.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError as PydanticValidationError

from adapters_registry.aliases import rollback_chain, rollback_target
from adapters_registry.cache import BlobCache
from adapters_registry.errors import ConflictError, IntegrityError, NotFoundError, StorageError, ValidationError
from adapters_registry.layout import (
    ADAPTERS,
    BASES,
    alias_key,
    alias_name,
    aliases_prefix,
    base_key,
    base_name,
    blob_key,
    cached_base_dir,
    cached_version_dir,
    digest_dir,
    digest_entry,
    digest_fanout,
    head_key,
    version_key,
    version_number,
    versioned_name,
    versions_prefix,
)
from adapters_registry.manifest import (
    AdapterManifest,
    AliasMove,
    AliasRecord,
    BaseManifest,
    Tombstone,
    files_digest,
    utc_now,
)
from adapters_registry.naming import Ref, check_alias, check_name, parse_ref
from adapters_registry.store import ObjectStore, Progress, sha256_file

log = logging.getLogger(__name__)

DEFAULT_LOCATION = "~/.loragate/registry"
MAX_CAS_ATTEMPTS = 50
STALE_RESOLVE_S = 300.0  # how long a last-known resolution stands in for an unreachable store (README: Readiness)
RETRY_UNREACHABLE_S = 5.0  # while the store is unreachable, a known reference retries it at most this often
RESOLVED_ENTRIES = 4096  # last-known resolutions kept (least recently used dropped first)

# Called once after every write attempt with {"action", "target", "result": "ok"|"error", "who", "error", "details"}.
AuditHook = Callable[[dict[str, Any]], None]
# The points a push passes, in order; `push(on_stage=...)` is told each one (tests stop or kill a push there).
PushStage = Literal["hashed", "blobs-written", "version-written"]
OnStage = Callable[[PushStage], None]


def _no_stage_hook(stage: PushStage) -> None:
    pass


def _snapshot(folder: Path, names: list[str]) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, inode) per file: any write or replacement changes it."""
    stats = {n: (folder / n).stat() for n in names}
    return {n: (st.st_size, st.st_mtime_ns, st.st_ino) for n, st in stats.items()}


def _who(who: str | None) -> str:
    if who:
        return who
    try:
        return os.environ.get("LORAGATE_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


class Registry:
    def __init__(
        self,
        store: ObjectStore,
        cache_dir: Path,
        audit: AuditHook | None = None,
        *,
        stale_resolve_s: float = STALE_RESOLVE_S,
        retry_unreachable_s: float = RETRY_UNREACHABLE_S,
    ) -> None:
        self.store = store
        self.cache = BlobCache(store, cache_dir)
        self.audit = audit
        self.stale_resolve_s = stale_resolve_s
        self.retry_unreachable_s = retry_unreachable_s
        self._resolved: OrderedDict[str, tuple[float, AdapterManifest]] = OrderedDict()
        self._resolved_lock = threading.RLock()
        self._unreachable_at: float | None = None  # monotonic time of the last failed store read during resolve
        self._retrying = False  # one caller is trying the store again while others get last-known answers
        self._stale_answers = 0

    def check_location(self) -> None:
        """Raise NotFoundError when nothing is stored at the location (a mistyped path or prefix)."""
        if self.store.probe():
            return
        if self.location.startswith("s3://"):
            why = "nothing is stored under that prefix"
        else:
            why = "the directory does not exist"
        raise NotFoundError(
            f"no registry at {self.location}: {why} (check --registry or $LORAGATE_REGISTRY; "
            "`loragate registry base add` creates a registry)"
        )

    # ---- writes, each reported to the audit hook ------------------------------------------------------------------
    @contextmanager
    def audited(self, action: str, target: str, who: str | None, **details: Any) -> Iterator[dict[str, Any]]:
        """Report one write attempt to `self.audit` (success or failure); a failing hook never breaks the write.
        Every write goes through it once, `gc` (gc.py) included."""
        record: dict[str, Any] = {
            "action": f"registry.{action}",
            "target": target,
            "result": "ok",
            "who": who,
            "error": None,
            "details": details,
        }
        try:
            self.store.check_writable()  # a read-only registry: one line, before anything is read, hashed or written
            yield record
        except Exception as exc:
            record.update(result="error", error=(str(exc).splitlines() or [type(exc).__name__])[0])
            self._report(record)
            raise
        self._report(record)

    def _report(self, record: dict[str, Any]) -> None:
        if self.audit is None:
            return
        try:
            self.audit(record)
        except Exception:  # the audit sink must not decide whether a registry write happens
            log.warning("audit hook failed for %s %s", record["action"], record["target"], exc_info=True)

    def add_base(
        self,
        model_dir: Path,
        name: str,
        *,
        copy: bool = False,
        merged_from: dict[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> BaseManifest:
        """Register `model_dir` as base `name`; `progress` is told the bytes hashed as it goes (weights are hashed
        for the fingerprint, and again when copied)."""
        with self.audited("add_base", name, None, path=str(model_dir), copy=copy) as record:
            base = self._add_base(model_dir, name, copy=copy, merged_from=merged_from, progress=progress)
            record["details"]["fingerprint"] = base.fingerprint
            return base

    def push(
        self,
        adapter_dir: Path,
        name: str,
        base: str,
        *,
        contract: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        source: str | None = None,
        description: str | None = None,
        labels: dict[str, str] | None = None,
        check_effect: bool = False,
        allow_base_mismatch: bool = False,
        on_stage: OnStage = _no_stage_hook,
    ) -> AdapterManifest:
        """Store `adapter_dir` as the next version of `name`, bound to the registered base `base`.

        Refused (ValidationError) when the adapter's own config says it was trained on another base, unless
        `allow_base_mismatch`, which the manifest then records as `base_mismatch` (see provenance.py). `on_stage`
        is called as the push passes each `PushStage`.
        """
        with self.audited("push", name, None, base=base, path=str(adapter_dir)) as record:
            manifest = self._push(
                adapter_dir,
                name,
                base,
                contract=contract,
                training=training,
                source=source,
                description=description,
                labels=labels,
                check_effect=check_effect,
                allow_base_mismatch=allow_base_mismatch,
                on_stage=on_stage,
            )
            record["target"] = manifest.ref
            record["details"].update(version=manifest.version, digest=manifest.digest, serving=manifest.serving)
            return manifest

    def promote(self, ref: str, alias: str, who: str | None = None) -> AdapterManifest:
        with self.audited("promote", f"{ref} -> :{alias}", who, alias=alias) as record:
            manifest = self._promote(ref, alias, who)
            record["target"] = f"{manifest.name}:{alias}"
            record["details"]["version"] = manifest.version
            return manifest

    def rollback(self, name: str, alias: str, who: str | None = None) -> AdapterManifest:
        with self.audited("rollback", f"{name}:{alias}", who, alias=alias) as record:
            manifest = self._rollback(name, alias, who)
            record["details"]["version"] = manifest.version
            return manifest

    def remove(self, ref: str, who: str | None = None, *, force: bool = False) -> AdapterManifest:
        """Tombstone a version. Refused while an alias points at it, and (unless `force`) while a later rollback
        of an alias would reach it (`rollbacks_reaching` says which)."""
        with self.audited("remove", ref, who, force=force) as record:
            manifest = self._remove(ref, force=force)
            record["target"] = manifest.ref
            return manifest

    @property
    def location(self) -> str:
        return self.store.location

    # ---- records -------------------------------------------------------------------------------------------------
    def _load_json(self, key: str) -> dict[str, Any] | None:
        data = self.store.get_bytes(key)
        if data is None:
            return None
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{self.location}/{key}: corrupted record ({exc})") from exc
        if not isinstance(obj, dict):
            raise IntegrityError(f"{self.location}/{key}: corrupted record (not an object)")
        return obj

    def _record(self, name: str, version: int) -> AdapterManifest | Tombstone | None:
        data = self.store.get_bytes(version_key(name, version))
        if data is None:
            return None
        try:
            return AdapterManifest.model_validate_json(data)
        except PydanticValidationError as exc:
            try:
                return Tombstone.model_validate_json(data)
            except PydanticValidationError:
                raise IntegrityError(f"{name}@{version}: unreadable manifest ({exc.error_count()} errors)") from exc

    def _version_numbers(self, name: str) -> list[int]:
        return sorted(version_number(name, k) for k in self.store.list_keys(versions_prefix(name)))

    def _head_hint(self, name: str) -> int:
        """A lower bound of the newest version number; an unreadable hint only costs probes, never correctness."""
        try:
            obj = self._load_json(head_key(name))
            return max(0, int(obj.get("version", 0))) if obj else 0
        except (IntegrityError, TypeError, ValueError):
            log.warning("%s: ignoring an unreadable head hint", name)
            return 0

    def _newest_number(self, name: str) -> int:
        """The highest allocated version number (live or removed); 0 when the name has none."""
        n = self._head_hint(name)
        while self.store.exists(version_key(name, n + 1)):
            n += 1
        while n > 0 and not self.store.exists(version_key(name, n)):  # only if the hint ran ahead of a lost record
            n -= 1
        return n

    # ---- bases ---------------------------------------------------------------------------------------------------
    def _add_base(
        self,
        model_dir: Path,
        name: str,
        *,
        copy: bool = False,
        merged_from: dict[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> BaseManifest:
        from adapters_registry.fingerprint import describe_base, module_shapes

        check_name(name, "base name")
        if self.store.list_keys(versions_prefix(name)):
            raise ValidationError(f"base name {name!r} is already an adapter name; pick another")
        if not self.store.exists(base_key(name)):
            self._check_case(name, "base name")
        if not model_dir.is_dir():
            raise ValidationError("not a directory", path=str(model_dir))
        facts = describe_base(model_dir, progress=progress)
        linear, embedding = module_shapes(model_dir)
        files: dict[str, str] | None = None
        if copy:
            files = {}
            for path in sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
                files[path.name] = sha256_file(path, progress)
            self._refresh_blobs(files, model_dir, self._upload_blobs(files, model_dir))
        manifest = BaseManifest(
            name=name,
            fingerprint=facts.fingerprint,
            architecture=facts.architecture,
            model_type=facts.model_type,
            hidden_size=facts.hidden_size,
            intermediate_size=facts.intermediate_size,
            num_hidden_layers=facts.num_hidden_layers,
            vocab_size=facts.vocab_size,
            config_hash=facts.config_hash,
            tokenizer_hash=facts.tokenizer_hash,
            chat_template_hash=facts.chat_template_hash,
            weights_hash=facts.weights_hash,
            path=None if copy else str(model_dir.resolve()),
            files=files,
            linear_shapes=linear,
            embedding_shapes=embedding,
            merged_from=merged_from,
        )
        if self.store.put_bytes(base_key(name), manifest.to_json(), if_absent=True):
            self._restore_blobs(files or {}, model_dir)
            log.info("registered base %s (%s)", name, facts.fingerprint)
            return manifest
        existing = self.get_base(name)
        if existing.fingerprint != manifest.fingerprint:
            raise ConflictError(
                f"base {name!r} is already registered with another fingerprint ({existing.fingerprint[:19]}...)"
            )
        return existing

    def get_base(self, name: str) -> BaseManifest:
        obj = self._load_json(base_key(check_name(name, "base name")))
        if obj is None:
            raise NotFoundError(f"base model {name!r} is not registered (loragate registry base add DIR --name {name})")
        return BaseManifest.model_validate(obj)

    def list_bases(self) -> list[BaseManifest]:
        names = [base_name(k) for k in self.store.list_keys(BASES)]
        return [self.get_base(n) for n in sorted(names)]

    def base_dir(self, name: str) -> Path:
        base = self.get_base(name)
        if base.files:
            return self.cache.assemble(base.files, cached_base_dir(base.fingerprint))
        if base.path and (Path(base.path) / "config.json").is_file():
            return Path(base.path)
        raise NotFoundError(f"base {name!r}: weights are not available here (registered from {base.path})")

    # ---- push ----------------------------------------------------------------------------------------------------
    def _push(
        self,
        adapter_dir: Path,
        name: str,
        base: str,
        *,
        contract: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        source: str | None = None,
        description: str | None = None,
        labels: dict[str, str] | None = None,
        check_effect: bool = False,
        allow_base_mismatch: bool = False,
        on_stage: OnStage = _no_stage_hook,
    ) -> AdapterManifest:
        from adapters_registry.provenance import declared_base_mismatch, describe_mismatch
        from adapters_registry.validate import CONFIG_FILE, classify_files, inspect_adapter

        check_name(name)
        base_manifest = self.get_base(base)
        if self.store.exists(base_key(name)):
            raise ValidationError(f"adapter name {name!r} is the name of a registered base model; pick another")
        if self._newest_number(name) == 0:  # a new name: unique regardless of case
            self._check_case(name, "adapter name")
        for key, value in (labels or {}).items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise ValidationError(f"label {key!r}={value!r}: labels are non-empty string keys to string values")
        normalized = self._normalize_contract(contract)
        try:
            json.dumps(training, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"training metadata must be plain JSON: {exc}") from exc
        names = classify_files(adapter_dir)
        before = _snapshot(adapter_dir, names)
        files = {f: sha256_file(adapter_dir / f) for f in names}
        on_stage("hashed")
        digest = files_digest(files)
        # identical content on the same base passed the same checks when it was pushed
        if same := self._same_content(name, digest, base_manifest.fingerprint, normalized):
            log.info("%s: identical content already registered as %s", adapter_dir, same.ref)
            return same
        facts = inspect_adapter(adapter_dir, base_manifest)
        if facts.files != names:
            raise ConflictError(f"{adapter_dir}: files changed during the push; nothing was registered, try again")
        sizes = {f: before[f][0] for f in names}
        mismatch = declared_base_mismatch(facts.config, base_manifest, self.list_bases())
        if mismatch is not None and not allow_base_mismatch:
            raise ValidationError(describe_mismatch(mismatch, base), path=str(adapter_dir / CONFIG_FILE))
        if mismatch is not None:
            log.warning("%s: %s; accepted (allow_base_mismatch)", adapter_dir, describe_mismatch(mismatch, base))
        if check_effect:
            from adapters_registry.effect import check_effect as run_effect_check

            run_effect_check(self.base_dir(base), adapter_dir)

        stored = self._upload_blobs(files, adapter_dir)
        if (
            _snapshot(adapter_dir, names) != before
        ):  # e.g. a trainer still writing: what we hashed is not what we stored
            raise ConflictError(f"{adapter_dir}: files changed during the push; nothing was registered, try again")
        self.cache.trust(files.values())  # hashed just now: the first materialize here need not hash them again
        # after the snapshot: a folder materialized from a local store shares its files' inodes (and mtimes) with them
        self._refresh_blobs(files, adapter_dir, stored)
        on_stage("blobs-written")
        fields: dict[str, Any] = dict(
            name=name,
            digest=digest,
            files=files,
            file_sizes=sizes,
            base=base,
            base_fingerprint=base_manifest.fingerprint,
            peft_type=facts.peft_type,
            r=facts.r,
            lora_alpha=facts.lora_alpha,
            use_rslora=facts.use_rslora,
            target_modules=facts.target_modules,
            dtype=facts.dtype,
            size_bytes=sum(sizes.values()),
            source=source or str(adapter_dir.resolve()),
            training=training,
            description=description,
            labels=labels or {},
            contract=normalized,
            serving=facts.serving,
            serving_reason=facts.serving_reason,
            base_mismatch=mismatch,
        )
        version = self._newest_number(name) + 1
        while True:
            manifest = AdapterManifest(version=version, created_at=utc_now(), **fields)
            if self.store.put_bytes(version_key(name, version), manifest.to_json(), if_absent=True):
                break
            version += 1  # a concurrent push took this number
        on_stage("version-written")
        self._restore_blobs(files, adapter_dir)
        self.store.put_bytes(digest_entry(name, manifest.digest_hex, version), b"", if_absent=True)
        if self._head_hint(name) < version:
            self.store.put_bytes(head_key(name), json.dumps({"version": version}).encode())
        log.info("pushed %s (%s, serving=%s)", manifest.ref, digest, manifest.serving)
        return manifest

    def _check_case(self, name: str, what: str) -> None:
        """Refuse `name` when an adapter or base already has the same name in another case."""
        folded = name.casefold()
        bases = [base_name(k) for k in self.store.list_keys(BASES)]
        for kind, existing in [("adapter", n) for n in self.store.list_children(ADAPTERS)] + [
            ("base", n) for n in bases
        ]:
            if existing != name and existing.casefold() == folded:
                raise ValidationError(
                    f"{what} {name!r} differs only in case from the existing {kind} {existing!r}: names are unique "
                    "regardless of case (on a case-insensitive disk they would share one folder); "
                    f"use {existing!r} or another name"
                )

    # ---- blobs: written before the record that references them, refreshed so that gc sees them young ----------------
    def _upload_blobs(self, files: dict[str, str], folder: Path) -> list[str]:
        """Upload the files whose blob is absent; the relpaths of those already stored."""
        return [rel for rel, h in files.items() if not self.store.put_file(blob_key(h), folder / rel, if_absent=True)]

    def _reupload(self, rel: str, hex_digest: str, folder: Path) -> None:
        if sha256_file(folder / rel) != hex_digest:
            raise ConflictError(f"{folder}: {rel} changed during the push; try again")
        self.store.put_file(blob_key(hex_digest), folder / rel, if_absent=True)

    def _refresh_blobs(self, files: dict[str, str], folder: Path, rels: list[str]) -> None:
        """Touch blobs that were already stored (perhaps old orphans a gc is about to delete)."""
        for rel in rels:
            if not self.store.touch(blob_key(files[rel])):
                log.info("%s: blob of %s vanished (gc); uploading it again", folder, rel)
                self._reupload(rel, files[rel], folder)

    def _restore_blobs(self, files: dict[str, str], folder: Path) -> None:
        """After the commit: re-upload any blob a concurrent gc deleted before it could see the new record."""
        for rel, hex_digest in files.items():
            if not self.store.exists(blob_key(hex_digest)):
                log.warning("%s: blob of %s vanished after the commit (gc); uploading it again", folder, rel)
                self._reupload(rel, hex_digest, folder)

    @staticmethod
    def _normalize_contract(contract: dict[str, Any] | None) -> dict[str, Any] | None:
        if contract is None:
            return None
        from adapters_registry.contract import normalize_contract

        try:
            return normalize_contract(contract)
        except ValueError as exc:
            raise ValidationError(f"output contract refused: {exc}") from exc

    def _same_content(
        self, name: str, digest: str, fingerprint: str, contract: dict[str, Any] | None
    ) -> AdapterManifest | None:
        prefix = digest_dir(name, digest.removeprefix("sha256:")) + "/"
        indexed = [int(key[len(prefix) :]) for key in self.store.list_keys(prefix)]
        # versions above the head hint may lack their index entry (a push killed just after its record)
        unindexed = range(self._head_hint(name) + 1, self._newest_number(name) + 1)
        for version in sorted({*indexed, *unindexed}, reverse=True):
            record = self._record(name, version)
            if (
                isinstance(record, AdapterManifest)
                and record.digest == digest
                and record.base_fingerprint == fingerprint
                and record.contract == contract
            ):
                return record
        return None

    # ---- read ----------------------------------------------------------------------------------------------------
    def resolve(self, ref: str) -> AdapterManifest:
        """The live version `ref` names. While the store is unreachable (StorageError), the last answer for `ref`
        from the past `stale_resolve_s` seconds stands in, with one warning per outage; meanwhile a single caller
        retries the store at most every `retry_unreachable_s`, the others get the last answer without waiting."""
        retrying = False
        with self._resolved_lock:
            now = time.monotonic()
            known = self._resolved.get(ref)
            if known is not None and now - known[0] > self.stale_resolve_s:
                known = None  # too old to stand in
            if known is not None and self._unreachable_at is not None:
                if self._retrying or now - self._unreachable_at < self.retry_unreachable_s:
                    return self._stale(ref, known, None)
                self._retrying = retrying = True
        try:
            manifest = self._resolve(ref)
        except StorageError as exc:
            with self._resolved_lock:
                self._unreachable_at = time.monotonic()
                if known is None:
                    raise
                return self._stale(ref, known, exc)
        except NotFoundError:
            with self._resolved_lock:
                self._resolved.pop(ref, None)
            raise
        finally:
            if retrying:
                with self._resolved_lock:
                    self._retrying = False
        with self._resolved_lock:
            if self._unreachable_at is not None:
                log.warning(
                    "registry %s reachable again (%d answers were last-known)", self.location, self._stale_answers
                )
                self._unreachable_at, self._stale_answers = None, 0
            self._resolved[ref] = (time.monotonic(), manifest)
            self._resolved.move_to_end(ref)
            while len(self._resolved) > RESOLVED_ENTRIES:
                self._resolved.popitem(last=False)
        return manifest

    def _stale(self, ref: str, known: tuple[float, AdapterManifest], exc: StorageError | None) -> AdapterManifest:
        """Count and (once per outage) log a last-known answer; the caller may hold `_resolved_lock`."""
        self._stale_answers += 1
        if self._stale_answers == 1:
            log.warning(
                "registry %s unreachable (%s); answering %s with %s as resolved %.0f s ago, for up to %.0f s",
                self.location,
                exc or "failed just now",
                ref,
                known[1].ref,
                time.monotonic() - known[0],
                self.stale_resolve_s,
            )
        return known[1]

    def _resolve(self, ref: str) -> AdapterManifest:
        parsed = parse_ref(ref)
        version = self._resolve_number(parsed, ref)
        record = self._record(parsed.name, version)
        if record is None:
            raise NotFoundError(f"{parsed.name}@{version} does not exist")
        if isinstance(record, Tombstone):
            raise NotFoundError(f"{parsed.name}@{version} was removed at {record.removed_at}")
        return record

    def _resolve_number(self, parsed: Ref, ref: str) -> int:
        name = parsed.name
        if parsed.kind == "version":
            assert parsed.version is not None
            return parsed.version
        if parsed.kind == "alias":
            record = self._alias(name, str(parsed.alias))
            if record is None:
                raise NotFoundError(f"{ref}: {name!r} has no alias {parsed.alias!r}")
            return record[0].version
        if parsed.kind == "digest":
            return self._by_digest(name, str(parsed.digest_prefix), ref)
        n = self._newest_number(name)
        while n > 0 and not isinstance(self._record(name, n), AdapterManifest):
            n -= 1
        if n == 0:
            raise NotFoundError(f"adapter {name!r} not found in {self.location}")
        return n

    def _by_digest(self, name: str, hex_prefix: str, ref: str) -> int:
        base = digest_fanout(name, hex_prefix)
        hits: dict[str, list[int]] = {}
        for key in self.store.list_keys(base + hex_prefix):
            hex_digest, _, number = key[len(base) :].partition("/")
            hits.setdefault(hex_digest, []).append(int(number))
        if not hits:  # the index entry is written just after the record: fall back to a scan
            for m in self.list_adapters(name):
                if m.digest_hex.startswith(hex_prefix):
                    hits.setdefault(m.digest_hex, []).append(m.version)
        if len(hits) > 1:
            raise ConflictError(f"{ref}: ambiguous, {len(hits)} digests start with {hex_prefix}; give more characters")
        for candidate in sorted(next(iter(hits.values()), []), reverse=True):
            if isinstance(self._record(name, candidate), AdapterManifest):
                return candidate
        raise NotFoundError(f"{ref}: no version of {name!r} has that digest")

    def adapter_names(self) -> list[str]:
        return sorted({n for k in self.store.list_keys(ADAPTERS) if (n := versioned_name(k)) is not None})

    def list_adapters(self, name: str | None = None) -> list[AdapterManifest]:
        out: list[AdapterManifest] = []
        for n in [check_name(name)] if name else self.adapter_names():
            for v in self._version_numbers(n):
                record = self._record(n, v)
                if isinstance(record, AdapterManifest):
                    out.append(record)
        return out

    def materialize(self, manifest: AdapterManifest) -> Path:
        """A local folder holding the version's files, each checked against its sha256."""
        return self.cache.assemble(manifest.files, cached_version_dir(manifest.digest_hex))

    def materialized_path(self, manifest: AdapterManifest) -> Path:
        """Where `materialize` puts the version, without touching the store or the disk."""
        return self.cache.root / cached_version_dir(manifest.digest_hex)

    # ---- aliases -------------------------------------------------------------------------------------------------
    def _alias(self, name: str, alias: str) -> tuple[AliasRecord, str] | None:
        got = self.store.get_with_token(alias_key(name, alias))
        if got is None:
            return None
        return AliasRecord.model_validate_json(got[0]), got[1]

    def aliases(self, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in self.store.list_keys(aliases_prefix(check_name(name))):
            alias = alias_name(name, key)
            if (record := self._alias(name, alias)) is not None:
                out[alias] = record[0].version
        return out

    def alias_history(self, name: str, alias: str) -> list[AliasMove]:
        record = self._alias(check_name(name), check_alias(alias))
        return list(record[0].history) if record else []

    def _move_alias(self, name: str, alias: str, who: str | None, pick: Any) -> AdapterManifest:
        """Compare-and-swap loop; `pick(record|None) -> (action, target manifest)`."""
        key = alias_key(name, alias)
        for _ in range(MAX_CAS_ATTEMPTS):
            current = self._alias(name, alias)
            record, token = current if current else (None, None)
            action, target = pick(record)
            move = AliasMove(
                action=action,
                who=_who(who),
                when=utc_now(),
                from_version=record.version if record else None,
                to_version=target.version,
            )
            history = [*(record.history if record else []), move]
            new = AliasRecord(name=name, alias=alias, version=target.version, history=history)
            if self.store.put_if_match(key, new.to_json(), token):
                log.info("%s:%s %s -> %s by %s", name, alias, move.from_version, target.version, move.who)
                return target  # type: ignore[no-any-return]
        raise ConflictError(f"{name}:{alias} is being moved by others; try again")

    def _promote(self, ref: str, alias: str, who: str | None = None) -> AdapterManifest:
        check_alias(alias)
        target = self.resolve(ref)
        return self._move_alias(target.name, alias, who, lambda _record: ("promote", target))

    def _rollback(self, name: str, alias: str, who: str | None = None) -> AdapterManifest:
        check_name(name)
        check_alias(alias)

        def pick(record: AliasRecord | None) -> tuple[str, AdapterManifest]:
            if record is None:
                raise NotFoundError(f"{name!r} has no alias {alias!r}")
            previous = rollback_target(record.history)
            if previous is None:
                raise ConflictError(f"{name}:{alias} has no earlier version to roll back to")
            gone = self._record(name, previous)
            if isinstance(gone, Tombstone):
                raise ConflictError(
                    f"{name}:{alias} would roll back to {name}@{previous}, which was removed at {gone.removed_at}; "
                    f"promote a version instead"
                )
            return "rollback", self.resolve(f"{name}@{previous}")

        return self._move_alias(name, alias, who, pick)

    # ---- remove / verify -----------------------------------------------------------------------------------------
    def rollbacks_reaching(self, manifest: AdapterManifest) -> dict[str, int]:
        """alias -> how many successive `rollback`s of it would reach `manifest` (aliases that never would: absent)."""
        out: dict[str, int] = {}
        for alias in self.aliases(manifest.name):
            chain = rollback_chain(self.alias_history(manifest.name, alias))
            if manifest.version in chain:
                out[alias] = chain.index(manifest.version) + 1
        return out

    @staticmethod
    def describe_rollbacks(name: str, reaching: dict[str, int]) -> str:
        """`{"prod": 1, "canary": 2}` -> "the next `loragate registry rollback NAME --alias prod` and the 2nd ..." """
        return " and ".join(
            f"{'the next' if n == 1 else f'the {_ordinal(n)}'} `loragate registry rollback {name} --alias {alias}`"
            for alias, n in sorted(reaching.items())
        )

    def _remove(self, ref: str, *, force: bool = False) -> AdapterManifest:
        manifest = self.resolve(ref)
        pinned = sorted(a for a, v in self.aliases(manifest.name).items() if v == manifest.version)
        if pinned:
            raise ConflictError(
                f"{manifest.ref} is the target of alias {', '.join(pinned)}; promote another version there first"
            )
        if reaching := self.rollbacks_reaching(manifest):
            rollbacks = self.describe_rollbacks(manifest.name, reaching)
            if not force:
                raise ConflictError(
                    f"{manifest.ref} is in the history of alias {', '.join(sorted(reaching))}: {rollbacks} would go "
                    "back to it; removing it would break that rollback (--force removes it anyway)"
                )
        else:
            rollbacks = ""
        tomb = Tombstone(name=manifest.name, version=manifest.version, digest=manifest.digest)
        self.store.put_bytes(version_key(manifest.name, manifest.version), tomb.to_json())
        with self._resolved_lock:  # a removed version must not stand in for its references
            for key in [k for k, (_, m) in self._resolved.items() if m.ref == manifest.ref]:
                del self._resolved[key]
        if rollbacks:
            log.warning("removed %s (--force): %s would go back to it and will now fail", manifest.ref, rollbacks)
        else:
            log.info("removed %s", manifest.ref)
        return manifest


def default_cache_dir(location: str) -> Path:
    root = os.environ.get("LORAGATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loragate")
    return Path(root) / "registry" / hashlib.sha256(location.encode()).hexdigest()[:16]


def open_registry(
    location: str | os.PathLike[str] | None = None,
    *,
    cache_dir: Path | None = None,
    audit: AuditHook | None = None,
    must_exist: bool = False,
) -> Registry:
    """Open a registry: a directory or `s3://bucket/prefix`; None means $LORAGATE_REGISTRY or ~/.loragate/registry.

    Opening writes nothing (a local directory is created by its first write). With `must_exist`, a location that
    holds nothing raises NotFoundError (what every CLI command but `base add` asks for, so a mistyped path is an
    error rather than an empty registry). The local cache of verified files is `cache_dir`, else
    $LORAGATE_REGISTRY_CACHE, else (S3) a folder per location under $LORAGATE_CACHE or ~/.cache/loragate, (local)
    `<registry>/.cache`.
    """
    where = str(location) if location is not None else os.environ.get("LORAGATE_REGISTRY") or DEFAULT_LOCATION
    env_cache = os.environ.get("LORAGATE_REGISTRY_CACHE")
    cache = cache_dir or (Path(env_cache) if env_cache else None)
    if where.startswith("s3://"):
        from adapters_registry.s3 import S3Store

        s3 = S3Store.from_url(where)
        reg = Registry(s3, cache or default_cache_dir(s3.location), audit)
    else:
        from adapters_registry.local import LocalStore

        local = LocalStore(Path(where))
        reg = Registry(local, cache or local.root / ".cache", audit)
    if must_exist:
        reg.check_location()
    return reg
