"""An adapter's version records on the store: read one, list the numbers, find the newest number.

A record is an `AdapterManifest`, or a `Tombstone` once the version is removed; its number is never reused. The
head hint (`head.json`) is a lower bound of the newest number, written after the record: readers probe past it, so
a push killed between the two still counts.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError as PydanticValidationError

from adapters_registry.errors import IntegrityError
from adapters_registry.layout import head_key, version_key, version_number, versions_prefix
from adapters_registry.manifest import AdapterManifest, Tombstone
from adapters_registry.store import ObjectStore

log = logging.getLogger(__name__)


def load_json(store: ObjectStore, key: str) -> dict[str, Any] | None:
    data = store.get_bytes(key)
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{store.location}/{key}: corrupted record ({exc})") from exc
    if not isinstance(obj, dict):
        raise IntegrityError(f"{store.location}/{key}: corrupted record (not an object)")
    return obj


def read_version(store: ObjectStore, name: str, version: int) -> AdapterManifest | Tombstone | None:
    data = store.get_bytes(version_key(name, version))
    if data is None:
        return None
    try:
        return AdapterManifest.model_validate_json(data)
    except PydanticValidationError as exc:
        try:
            return Tombstone.model_validate_json(data)
        except PydanticValidationError:
            raise IntegrityError(f"{name}@{version}: unreadable manifest ({exc.error_count()} errors)") from exc


def version_numbers(store: ObjectStore, name: str) -> list[int]:
    return sorted(version_number(name, k) for k in store.list_keys(versions_prefix(name)))


def head_hint(store: ObjectStore, name: str) -> int:
    """A lower bound of the newest version number; an unreadable hint only costs probes, never correctness."""
    try:
        obj = load_json(store, head_key(name))
        return max(0, int(obj.get("version", 0))) if obj else 0
    except (IntegrityError, TypeError, ValueError):
        log.warning("%s: ignoring an unreadable head hint", name)
        return 0


def newest_number(store: ObjectStore, name: str) -> int:
    """The highest allocated version number (live or removed); 0 when the name has none."""
    n = head_hint(store, name)
    while store.exists(version_key(name, n + 1)):
        n += 1
    while n > 0 and not store.exists(version_key(name, n)):  # only if the hint ran ahead of a lost record
        n -= 1
    return n
