"""`loragate registry ...`: push, list, show, aliases, promote, rollback, rm, verify, materialize, gc,
`base add|list|show`.

The location comes from `--registry DIR|s3://bucket/prefix`, else $LORAGATE_REGISTRY, else ~/.loragate/registry.
Only `base add` creates a registry; every other command on a location that holds nothing (a mistyped path) fails
with one line and exit status 2, and creates nothing. Every failure is one line (`error: ...`, status 2), a
read-only registry included. Every read command takes `--json`. This module imports only argparse at load time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_registry.errors import RegistryError, ValidationError

if TYPE_CHECKING:
    from adapters_registry.manifest import AdapterManifest, AliasSplit, RolloutPolicy
    from adapters_registry.registry import Registry


# What `loragate registry` prints as one line (`error: ...`, exit status 2) instead of a traceback.
USER_ERRORS = (RegistryError,)


def _open(args: argparse.Namespace) -> Registry:
    from adapters_registry.audit import AuditLog
    from adapters_registry.registry import open_registry

    reg = open_registry(getattr(args, "registry", None), must_exist=not getattr(args, "creates", False))
    reg.audit = AuditLog.for_cli(reg.store).registry_hook()
    return reg


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "gateway", None):  # the gateway's registry, not this machine's: none is opened here
        return _promote_through(args)
    try:
        code: int = args.action(_open(args), args)
    except OSError as exc:  # outside the store (the adapter folder, an output file): still one line
        raise RegistryError(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}") from exc
    return code


def _emit(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _labels(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValidationError(f"--label {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _read_contract(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValidationError(str(exc.strerror), path) from exc
    except json.JSONDecodeError as exc:
        raise ValidationError(f"not valid JSON: {exc}", path) from exc
    if not isinstance(data, dict):
        raise ValidationError("a contract is a JSON object", path)
    return data


def _describe(m: AdapterManifest) -> dict[str, Any]:
    return {"ref": m.ref, "engine_name": m.engine_name, **m.model_dump(mode="json")}


def _push(reg: Registry, args: argparse.Namespace) -> int:
    manifest = reg.push(
        Path(args.dir),
        args.name,
        args.base,
        contract=_read_contract(args.contract),
        description=args.description,
        labels=_labels(args.label),
        check_effect=args.check_effect,
        allow_base_mismatch=args.allow_base_mismatch,
        golden=_golden_input(args),
    )
    if args.json:
        _emit(_describe(manifest))
    else:
        note = f" (merge-only: {manifest.serving_reason})" if manifest.serving == "merge-only" else ""
        if manifest.base_mismatch is not None:
            note += f" (base mismatch accepted: adapter_config.json names {manifest.base_mismatch.declared!r})"
        print(f"{manifest.ref} {manifest.digest}{note}")
    return 0


def _list(reg: Registry, args: argparse.Namespace) -> int:
    manifests = reg.list_adapters(args.name)
    aliases: dict[str, dict[int, list[str]]] = {}
    for name in sorted({m.name for m in manifests}):
        for alias, version in reg.aliases(name).items():
            aliases.setdefault(name, {}).setdefault(version, []).append(alias)
    if args.json:
        _emit([{**_describe(m), "aliases": aliases.get(m.name, {}).get(m.version, [])} for m in manifests])
        return 0
    rows = [
        [
            m.ref,
            m.digest_hex[:12],
            m.base,
            str(m.r),
            m.serving,
            ",".join(sorted(aliases.get(m.name, {}).get(m.version, []))),
            m.created_at,
        ]
        for m in manifests
    ]
    _table(rows, ["REF", "DIGEST", "BASE", "RANK", "SERVING", "ALIASES", "CREATED"])
    return 0


def _show(reg: Registry, args: argparse.Namespace) -> int:
    manifest = reg.resolve(args.ref)
    described = _describe(manifest)
    described["aliases"] = sorted(a for a, v in reg.aliases(manifest.name).items() if v == manifest.version)
    if args.json:
        _emit(described)
        return 0
    for key, value in described.items():
        if key == "files":
            for rel, sha in value.items():
                print(f"file: {rel} sha256:{sha}")
        elif value not in (None, {}, []):
            print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    return 0


def _aliases(reg: Registry, args: argparse.Namespace) -> int:
    from adapters_registry.aliases import describe_state

    records = reg.alias_records(args.name)
    if args.json:
        _emit(
            {
                alias: {
                    "version": record.version,
                    "split": record.split.model_dump(mode="json", exclude_none=True) if record.split else None,
                    "shadow": record.shadow.model_dump(mode="json") if record.shadow else None,
                    "gate": record.gate.model_dump(mode="json") if record.gate else None,
                    "history": [move.model_dump(mode="json") for move in record.history],
                }
                for alias, record in records.items()
            }
        )
        return 0
    for alias, record in records.items():
        print(f"{args.name}:{alias} -> {describe_state(record)}")
        if record.split is not None and record.split.policy is not None:
            print(f"  policy: {record.split.policy.describe()}")
        if record.gate is not None:
            print(f"  parity gate: {record.gate.describe()}")
        for move in record.history:
            why = f" ({move.reason})" if move.reason else ""
            print(f"  {move.when} {move.action} {_state(move.from_version, move.from_split)} -> "
                  f"{_state(move.to_version, move.to_split)} by {move.who}{why}")  # fmt: skip
    return 0


def _state(version: int | None, split: AliasSplit | None) -> str:
    return f"{version} + {split.version} at {split.weight}%" if split else str(version)


def _golden_input(args: argparse.Namespace) -> Any:
    from adapters_registry.golden import GoldenInput, read_golden_file

    if args.golden is None:
        if args.golden_max_tokens is not None:
            raise ValidationError("--golden-max-tokens shapes golden prompts: give them with --golden FILE")
        return None
    return GoldenInput(read_golden_file(Path(args.golden)), args.golden, args.golden_max_tokens)


def _promote(reg: Registry, args: argparse.Namespace) -> int:
    policy, shadow, gate = rollout_policy(args), _shadow_flags(args), parity_gate(args)
    golden = _golden_input(args)
    parity = _check_gate_runs_elsewhere(reg, args, golden)
    manifest = reg.promote(
        args.ref, args.alias, who=args.who, weight=args.weight, policy=policy, shadow=shadow, gate=gate, parity=parity
    )
    _print_alias(reg, manifest.name, args.alias)
    return 0


def _check_gate_runs_elsewhere(reg: Registry, args: argparse.Namespace, golden: Any) -> dict[str, Any] | None:
    """The parity gate runs on engines, which this command has none of: a promote that gives a version with golden
    prompts (its own, the alias's version's, or --golden) traffic is refused here unless --force (then the audit
    line says the gate was skipped). What the audit line records of the gate (None: it does not apply)."""
    if args.weight == 0:
        return None
    try:
        candidate = reg.resolve(args.ref)
        record = reg.alias_records(candidate.name).get(args.alias)
        current = reg.resolve(f"{candidate.name}@{record.version}") if record is not None else None
    except RegistryError:
        return None  # the registry's promote refuses it, audited
    if current is not None and current.version == candidate.version:
        return None
    holder = next((m for m in (candidate, current) if m is not None and m.golden is not None), None)
    if golden is None and holder is None:
        return None
    if args.force:
        return {"forced": True}
    rows = len(golden.rows) if golden is not None else holder.golden.rows if holder and holder.golden else 0
    whose = args.golden if golden is not None else holder.ref if holder else ""
    raise ValidationError(
        f"the parity gate runs {rows} golden prompts ({whose}) through an engine before {candidate.ref} gets "
        f"traffic on {candidate.name}:{args.alias}: promote through a gateway (--gateway URL), or skip the gate "
        "with --force (audited)"
    )


def parity_gate(args: argparse.Namespace) -> Any:
    """The alias's parity thresholds the `--gate-*` flags set (None: none given, the alias keeps its own)."""
    from adapters_registry.manifest import ParityGate

    given = {
        "min_agreement": args.gate_min_agreement,
        "max_agreement_drop": args.gate_max_drop,
        "min_contract_validity": args.gate_min_validity,
    }
    if all(value is None for value in given.values()):
        return None
    return ParityGate(**{key: value for key, value in given.items() if value is not None})


