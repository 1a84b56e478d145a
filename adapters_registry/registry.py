"""The registry: immutable adapter versions bound to registered base models, on any `ObjectStore`.

`Registry` is the one entry point: its writes (`add_base`, `push`, `promote`, `rollback`, `remove`) are each reported
once to the audit hook, and it reads (`resolve`, `list_adapters`, `materialize`, ...). The work is done by one module
per noun: layout.py (the keys), push.py, bases.py, aliases.py, versions.py (records) and blobs.py; gc.py and
verify.py take a `Registry`.

Writes check first that the store can be written (`ObjectStore.check_writable`), so a read-only registry refuses a
push, promote or remove with one line before anything is hashed or written. A version that a later `rollback` of
some alias would reach is removed only with `force`. `resolve` keeps its last answer for each reference: when the
store is unreachable it answers from there for up to `stale_resolve_s` (a gateway keeps serving the adapters it
knows through a registry outage) and retries the store at most every `retry_unreachable_s` meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapters_registry import aliases as alias_records
from adapters_registry import bases
from adapters_registry.aliases import Resolution
from adapters_registry.cache import BlobCache
from adapters_registry.errors import ConflictError, NotFoundError, StorageError
from adapters_registry.golden import GoldenInput, GoldenRow
from adapters_registry.golden import load_rows as load_golden_rows
from adapters_registry.layout import ADAPTERS, cached_version_dir, digest_fanout, version_key, versioned_name
from adapters_registry.manifest import (
    AdapterManifest,
    AliasMove,
    AliasRecord,
    BaseManifest,
    ParityGate,
    RolloutPolicy,
    Tombstone,
)
from adapters_registry.naming import Ref, check_name, parse_ref
from adapters_registry.push import OnStage, no_stage_hook, push_version
from adapters_registry.store import ObjectStore, Progress
from adapters_registry.versions import newest_number, read_version, version_numbers

log = logging.getLogger(__name__)

DEFAULT_LOCATION = "~/.loragate/registry"
STALE_RESOLVE_S = 300.0  # how long a last-known resolution stands in for an unreachable store (README: Readiness)
RETRY_UNREACHABLE_S = 5.0  # while the store is unreachable, a known reference retries it at most this often
RESOLVED_ENTRIES = 4096  # last-known resolutions kept (least recently used dropped first)

# Called once after every write attempt with {"action", "target", "result": "ok"|"error", "who", "error", "details"}.
AuditHook = Callable[[dict[str, Any]], None]


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

    @property
    def location(self) -> str:
        return self.store.location

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
        for the fingerprint, and again when copied). See bases.py."""
        with self.audited("add_base", name, None, path=str(model_dir), copy=copy) as record:
            base = bases.add_base(self.store, model_dir, name, copy=copy, merged_from=merged_from, progress=progress)
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
        golden: GoldenInput | None = None,
        on_stage: OnStage = no_stage_hook,
    ) -> AdapterManifest:
        """Store `adapter_dir` as the next version of `name`, bound to the registered base `base` (see push.py),
        with `golden` prompts for its parity gate when given (golden.py).

        Refused (ValidationError) when the adapter's own config says it was trained on another base, unless
        `allow_base_mismatch`, which the manifest then records as `base_mismatch` (see provenance.py). `on_stage`
        is called as the push passes each `PushStage`.
        """
        with self.audited("push", name, None, base=base, path=str(adapter_dir)) as record:
            manifest = push_version(
                self.store,
                self.cache,
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
                golden=golden,
                on_stage=on_stage,
            )
            record["target"] = manifest.ref
            record["details"].update(version=manifest.version, digest=manifest.digest, serving=manifest.serving)
            return manifest

    def promote(
        self,
        ref: str,
        alias: str,
        who: str | None = None,
        *,
        weight: int | None = None,
        policy: RolloutPolicy | None = None,
        shadow: tuple[str, int] | None = None,
        gate: ParityGate | None = None,
        parity: dict[str, Any] | None = None,
    ) -> AdapterManifest:
        """Point `name:alias` at the version `ref` names; with `weight` 1-99, send that percent of the alias's
        requests to it instead (a rollout: aliases.py; `policy` lets gateways stop it by themselves), 0 stops the
        rollout, 100 completes it. `shadow` (ref, percent) sends a copy of that share to ref (0: stop). `gate` sets
        the alias's parity thresholds; `parity` is what the parity gate found (or that it was forced), for the
        audit: the gate itself runs where the engines are (gateway/parity.py), before this is called."""
        details: dict[str, Any] = {"alias": alias}
        if weight is not None:
            details["weight"] = weight
        if policy is not None:
            details["policy"] = policy.model_dump(mode="json")
        if shadow is not None:
            details["shadow"] = {"ref": shadow[0], "percent": shadow[1]}
        if gate is not None:
            details["gate"] = gate.model_dump(mode="json")
        if parity is not None:
            details["parity"] = parity
        with self.audited("promote", f"{ref} -> :{alias}", who, **details) as record:
            manifest, state = alias_records.promote(
                self.store, ref, alias, who, self.resolve, weight, policy=policy, shadow=shadow, gate=gate
            )
            record["target"] = f"{manifest.name}:{alias}"
            record["details"].update(version=manifest.version, serves=alias_records.describe_state(state))
            return manifest

    def stop_rollout(
        self, name: str, alias: str, version: int, who: str, reason: str, figures: dict[str, Any]
    ) -> AliasRecord | None:
        """A gateway's automatic rollback: the candidate `name@version` back to weight 0 (compare-and-swap), audited
        with the reason and the figures; None (nothing written, audited as `already_done`) when it was no longer
        rolled out (another replica stopped it first, or a person moved the alias)."""
        with self.audited(
            "rollout_stop", f"{name}:{alias}", who, alias=alias, version=version, reason=reason, figures=figures
        ) as record:
            state = alias_records.stop_rollout(self.store, name, alias, version, who, reason)
            if state is None:
                record["result"] = "already_done"
                return None
            record["details"]["serves"] = alias_records.describe_state(state)
            return state

    def rollback(self, name: str, alias: str, who: str | None = None) -> AdapterManifest:
        with self.audited("rollback", f"{name}:{alias}", who, alias=alias) as record:
            manifest, state = alias_records.rollback(self.store, name, alias, who, self.resolve)
            record["details"].update(version=manifest.version, serves=alias_records.describe_state(state))
            return manifest

    def remove(self, ref: str, who: str | None = None, *, force: bool = False) -> AdapterManifest:
        """Tombstone a version. Refused while an alias points at it, and (unless `force`) while a later rollback
        of an alias would reach it (aliases.py: `check_removable`)."""
        with self.audited("remove", ref, who, force=force) as record:
            manifest = self.resolve(ref)
            rollbacks = alias_records.check_removable(self.store, manifest, force=force)
            tomb = Tombstone(name=manifest.name, version=manifest.version, digest=manifest.digest)
            self.store.put_bytes(version_key(manifest.name, manifest.version), tomb.to_json())
            with self._resolved_lock:  # a removed version must not stand in for its references
                for key in [k for k, (_, m) in self._resolved.items() if m.ref == manifest.ref]:
                    del self._resolved[key]
            if rollbacks:
                log.warning("removed %s (--force): %s would go back to it and will now fail", manifest.ref, rollbacks)
            else:
                log.info("removed %s", manifest.ref)
            record["target"] = manifest.ref
            return manifest

    # ---- reads ---------------------------------------------------------------------------------------------------
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
        record = read_version(self.store, parsed.name, version)
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
            record = alias_records.read_alias(self.store, name, str(parsed.alias))
            if record is None:
                raise NotFoundError(f"{ref}: {name!r} has no alias {parsed.alias!r}")
            return record[0].version
        if parsed.kind == "digest":
            return self._by_digest(name, str(parsed.digest_prefix), ref)
        n = newest_number(self.store, name)
        while n > 0 and not isinstance(read_version(self.store, name, n), AdapterManifest):
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
            if isinstance(read_version(self.store, name, candidate), AdapterManifest):
                return candidate
        raise NotFoundError(f"{ref}: no version of {name!r} has that digest")

    def adapter_names(self) -> list[str]:
        return sorted({n for k in self.store.list_keys(ADAPTERS) if (n := versioned_name(k)) is not None})

    def list_adapters(self, name: str | None = None) -> list[AdapterManifest]:
        out: list[AdapterManifest] = []
        for n in [check_name(name)] if name else self.adapter_names():
            for v in version_numbers(self.store, n):
                record = read_version(self.store, n, v)
                if isinstance(record, AdapterManifest):
                    out.append(record)
        return out

    def golden_rows(self, manifest: AdapterManifest) -> list[GoldenRow]:
        """The version's golden prompts (empty when it was pushed without any), checked against the manifest."""
        if manifest.golden is None:
            return []
        return load_golden_rows(self.store, manifest.golden, manifest.ref)

    def materialize(self, manifest: AdapterManifest) -> Path:
        """A local folder holding the version's files, each checked against its sha256."""
        return self.cache.assemble(manifest.files, cached_version_dir(manifest.digest_hex))

    def materialized_path(self, manifest: AdapterManifest) -> Path:
        """Where `materialize` puts the version, without touching the store or the disk."""
        return self.cache.root / cached_version_dir(manifest.digest_hex)

    def aliases(self, name: str) -> dict[str, int]:
        return alias_records.aliases(self.store, name)

    def alias_records(self, name: str) -> dict[str, AliasRecord]:
        """Each alias's record: its version, its rollout (`split`) if one is in progress, its history."""
        return alias_records.alias_records(self.store, name)

    def resolve_split(self, ref: str) -> Resolution:
        """What `ref` serves: its version, and for an alias with a rollout in progress, the candidate and its weight
        (`Resolution.pick` chooses per request). While the store is unreachable, `resolve`'s last answer for the
        reference stands in, without a split."""
        parsed = parse_ref(ref)
        if parsed.kind != "alias":
            return Resolution(ref, self.resolve(ref))
        try:
            found = alias_records.read_alias(self.store, parsed.name, str(parsed.alias))
        except StorageError:
            return Resolution(ref, self.resolve(ref))
        if found is None:
            raise NotFoundError(f"{ref}: {parsed.name!r} has no alias {parsed.alias!r}")
        record = found[0]
        current = self.resolve(f"{parsed.name}@{record.version}")
        shadow = self.resolve(f"{parsed.name}@{record.shadow.version}") if record.shadow else None
        percent = record.shadow.percent if record.shadow else 0
        if record.split is None:
            return Resolution(ref, current, shadow=shadow, shadow_percent=percent)
        candidate = self.resolve(f"{parsed.name}@{record.split.version}")
        split = record.split
        return Resolution(ref, current, candidate, split.weight, split.policy, shadow, percent)

    def alias_history(self, name: str, alias: str) -> list[AliasMove]:
        return alias_records.alias_history(self.store, name, alias)

    def get_base(self, name: str) -> BaseManifest:
        return bases.get_base(self.store, name)

    def list_bases(self) -> list[BaseManifest]:
        return bases.list_bases(self.store)

    def base_dir(self, name: str) -> Path:
        return bases.base_dir(self.store, self.cache, name)


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
