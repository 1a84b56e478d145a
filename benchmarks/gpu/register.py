"""Register a model directory as a base and push adapter directories onto it, in a local registry.

    python benchmarks/gpu/register.py REGISTRY MODEL_DIR BASE_NAME ADAPTER_DIR [ADAPTER_DIR ...]

Each adapter is pushed under its directory's name. Used by `benchmarks/gpu/run_all.sh` so that a gateway in
external mode can serve the adapters of a vLLM engine it did not start.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from adapters_registry.registry import open_registry


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("registry", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("base")
    parser.add_argument("adapters", type=Path, nargs="+")
    return parser


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    registry = open_registry(args.registry)
    base = registry.add_base(args.model, args.base)
    print(f"base {base.name} {base.fingerprint[:19]} registered in {time.perf_counter() - started:.1f} s", flush=True)
    for adapter in args.adapters:
        manifest = registry.push(adapter, adapter.name, args.base)
        print(f"pushed {manifest.ref} ({manifest.size_bytes / 2**20:.0f} MiB, serving={manifest.serving})", flush=True)
    print(f"registered in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(make_parser().parse_args()))
