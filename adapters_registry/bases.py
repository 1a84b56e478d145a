"""Registered base models: add one (fingerprinted, its weights copied in or left where they are), read, list, and
find its weights; and the rule that adapter and base names are unique regardless of case.

A base record is create-only: adding the same model under the same name again answers the stored record, another
model under that name is a conflict. With `copy`, the weights become blobs of the registry (gc keeps them); without,
the record keeps the folder's path, valid only on machines that have it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adapters_registry.blobs import refresh_blobs, restore_blobs, upload_blobs
from adapters_registry.cache import BlobCache
from adapters_registry.errors import ConflictError, NotFoundError, ValidationError
from adapters_registry.layout import ADAPTERS, BASES, base_key, base_name, cached_base_dir, versions_prefix
from adapters_registry.manifest import BaseManifest
from adapters_registry.naming import check_name
from adapters_registry.store import ObjectStore, Progress, sha256_file
from adapters_registry.versions import load_json

log = logging.getLogger(__name__)


def add_base(
    store: ObjectStore,
    model_dir: Path,
    name: str,
    *,
    copy: bool = False,
    merged_from: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> BaseManifest:
    from adapters_registry.fingerprint import describe_base, module_shapes

    check_name(name, "base name")
    if store.list_keys(versions_prefix(name)):
        raise ValidationError(f"base name {name!r} is already an adapter name; pick another")
    if not store.exists(base_key(name)):
        check_case(store, name, "base name")
    if not model_dir.is_dir():
        raise ValidationError("not a directory", path=str(model_dir))
    facts = describe_base(model_dir, progress=progress)
    linear, embedding = module_shapes(model_dir)
    files: dict[str, str] | None = None
    if copy:
        files = {}
        for path in sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
            files[path.name] = sha256_file(path, progress)
        refresh_blobs(store, files, model_dir, upload_blobs(store, files, model_dir))
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
    if store.put_bytes(base_key(name), manifest.to_json(), if_absent=True):
        restore_blobs(store, files or {}, model_dir)
        log.info("registered base %s (%s)", name, facts.fingerprint)
        return manifest
    existing = get_base(store, name)
    if existing.fingerprint != manifest.fingerprint:
        raise ConflictError(
            f"base {name!r} is already registered with another fingerprint ({existing.fingerprint[:19]}...)"
        )
    return existing


def get_base(store: ObjectStore, name: str) -> BaseManifest:
    obj = load_json(store, base_key(check_name(name, "base name")))
    if obj is None:
        raise NotFoundError(f"base model {name!r} is not registered (loragate registry base add DIR --name {name})")
    return BaseManifest.model_validate(obj)


def list_bases(store: ObjectStore) -> list[BaseManifest]:
    names = [base_name(k) for k in store.list_keys(BASES)]
    return [get_base(store, n) for n in sorted(names)]


def base_dir(store: ObjectStore, cache: BlobCache, name: str) -> Path:
    """A local folder with the base's weights: assembled from its blobs when copied in, else its registered path."""
    base = get_base(store, name)
    if base.files:
        return cache.assemble(base.files, cached_base_dir(base.fingerprint))
    if base.path and (Path(base.path) / "config.json").is_file():
        return Path(base.path)
    raise NotFoundError(f"base {name!r}: weights are not available here (registered from {base.path})")


def check_case(store: ObjectStore, name: str, what: str) -> None:
    """Refuse `name` when an adapter or base already has the same name in another case."""
    folded = name.casefold()
    bases = [base_name(k) for k in store.list_keys(BASES)]
    for kind, existing in [("adapter", n) for n in store.list_children(ADAPTERS)] + [("base", n) for n in bases]:
        if existing != name and existing.casefold() == folded:
            raise ValidationError(
                f"{what} {name!r} differs only in case from the existing {kind} {existing!r}: names are unique "
                "regardless of case (on a case-insensitive disk they would share one folder); "
                f"use {existing!r} or another name"
            )
