"""`loragate train`: fine-tune a LoRA/QLoRA adapter from a recipe (imports only argparse at load time).

The run itself is `training.sft.run`; under accelerate's launchers: `accelerate launch ... -m loragate train ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from training.errors import TrainingError

# What `loragate train` prints as one line (`error: ...`, exit status 2) instead of a traceback.
USER_ERRORS = (TrainingError,)


def register(sub: Any) -> None:
    parser = sub.add_parser("train", help="fine-tune a LoRA/QLoRA adapter from a YAML recipe (PEFT + TRL)")
    add_arguments(parser)
    parser.set_defaults(handler=_handle, log_level=logging.INFO)


def _handle(args: argparse.Namespace) -> int:
    from training.recipe import load_recipe
    from training.sft import run, show_plan

    recipe = load_recipe(args.config, args.set)
    if args.plan:
        print(show_plan(recipe, qlora=args.qlora or None, gpu_memory=args.gpu_memory, as_json=args.json))
        return 0
    # A run reads its base from disk or the local Hugging Face cache: no hub calls, no telemetry, unless the
    # caller's environment says otherwise (HF_HUB_OFFLINE=0 downloads a `base.hub` model).
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(
        recipe,
        args.output_dir or Path("runs") / recipe.name,
        qlora=args.qlora or None,
        merge_only=args.merge_only or None,
        publish=args.publish,
        registry=args.registry,
        resume=not args.no_resume,
        force=args.force,
        gpu_memory=args.gpu_memory,
    )
    adapter = result.metrics["adapter"]
    base = result.metrics["base"]
    print(
        f"adapter: {result.adapter_dir}\n"
        f"exact_match: base {base['exact_match']:.3f} -> adapter {adapter['exact_match']:.3f}; "
        f"eval loss {adapter['loss']:.3f} (ppl {adapter['perplexity']:.2f}); stop rate {adapter['stop_rate']:.2f}"
    )
    if result.manifest_ref:
        print(f"published: {result.manifest_ref}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, required=True, help="recipe YAML (see training/recipes/)")
    parser.add_argument("--output-dir", type=Path, default=None, help="run folder (default: runs/<recipe name>)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. lora.r=8"
    )
    parser.add_argument("--qlora", action="store_true", help="4-bit NF4 base with double quantisation (bitsandbytes)")
    parser.add_argument("--merge-only", action="store_true", help="skip the serving lint: the adapter is only merged")
    parser.add_argument("--publish", metavar="NAME", default=None, help="push the adapter into the registry as NAME")
    parser.add_argument("--registry", default=None, help="registry location (default: $LORAGATE_REGISTRY)")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints left in the output folder")
    parser.add_argument(
        "--plan", action="store_true", help="print the VRAM plan (base config only, no weights) and exit"
    )
    parser.add_argument("--json", action="store_true", help="with --plan: one JSON object")
    parser.add_argument("--force", action="store_true", help="run even when the VRAM plan says it will not fit")
    parser.add_argument(
        "--gpu-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="plan against this much GPU memory (e.g. 24GiB) instead of the detected GPU's",
    )
    return parser


def _size(text: str) -> int:
    from training.plan import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
