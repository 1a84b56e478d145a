"""`loragate dev ...`: developer tools (the tiny local model)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    dev = sub.add_parser("dev", help="developer tools").add_subparsers(dest="dev_command", required=True)
    tiny = dev.add_parser("tiny-model", help="build the tiny local Llama checkpoint (deterministic)")
    tiny.add_argument("out", type=Path, nargs="?", help="output folder (default: print the cached build)")
    tiny.set_defaults(handler=_tiny_model)


def _tiny_model(args: argparse.Namespace) -> int:
    from loragate.tiny_model import build_tiny_model, cached_tiny_model

    if args.out is None:
        print(cached_tiny_model())
        return 0
    from loragate.cli import CLIError

    try:
        print(build_tiny_model(args.out))
    except FileExistsError as exc:
        raise CLIError(str(exc)) from exc
    return 0
