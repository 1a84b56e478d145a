"""`loragate merge REF --out DIR`: merge a registered adapter version into its base and export it, checked.

    loragate merge support-bot@3 --out merged/support-bot
    loragate merge support-bot:prod --out merged/support-bot --register support-bot-merged   # + gateway/Helm snippets

With `--register NAME` the merged model becomes a registry base, and two files are written next to `--out`:
`NAME.gateway.yaml` (for `loragate serve --config`) and `NAME.helm-values.yaml` (for `helm install -f`), both serving
it as a dedicated deployment without LoRA under the adapter's public name.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_registry.errors import RegistryError
from training.errors import TrainingError

if TYPE_CHECKING:
    from training.merge import MergeOptions, MergeResult

HELM_MODEL_MOUNT = "/models"

# What `loragate merge` prints as one line (`error: ...`, exit status 2) instead of a traceback.
USER_ERRORS = (TrainingError, RegistryError)


def register(sub: Any) -> None:
    merge = sub.add_parser("merge", help="merge an adapter version into its base model and export it (checked)")
    merge.add_argument("ref", help="adapter reference: name, name@N, name@sha256:<prefix> or name:alias")
    merge.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    merge.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="export dtype")
    merge.add_argument(
        "--qlora-base",
        choices=("dequantized", "original"),
        default="dequantized",
        help="QLoRA adapters: merge into the dequantized 4-bit base (what was trained; default) or the original",
    )
    merge.add_argument(
        "--min-agreement",
        type=_fraction,
        default=None,
        help="greedy agreement with base + adapter needed to export (default 0.95)",
    )
    merge.add_argument("--force", action="store_true", help="export even when the equivalence check fails")
    merge.add_argument("--probes", type=Path, default=None, help="probe prompts, one per line (default: built in)")
    merge.add_argument("--register", metavar="NAME", default=None, help="register the merged model as base NAME")
    merge.add_argument(
        "--registry", default=None, help="registry location (default: $LORAGATE_REGISTRY or ~/.loragate)"
    )
    merge.set_defaults(handler=run, log_level=logging.INFO)


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: not a number") from exc
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value}: must be between 0 and 1")
    return number


def gateway_config(*, base: str, public_name: str, registry: str | None) -> dict[str, Any]:
    """`loragate serve --config` settings for a dedicated deployment of a merged model (no LoRA)."""
    config: dict[str, Any] = {"base": base, "base_name": public_name, "engines": {"enable_lora": False}}
    if registry:
        config["registry"] = registry
    return config


def helm_values(
    *, public_name: str, model_dir_name: str, registry_base: str | None = None, registry: str | None = None
) -> dict[str, Any]:
    """Values for helm/loragate serving the merged model under the adapter's public name, engines without LoRA.

    With `registry_base` (the merged model registered, weights included, in the S3 `registry`), the engine pods copy
    it from that registry at start onto their model volume. Without, `model_dir_name` must be put on a volume named
    in `engine.modelVolume.existingClaim`; the chart refuses to render until one holds the path.
    """
    if registry_base is None or registry is None or not registry.startswith("s3://"):
        return {
            "baseModel": {"servedName": public_name},
            "engine": {"model": f"{HELM_MODEL_MOUNT}/{model_dir_name}", "lora": {"enabled": False}},
        }
    bucket, _, prefix = registry.removeprefix("s3://").partition("/")
    return {
        "baseModel": {"servedName": public_name},
        "engine": {
            "model": f"{HELM_MODEL_MOUNT}/{registry_base}",
            "lora": {"enabled": False},
            "modelVolume": {"registryBase": registry_base},
        },
        "registry": {"mode": "s3", "s3": {"bucket": bucket, "prefix": prefix.strip("/")}},
    }


def _read_probes(path: Path) -> list[str]:
    from training.merge import MergeError

    try:
        probes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise MergeError(f"{path}: cannot read probes ({exc.strerror})") from exc
    if not probes:
        raise MergeError(f"{path}: no probe prompts (one per line)")
    return probes


def run(args: argparse.Namespace) -> int:
    from training.merge import DEFAULT_MIN_AGREEMENT, DEFAULT_PROBES, MergeOptions

    options = MergeOptions(
        precision=args.precision,
        qlora_base=args.qlora_base,
        min_agreement=DEFAULT_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement,
        force=args.force,
        probes=_read_probes(args.probes) if args.probes else DEFAULT_PROBES,
    )
    merge_registered(args.registry, args.ref, args.out, options, register=args.register)
    return 0


def merge_registered(
    registry: str | None,
    ref: str,
    out: Path,
    options: MergeOptions,
    *,
    register: str | None = None,
    say: Callable[[str], None] = print,
) -> MergeResult:
    """Resolve `ref`, merge it into its bound base, optionally register the result. Raises `MergeError` (a
    `TrainingError`) or `RegistryError`, each one line for the user."""
    from adapters_registry import open_registry
    from adapters_registry.errors import NotFoundError
    from training.merge import MergeError, MergeRefused, merge_adapter

    reg = open_registry(registry)
    adapter = reg.resolve(ref)
    base = reg.get_base(adapter.base)
    if adapter.base_fingerprint != base.fingerprint:
        raise MergeError(
            f"{adapter.ref}: trained on base fingerprint {adapter.base_fingerprint[:19]}, "
            f"but base {base.name!r} is now {base.fingerprint[:19]}"
        )
    if register:
        try:
            reg.get_base(register)
        except NotFoundError:
            pass
        else:
            raise MergeError(f"base {register!r} already exists in the registry")
    base_dir = reg.base_dir(base.name)
    adapter_dir = reg.materialize(adapter)

    provenance = {
        "adapter": adapter.name,
        "version": adapter.version,
        "ref": adapter.ref,
        "digest": adapter.digest,
        "serving": adapter.serving,
        "base": base.name,
        "base_fingerprint": base.fingerprint,
    }
    say(f"merging {adapter.ref} ({adapter.digest[:19]}, {adapter.serving}) into base {base.name!r}")
    try:
        result = merge_adapter(base_dir, adapter_dir, out, options, training=adapter.training, provenance=provenance)
    except MergeRefused as exc:
        say(exc.report.summary())
        raise
    say(result.report.summary())
    say(f"merged into the {result.merge_base} base -> {result.out} ({result.seconds:.1f}s)")

    if register:
        merged_from = {**provenance, "equivalence": result.manifest["equivalence"], "merge": result.manifest["merge"]}
        try:
            # A remote registry gets the weights themselves; a local one records where they are.
            copy = reg.location.startswith("s3://")
            registered = reg.add_base(out, register, copy=copy, merged_from=merged_from)
        except RegistryError as exc:
            raise MergeError(f"merged model written to {out} but not registered: {exc}") from exc
        say(f"registered base {registered.name!r} ({registered.fingerprint[:19]})")
        in_registry = registered.files is not None  # the weights themselves are in the registry
        for path in write_snippets(out, register, adapter.name, reg.location, weights_in_registry=in_registry):
            say(f"wrote {path}")
    return result


def write_snippets(
    out: Path, base_name: str, public_name: str, registry: str | None, *, weights_in_registry: bool = False
) -> list[Path]:
    import yaml

    gateway_path = out.parent / f"{base_name}.gateway.yaml"
    helm_path = out.parent / f"{base_name}.helm-values.yaml"
    gateway_path.write_text(
        f"# loragate serve --config {gateway_path.name}: serves {base_name} (merged) as {public_name!r}, no LoRA\n"
        + yaml.safe_dump(gateway_config(base=base_name, public_name=public_name, registry=registry), sort_keys=False)
    )
    if weights_in_registry and registry and registry.startswith("s3://"):
        values = helm_values(
            public_name=public_name, model_dir_name=out.name, registry_base=base_name, registry=registry
        )
        how = (
            f"# the engine pods copy base {base_name} from {registry} at start (engine.modelVolume.registryBase);\n"
            "# set registry.s3.endpoint and registry.s3.existingSecret as your cluster reaches that bucket\n"
        )
    else:
        values = helm_values(public_name=public_name, model_dir_name=out.name)
        how = (
            f"# copy {out} into a PVC as {out.name}/ and set engine.modelVolume.existingClaim to that PVC:\n"
            f"# until a volume holds {HELM_MODEL_MOUNT}/{out.name} the chart refuses to render\n"
        )
    helm_path.write_text(
        f"# helm install {public_name} helm/loragate -f {helm_path.name}\n"
        + how
        + yaml.safe_dump(values, sort_keys=False)
    )
    return [gateway_path, helm_path]
