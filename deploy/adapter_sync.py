"""Engine-pod sidecar: keep the pod's local adapter cache filled with every servable registry version.

The gateway asks vLLM to load `lora_path = registry.materialize(manifest)`, a folder under `$LORAGATE_CACHE`
named after the registry location and the version's digest. This sidecar runs beside vLLM with the same
`$LORAGATE_REGISTRY` and `$LORAGATE_CACHE` (the chart mounts the cache emptyDir at the same path in both
containers and on the gateway), so the folder the gateway names already exists on the engine pod.

    python deploy/adapter_sync.py --once          # one pass, exit status 1 if any version failed
    python deploy/adapter_sync.py --interval 10 --ready-file /var/cache/loragate/.adapter-sync-ready   # the sidecar

`--ready-file` is written once the first pass has listed the registry and materialised what it could (a broken
version is logged, not waited for): the chart's readiness probe on it keeps the engine pod out of the gateways'
engine set until the adapters are on disk. A registry it cannot list writes nothing, and the pod stays unready.

Each pass also deletes what no servable version needs any more (folders of removed versions, their downloaded
blobs), so the pod's cache follows `loragate registry rm` and `gc` instead of growing until the emptyDir's limit
evicts the pod. vLLM reads a folder only while it loads it, so deleting a removed version's folder is safe.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adapters_registry import open_registry
from adapters_registry.gc import prune_cache, referenced_hexes
from adapters_registry.registry import Registry

log = logging.getLogger("loragate.adapter_sync")


@dataclass
class SyncReport:
    materialized: list[str] = field(default_factory=list)  # refs assembled in this pass (new or already there)
    skipped: list[str] = field(default_factory=list)  # merge-only versions: vLLM never loads them as LoRA
    failed: dict[str, str] = field(default_factory=dict)  # ref -> one-line reason
    pruned: list[str] = field(default_factory=list)  # cache entries deleted: no servable version needs them


def sync_once(registry: Registry) -> SyncReport:
    """Materialise every servable version (a failing one is reported, the others still sync), then prune the rest."""
    report = SyncReport()
    manifests = registry.list_adapters()
    servable = [m for m in manifests if m.serving == "lora"]
    for manifest in manifests:
        if manifest.serving != "lora":
            report.skipped.append(manifest.ref)
            continue
        try:
            registry.materialize(manifest)
        except Exception as exc:  # one corrupt or missing blob must not stop the pass
            report.failed[manifest.ref] = f"{type(exc).__name__}: {exc}"
            log.warning("adapter-sync: %s failed: %s", manifest.ref, report.failed[manifest.ref])
        else:
            report.materialized.append(manifest.ref)
    # The sidecar is the only writer of this cache: no age rule needed.
    hexes = referenced_hexes(registry, servable)
    report.pruned = prune_cache(registry, {m.digest_hex for m in servable}, hexes, min_age_s=0, dry_run=False)
    return report


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--registry", help="registry location (default: $LORAGATE_REGISTRY)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between passes (default 10)")
    parser.add_argument("--once", action="store_true", help="one pass, then exit (status 1 if a version failed)")
    parser.add_argument("--ready-file", type=Path, help="written after the first finished pass (readiness marker)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = open_registry(args.registry)
    while True:
        try:
            report = sync_once(registry)
        except Exception as exc:  # the store is unreachable: keep the cache we have and retry
            if args.once:
                raise
            log.warning("adapter-sync: listing %s failed: %s", registry.location, exc)
        else:
            log.info(
                "adapter-sync: %d ready, %d merge-only skipped, %d failed, %d pruned",
                len(report.materialized),
                len(report.skipped),
                len(report.failed),
                len(report.pruned),
            )
            if args.ready_file is not None and not args.ready_file.exists():
                args.ready_file.parent.mkdir(parents=True, exist_ok=True)
                args.ready_file.write_text(f"{len(report.materialized)} adapter version(s) synced\n")
                log.info("adapter-sync: first pass done, wrote %s", args.ready_file)
            if args.once:
                return 1 if report.failed else 0
        time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
