"""Push: store an adapter folder as the next version of a name, bound to a registered base.

The blobs are uploaded first and the version record is created last, create-only, so a push killed half-way leaves
unreferenced blobs and no visible version, and of two concurrent pushes the loser takes the next number. Content
already registered on the same base with the same contract answers the existing version. A folder that changes
while it is pushed (a trainer still writing) registers nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from adapters_registry.bases import base_dir, check_case, get_base, list_bases
from adapters_registry.blobs import refresh_blobs, restore_blobs, upload_blobs
from adapters_registry.cache import BlobCache
from adapters_registry.errors import ConflictError, ValidationError
from adapters_registry.golden import GoldenInput, golden_set, normalize_rows
from adapters_registry.golden import store_blob as store_golden
from adapters_registry.layout import base_key, blob_key, digest_dir, digest_entry, head_key, version_key
from adapters_registry.manifest import AdapterManifest, BaseManifest, GoldenSet, files_digest, utc_now
from adapters_registry.naming import check_name
from adapters_registry.store import ObjectStore, sha256_file
from adapters_registry.versions import head_hint, newest_number, read_version

log = logging.getLogger(__name__)

# The points a push passes, in order; `on_stage` is told each one (tests stop or kill a push there).
PushStage = Literal["hashed", "blobs-written", "version-written"]
OnStage = Callable[[PushStage], None]


def no_stage_hook(stage: PushStage) -> None:
    pass


def push_version(
    store: ObjectStore,
    cache: BlobCache,
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
    from adapters_registry.provenance import declared_base_mismatch, describe_mismatch
    from adapters_registry.validate import CONFIG_FILE, classify_files, inspect_adapter

    # refused before anything is hashed: the names, labels, contract and training metadata
    base_manifest = _check_names(store, name, base)
    _check_labels(labels)
    normalized = _normalize_contract(contract)
    _check_training(training)
    golden_record, golden_blob = _golden(golden)

    # 1) hash
    names = classify_files(adapter_dir)
    before = _snapshot(adapter_dir, names)
    files = {f: sha256_file(adapter_dir / f) for f in names}
    on_stage("hashed")
    digest = files_digest(files)

    # 2) same content? Identical content on the same base passed the same checks when it was pushed
    if same := _same_content(store, name, digest, base_manifest.fingerprint, normalized, golden_record):
        log.info("%s: identical content already registered as %s", adapter_dir, same.ref)
        return same

    # 3) inspect: a servable LoRA of this base (validate.py), trained on it (provenance.py), changing its logits
    facts = inspect_adapter(adapter_dir, base_manifest)
    if facts.files != names:
        raise ConflictError(f"{adapter_dir}: files changed during the push; nothing was registered, try again")
    mismatch = declared_base_mismatch(facts.config, base_manifest, list_bases(store))
    if mismatch is not None and not allow_base_mismatch:
        raise ValidationError(describe_mismatch(mismatch, base), path=str(adapter_dir / CONFIG_FILE))
    if mismatch is not None:
        log.warning("%s: %s; accepted (allow_base_mismatch)", adapter_dir, describe_mismatch(mismatch, base))
    if check_effect:
        from adapters_registry.effect_check import check_effect as run_effect_check

        run_effect_check(base_dir(store, cache, base), adapter_dir)

    # 4) upload blobs
    stored = upload_blobs(store, files, adapter_dir)

    # 5) check the snapshot: a trainer still writing means what we hashed is not what we stored
    if _snapshot(adapter_dir, names) != before:
        raise ConflictError(f"{adapter_dir}: files changed during the push; nothing was registered, try again")
    cache.trust(files.values())  # hashed just now: the first materialize here need not hash them again
    # after the snapshot: a folder materialized from a local store shares its files' inodes (and mtimes) with them
    refresh_blobs(store, files, adapter_dir, stored)
    if golden_record is not None:
        store_golden(store, golden_record, golden_blob)
    on_stage("blobs-written")

    # 6) commit the record: create-only, so a concurrent push that took the number sends us to the next
    sizes = {f: before[f][0] for f in names}
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
        golden=golden_record,
    )
    version = newest_number(store, name) + 1
    while True:
        manifest = AdapterManifest(version=version, created_at=utc_now(), **fields)
        if store.put_bytes(version_key(name, version), manifest.to_json(), if_absent=True):
            break
        version += 1
    on_stage("version-written")
    restore_blobs(store, files, adapter_dir)
    if golden_record is not None and not store.exists(blob_key(golden_record.sha256)):
        store_golden(store, golden_record, golden_blob)  # a concurrent gc deleted it before it saw the record

    # 7) index and head hint: both only speed up readers, which find a version without them
    store.put_bytes(digest_entry(name, manifest.digest_hex, version), b"", if_absent=True)
    if head_hint(store, name) < version:
        store.put_bytes(head_key(name), json.dumps({"version": version}).encode())
    log.info("pushed %s (%s, serving=%s)", manifest.ref, digest, manifest.serving)
    return manifest


def _check_names(store: ObjectStore, name: str, base: str) -> BaseManifest:
    """The registered base `base`, once `name` may name a new version bound to it."""
    check_name(name)
    base_manifest = get_base(store, base)
    if store.exists(base_key(name)):
        raise ValidationError(f"adapter name {name!r} is the name of a registered base model; pick another")
    if newest_number(store, name) == 0:  # a new name: unique regardless of case
        check_case(store, name, "adapter name")
    return base_manifest


def _check_labels(labels: dict[str, str] | None) -> None:
    for key, value in (labels or {}).items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise ValidationError(f"label {key!r}={value!r}: labels are non-empty string keys to string values")


def _check_training(training: dict[str, Any] | None) -> None:
    try:
        json.dumps(training, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"training metadata must be plain JSON: {exc}") from exc


def _normalize_contract(contract: dict[str, Any] | None) -> dict[str, Any] | None:
    if contract is None:
        return None
    from adapters_registry.contract import normalize_contract

    try:
        return normalize_contract(contract)
    except ValueError as exc:
        raise ValidationError(f"output contract refused: {exc}") from exc


def _snapshot(folder: Path, names: list[str]) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, inode) per file: any write or replacement changes it."""
    stats = {n: (folder / n).stat() for n in names}
    return {n: (st.st_size, st.st_mtime_ns, st.st_ino) for n, st in stats.items()}


def _golden(golden: GoldenInput | None) -> tuple[GoldenSet | None, bytes]:
    if golden is None:
        return None, b""
    rows = normalize_rows(golden.rows, golden.source)
    return golden_set(rows, golden.source, golden.max_tokens)


def _same_content(
    store: ObjectStore,
    name: str,
    digest: str,
    fingerprint: str,
    contract: dict[str, Any] | None,
    golden: GoldenSet | None,
) -> AdapterManifest | None:
    prefix = digest_dir(name, digest.removeprefix("sha256:")) + "/"
    indexed = [int(key[len(prefix) :]) for key in store.list_keys(prefix)]
    # versions above the head hint may lack their index entry (a push killed just after its record)
    unindexed = range(head_hint(store, name) + 1, newest_number(store, name) + 1)
    for version in sorted({*indexed, *unindexed}, reverse=True):
        record = read_version(store, name, version)
        if (
            isinstance(record, AdapterManifest)
            and record.digest == digest
            and record.base_fingerprint == fingerprint
            and record.contract == contract
            and (record.golden.sha256 if record.golden else None) == (golden.sha256 if golden else None)
        ):
            return record
    return None
