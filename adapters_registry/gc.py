"""`gc`: delete blobs that no live version and no copied base references, once they are old enough.

Orphans come from pushes killed before their version record and from removed versions (a Tombstone keeps no blobs).
There is no lock: safety rests on ages. A push writes or `touch`es every blob before it creates its version record,
and checks them again after it. The collector reads the references first, then lists the blobs, and deletes an
unreferenced blob only if it is at least `min_age_s` old, re-checked by `ObjectStore.delete_if_older` as it deletes.
So a blob of a push in flight is kept, assuming a push commits within `min_age_s` (minus the collector's own run
time) of writing its blobs. On S3 a touch that lands between the collector's age check and its delete (one round
trip) is lost; the push's check after its commit re-uploads the blob unless it too falls in that gap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from adapters_registry.cache import remove_entry, stale_entries
from adapters_registry.layout import BLOBS, blob_key, is_blob_key
from adapters_registry.store import ObjectStat

if TYPE_CHECKING:
    from adapters_registry.manifest import AdapterManifest
    from adapters_registry.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE_S = 3600.0


class GcPlan(NamedTuple):
    delete: list[str]  # unreferenced and at least min_age_s old
    young: list[str]  # unreferenced but younger: perhaps a push in flight


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    min_age_s: float
    kept: int
    deleted: list[str]  # deleted, or that a dry run would delete
    bytes_freed: int
    young: list[str]
    cache_pruned: list[str] = field(default_factory=list)  # this machine's cached copies no live version needs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_gc(referenced: set[str], stats: Mapping[str, ObjectStat], now: float, min_age_s: float) -> GcPlan:
    """Which blob keys to delete; keys that are not well-formed blob keys are never deleted."""
    if min_age_s < 0:
        raise ValueError(f"min_age_s must be >= 0, got {min_age_s}")
    orphans = sorted(k for k in stats if k not in referenced and is_blob_key(k))
    delete = [k for k in orphans if now - stats[k].mtime >= min_age_s]
    return GcPlan(delete, [k for k in orphans if now - stats[k].mtime < min_age_s])


def referenced_hexes(reg: Registry, live: list[AdapterManifest]) -> set[str]:
    """sha256 hexes of the files and golden prompts of the `live` versions and of every base registered with its
    weights copied in."""
    hexes = {h for m in live for h in m.files.values()}
    hexes.update(m.golden.sha256 for m in live if m.golden is not None)  # a version's golden prompts
    hexes.update(h for base in reg.list_bases() for h in (base.files or {}).values())
    return hexes


def collect_garbage(reg: Registry, *, min_age_s: float = DEFAULT_MIN_AGE_S, dry_run: bool = False) -> GcReport:
    """Delete blobs no live version or copied base references and older than `min_age_s`; audited as a registry
    write (a dry run only reads: not audited)."""
    if dry_run:
        return _collect(reg, min_age_s, dry_run=True)
    with reg.audited("gc", reg.location, None, min_age_s=min_age_s) as record:
        report = _collect(reg, min_age_s, dry_run=False)
        record["details"].update(deleted=len(report.deleted), bytes_freed=report.bytes_freed, kept=report.kept)
        return report


def _collect(reg: Registry, min_age_s: float, *, dry_run: bool) -> GcReport:
    live = reg.list_adapters()  # before listing blobs: a version committed later has only young blobs
    hexes = referenced_hexes(reg, live)
    stats = reg.store.stats(BLOBS)
    now = reg.store.now()
    plan = plan_gc({blob_key(h) for h in hexes}, stats, now, min_age_s)
    deleted: list[str] = []
    young = list(plan.young)
    for key in plan.delete:
        if dry_run or reg.store.delete_if_older(key, now - min_age_s):
            deleted.append(key)
        else:
            young.append(key)  # touched (re-used by a push) since the listing
    freed, kept = sum(stats[k].size for k in deleted), len(stats) - len(deleted)
    verb = "would delete" if dry_run else "deleted"
    log.info("gc %s: %s %d blobs (%d bytes), kept %d", reg.location, verb, len(deleted), freed, kept)
    pruned = prune_cache(reg, {m.digest_hex for m in live}, hexes, min_age_s, dry_run)
    return GcReport(dry_run, min_age_s, kept, deleted, freed, sorted(young), pruned)


def prune_cache(reg: Registry, folders: set[str], hexes: set[str], min_age_s: float, dry_run: bool) -> list[str]:
    """This machine's cached folders and downloads outside the keep sets (a local registry's cache hard-links its
    blobs, so without this a removed version's disk space would stay taken). The same age rule keeps a folder just
    assembled for a version pushed during the run."""
    cutoff = time.time() - min_age_s
    pruned = []
    for path in stale_entries(reg.cache.root, folders, hexes):
        if path.stat().st_mtime > cutoff:
            continue
        if not dry_run:
            remove_entry(path)
        pruned.append(str(path.relative_to(reg.cache.root)))
    return pruned
