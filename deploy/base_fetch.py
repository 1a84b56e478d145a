"""Engine-pod init container: copy a registered base model, verified, from the registry onto the pod's model volume.

The chart runs it when `engine.modelVolume.registryBase` names a base whose weights are stored in the registry
(`loragate merge --register NAME` into an S3 registry, `loragate registry base add DIR --name NAME --copy`), so
that vLLM's `--model <mountPath>/NAME` exists when vLLM starts.

    python deploy/base_fetch.py --base support-bot-merged --out /models/support-bot-merged

Every file is checked against the sha256 the base's manifest records. The files are assembled under
`<out's parent>/.loragate-cache/` (on the same volume) and `out` becomes a relative link to that folder, so a
restarted pod whose volume survived finds its copy and downloads nothing. Exit status 1 with one line on failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from adapters_registry import open_registry
from adapters_registry.errors import RegistryError

log = logging.getLogger("loragate.base_fetch")


def fetch_base(location: str | None, name: str, out: Path) -> Path:
    """`out` as a link to a verified copy of base `name`'s files; returns the folder it points at."""
    registry = open_registry(location, cache_dir=out.parent / ".loragate-cache")
    base = registry.get_base(name)
    if not base.files:
        raise RegistryError(
            f"base {name!r} is registered without its weights (from {base.path}): register it with --copy, "
            "or mount a volume holding it (engine.modelVolume.existingClaim)"
        )
    folder = registry.base_dir(name)
    if out.is_symlink() and out.resolve() == folder.resolve():
        return folder
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.link")
    staging.unlink(missing_ok=True)
    staging.symlink_to(os.path.relpath(folder, out.parent))
    os.replace(staging, out)  # a link that exists points at a complete folder
    return folder


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--registry", help="registry location (default: $LORAGATE_REGISTRY)")
    parser.add_argument("--base", required=True, help="registered base model name")
    parser.add_argument("--out", type=Path, required=True, help="where vLLM will read it (engine.model)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in environment variables"
    try:
        folder = fetch_base(args.registry, args.base, args.out)
    except (RegistryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("base-fetch: %s ready at %s (%s)", args.base, args.out, folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