def _promote_through(args: argparse.Namespace) -> int:
    """`promote --gateway URL`: the move made by that gateway's admin API (POST /admin/aliases/promote), which warms
    the version and runs its parity gate on its engines first; the admin key from $LORAGATE_ADMIN_KEY."""
    import os

    import httpx

    golden = _golden_input(args)
    policy, shadow, gate = rollout_policy(args), _shadow_flags(args), parity_gate(args)
    body: dict[str, Any] = {"ref": args.ref, "alias": args.alias, "weight": args.weight, "force": args.force}
    if policy is not None:
        body["policy"] = policy.model_dump(mode="json")
    if shadow is not None:
        body["shadow"], body["shadow_percent"] = shadow[0] or None, shadow[1]
    if gate is not None:
        body["gate"] = gate.model_dump(mode="json")
    if golden is not None:
        body["golden"], body["golden_max_tokens"] = golden.rows, golden.max_tokens
    key = os.environ.get("LORAGATE_ADMIN_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = f"{args.gateway.rstrip('/')}/admin/aliases/promote"
    try:
        answer = httpx.post(url, json=body, headers=headers, timeout=httpx.Timeout(600, connect=10))
    except httpx.HTTPError as exc:
        raise RegistryError(f"cannot reach the gateway at {args.gateway}: {exc}") from exc
    try:
        data = answer.json()
    except ValueError:
        data = {}
    if answer.status_code != 200:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else answer.text.strip()[:300]
        raise RegistryError(f"the gateway answered {answer.status_code}: {message}")
    print(f"{data['name']}:{data['alias']} -> {data['serves']}")
    parity = data.get("parity") or {}
    if "candidate" in parity:
        print(f"parity gate passed: {_parity_line(parity)}")
    elif parity.get("skipped"):
        print(f"parity gate skipped: {parity['skipped']}")
    return 0


def _parity_line(parity: dict[str, Any]) -> str:
    def one(figures: dict[str, Any]) -> str:
        agreement = figures["agreement"]
        text = f"{figures['ref']} agreement " + ("n/a" if agreement is None else f"{agreement:.0%}")
        if figures.get("contract_validity") is not None:
            text += f", contract validity {figures['contract_validity']:.0%}"
        return text

    sides = [one(parity["candidate"])] + ([one(parity["current"])] if parity.get("current") else [])
    return f"{'; '.join(sides)} on {parity['candidate']['prompts']} golden prompts from {parity['golden']}"


def rollout_policy(args: argparse.Namespace) -> RolloutPolicy | None:
    """The policy `--max-error-ratio`, `--max-ttft-ratio`, `--min-contract-validity` (with `--window`,
    `--min-requests`) describe; None when no rule is given."""
    from adapters_registry.manifest import RolloutPolicy

    rules = (args.max_error_ratio, args.max_ttft_ratio, args.min_contract_validity)
    if rules == (None, None, None):
        if args.window is not None or args.min_requests is not None:
            raise ValidationError(
                "--window and --min-requests shape a rollout policy: give a rule too (--max-error-ratio, "
                "--max-ttft-ratio or --min-contract-validity)"
            )
        return None
    shape = {"window_s": args.window, "min_requests": args.min_requests}
    return RolloutPolicy(
        max_error_ratio=args.max_error_ratio,
        max_ttft_ratio=args.max_ttft_ratio,
        min_contract_validity=args.min_contract_validity,
        **{key: value for key, value in shape.items() if value is not None},
    )


def _shadow_flags(args: argparse.Namespace) -> tuple[str, int] | None:
    if args.shadow is None and args.shadow_percent is None:
        return None
    if args.shadow_percent is None:
        raise ValidationError("--shadow needs --shadow-percent (the share of the alias's requests to copy)")
    if args.shadow is None and args.shadow_percent != 0:
        raise ValidationError("--shadow-percent needs --shadow REF (0 alone stops the alias's shadow)")
    return args.shadow or "", args.shadow_percent


def _rollback(reg: Registry, args: argparse.Namespace) -> int:
    manifest = reg.rollback(args.name, args.alias, who=args.who)
    _print_alias(reg, manifest.name, args.alias)
    return 0


def _print_alias(reg: Registry, name: str, alias: str) -> None:
    from adapters_registry.aliases import describe_state

    print(f"{name}:{alias} -> {describe_state(reg.alias_records(name).get(alias))}")


def _rm(reg: Registry, args: argparse.Namespace) -> int:
    print(f"removed {reg.remove(args.ref, who=args.who, force=args.force).ref}")  # --force: the registry warns
    return 0


def _materialize(reg: Registry, args: argparse.Namespace) -> int:
    manifest = reg.resolve(args.ref)
    folder = reg.materialize(manifest)
    if args.json:
        _emit({"ref": manifest.ref, "engine_name": manifest.engine_name, "path": str(folder)})
    else:
        print(folder)
    return 0


def _verify(reg: Registry, args: argparse.Namespace) -> int:
    from adapters_registry.verify import verify_registry

    problems = verify_registry(reg, args.ref)
    if args.json:
        _emit({"ok": not problems, "problems": problems})
    else:
        for problem in problems:
            print(problem)
        print("ok" if not problems else f"{len(problems)} problem(s)", file=sys.stderr)
    return 0 if not problems else 1


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `1h`, `2d` -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration like 3600s, 30m, 1h or 2d")
    return float(match[1]) * _UNITS[match[2] or "s"]


def _size(n: int) -> str:
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def _gc(reg: Registry, args: argparse.Namespace) -> int:
    from adapters_registry.gc import collect_garbage

    report = collect_garbage(reg, min_age_s=args.min_age, dry_run=args.dry_run)
    if args.json:
        _emit(report.to_dict())
        return 0
    verb = "would delete" if report.dry_run else "deleted"
    for key in report.deleted:
        print(f"{verb} {key}")
    print(
        f"{verb} {len(report.deleted)} blob(s), {_size(report.bytes_freed)}; kept {report.kept}, "
        f"of which {len(report.young)} unreferenced but younger than {report.min_age_s:g}s"
    )
    if report.cache_pruned:
        print(f"{'would prune' if report.dry_run else 'pruned'} {len(report.cache_pruned)} local cache entries")
    return 0


def _base_add(reg: Registry, args: argparse.Namespace) -> int:
    model_dir = Path(args.dir)
    with hashing_bar(model_dir, twice=args.copy) as progress:
        base = reg.add_base(model_dir, args.name, copy=args.copy, progress=progress)
    if args.json:
        _emit(base.model_dump(mode="json"))
    else:
        print(f"{base.name} {base.fingerprint}")
    return 0


@contextlib.contextmanager
def hashing_bar(model_dir: Path, *, twice: bool) -> Iterator[Callable[[int], object] | None]:
    """A progress bar (on a terminal only: tqdm, which the training stack brings) over the bytes a base add hashes."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    from adapters_registry.fingerprint import WEIGHT_SUFFIXES

    files = [p for p in model_dir.iterdir() if p.is_file()] if model_dir.is_dir() else []
    total = sum(p.stat().st_size for p in files if p.suffix in WEIGHT_SUFFIXES)  # the fingerprint hashes these
    total += sum(p.stat().st_size for p in files if not p.name.startswith(".")) if twice else 0  # a copy, all
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing", disable=None) as bar:
        yield bar.update


def _base_list(reg: Registry, args: argparse.Namespace) -> int:
    bases = reg.list_bases()
    if args.json:
        _emit([b.model_dump(mode="json", exclude={"linear_shapes", "embedding_shapes"}) for b in bases])
        return 0
    rows = [
        [
            b.name,
            b.fingerprint.removeprefix("sha256:")[:12],
            b.architecture,
            str(b.num_hidden_layers),
            b.path or "(copied)",
        ]
        for b in bases
    ]
    _table(rows, ["NAME", "FINGERPRINT", "ARCHITECTURE", "LAYERS", "WEIGHTS"])
    return 0


def _base_show(reg: Registry, args: argparse.Namespace) -> int:
    base = reg.get_base(args.name)
    _emit(base.model_dump(mode="json")) if args.json else print(base.model_dump_json(indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry", default=argparse.SUPPRESS, metavar="DIR|s3://BUCKET/PREFIX", help="registry location"
    )
    reads = argparse.ArgumentParser(add_help=False)
    reads.add_argument("--json", action="store_true", help="print JSON")

    parser = sub.add_parser("registry", parents=[common], help="adapter registry: push, list, promote, verify")
    cmds = parser.add_subparsers(dest="registry_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, action: Any, help_: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, parents=[common, *parents], help=help_)
        p.set_defaults(handler=_run, action=action)
        return p

    p = add("push", _push, "validate an adapter directory and store it as a new version", reads)
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--base", required=True, help="registered base model name")
    p.add_argument("--contract", metavar="FILE", help="output contract (JSON schema, regex or choice) as JSON")
    p.add_argument("--description")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--check-effect", action="store_true", help="refuse an adapter that does not change the logits")
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="accept an adapter whose adapter_config.json names another base (recorded in the manifest)",
    )
    p.add_argument("--golden", metavar="FILE", help="golden prompts (JSONL) its parity gate runs before a promote")
    p.add_argument("--golden-max-tokens", type=int, metavar="N", help="tokens an answer to them (default 64)")

    p = add("list", _list, "list versions", reads)
    p.add_argument("name", nargs="?")
    p = add("show", _show, "show one version's manifest", reads)
    p.add_argument("ref", metavar="REF")
    p = add("aliases", _aliases, "show an adapter's aliases and their history", reads)
    p.add_argument("name")
    for name, action, help_ in (("promote", _promote, "point an alias at a version, or roll one out to part of it"),):
        p = add(name, action, help_)
        p.add_argument("ref", metavar="REF")
        p.add_argument("--alias", required=True)
        p.add_argument(
            "--weight",
            type=int,
            metavar="PERCENT",
            help="send this percent (1-99) of the alias's requests to REF, the rest to its version; 100 completes "
            "the rollout, 0 stops it",
        )
        policy = p.add_argument_group(
            "rollout policy", "with --weight 1-99: each gateway stops the rollout (weight 0, audited) if REF breaks it"
        )
        policy.add_argument("--max-error-ratio", type=float, metavar="FRACTION", help="most 5xx answers, e.g. 0.02")
        policy.add_argument(
            "--max-ttft-ratio", type=float, metavar="X", help="most p99 time to first token, times the version's"
        )
        policy.add_argument(
            "--min-contract-validity", type=float, metavar="FRACTION", help="fewest answers keeping to the contract"
        )
        policy.add_argument("--window", type=float, metavar="SECONDS", help="judged over this window (300)")
        policy.add_argument("--min-requests", type=int, metavar="N", help="REF's requests before judging (20)")
        shadow = p.add_argument_group("shadow traffic", "a copy of some requests, whose answers nobody sees")
        shadow.add_argument("--shadow", metavar="REF", help="send copies of the alias's requests to this version")
        shadow.add_argument(
            "--shadow-percent", type=int, metavar="PERCENT", help="the share of requests copied (1-100; 0 stops)"
        )
        gate = p.add_argument_group(
            "parity gate",
            "before REF gets traffic, its golden prompts (its own, the alias's version's, or --golden) run on REF "
            "and on the alias's version through a gateway's engines; a candidate below the alias's thresholds is "
            "refused with the figures",
        )
        gate.add_argument("--gateway", metavar="URL", help="make the move through this gateway's admin API")
        gate.add_argument("--golden", metavar="FILE", help="golden prompts (JSONL) for this promote instead")
        gate.add_argument("--golden-max-tokens", type=int, metavar="N", help="tokens an answer (default 64)")
        gate.add_argument(
            "--gate-min-agreement", type=float, metavar="FRACTION", help="fewest answers agreeing with the references"
        )
        gate.add_argument(
            "--gate-max-drop", type=float, metavar="FRACTION", help="most agreement below the alias's version (0.05)"
        )
        gate.add_argument(
            "--gate-min-validity", type=float, metavar="FRACTION", help="fewest answers keeping to the contract (0.99)"
        )
        gate.add_argument("--force", action="store_true", help="skip the parity gate (audited)")
        p.add_argument("--who")
    p = add("rollback", _rollback, "move an alias back to its previous version")
    p.add_argument("name")
    p.add_argument("--alias", required=True)
    p.add_argument("--who")
    p = add("rm", _rm, "remove a version (refused while an alias points at it or a rollback would reach it)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--who")
    p.add_argument("--force", action="store_true", help="remove it although a later rollback would reach it")
    p = add("materialize", _materialize, "print a local folder with the version's verified files", reads)
    p.add_argument("ref", metavar="REF")
    p = add("verify", _verify, "re-hash stored content and report corruption", reads)
    p.add_argument("ref", metavar="REF", nargs="?")
    p = add("gc", _gc, "delete blobs that no live version or copied base uses", reads)
    p.add_argument(
        "--min-age",
        type=parse_duration,
        default=3600.0,
        metavar="DURATION",
        help="only delete blobs older than this (default 1h): a push in progress writes its blobs first",
    )
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")

    base = cmds.add_parser("base", parents=[common], help="base models")
    base_cmds = base.add_subparsers(dest="base_command", metavar="SUBCOMMAND", required=True)
    p = base_cmds.add_parser("add", parents=[common, reads], help="register a base model directory")
    p.set_defaults(handler=_run, action=_base_add, creates=True)
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--copy", action="store_true", help="copy the weights into the registry")
    p = base_cmds.add_parser("list", parents=[common, reads], help="list base models")
    p.set_defaults(handler=_run, action=_base_list)
    p = base_cmds.add_parser("show", parents=[common, reads], help="show a base model")
    p.set_defaults(handler=_run, action=_base_show)
    p.add_argument("name")
