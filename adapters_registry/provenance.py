"""Which base an adapter says it was trained on, checked against the base a push binds it to.

PEFT writes `base_model_name_or_path` into adapter_config.json: the local directory the base was loaded from, a hub
id or a name. Shapes cannot tell a base from its instruct variant (same architecture, same sizes), so a push
compares this declaration with the registered bases, in this order:

1. path: it is the registered path of one or more bases;
2. fingerprint: it is a model directory on this machine; its architecture, sizes and config, tokenizer and chat
   template hashes are compared with each base's, and its weights too when all of those agree with the bound base;
3. name: otherwise (a hub id, a name, a path on another machine) the whole of it or its last component equals a
   base's name or the last component of a base's registered path, ignoring case.

When the bound base is among the bases it names, the push goes on. When it names only other registered bases, or
(2) is a model that is not the bound base, `declared_base_mismatch` returns the mismatch, which a push refuses unless
the caller accepts it (then the manifest records it). A declaration that names nothing known (the hub id of an
unregistered model) cannot be checked and passes.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

from adapters_registry.errors import ValidationError
from adapters_registry.fingerprint import BaseFacts, describe_base
from adapters_registry.manifest import BaseManifest, BaseMismatch

log = logging.getLogger(__name__)

# fingerprint parts, as a message names them -> the fields that make them up
PARTS: dict[str, tuple[str, ...]] = {
    "architecture": ("architecture",),
    "sizes": ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"),
    "config": ("config_hash",),
    "tokenizer": ("tokenizer_hash",),
    "chat template": ("chat_template_hash",),
    "weights": ("weights_hash",),
}


def declared(config: dict[str, Any]) -> str | None:
    value = config.get("base_model_name_or_path")
    return value.strip() if isinstance(value, str) and value.strip() else None


def differing(model: BaseFacts | BaseManifest, base: BaseManifest) -> list[str]:
    """The fingerprint parts in which `model` and `base` differ; a part either side lacks is not compared."""
    out = []
    for part, fields in PARTS.items():
        for name in fields:
            mine, theirs = getattr(model, name), getattr(base, name)
            if mine is not None and theirs is not None and mine != theirs:
                out.append(part)
                break
    return out


def _last(text: str) -> str:
    return PurePosixPath(text.rstrip("/")).name or text


def named_by_path(declaration: str, bases: list[BaseManifest]) -> list[str]:
    where = Path(declaration).expanduser()
    if not where.is_absolute() and not where.exists():
        return []  # a hub id or a name, not a path
    resolved = str(where.resolve())
    return [b.name for b in bases if b.path is not None and b.path == resolved]


def named_by_name(declaration: str, bases: list[BaseManifest]) -> list[str]:
    tokens = {declaration.rstrip("/").casefold(), _last(declaration).casefold()}
    names = []
    for b in bases:
        keys = {b.name.casefold(), *([_last(b.path).casefold()] if b.path else [])}
        if tokens & keys:
            names.append(b.name)
    return names


def _by_fingerprint(directory: Path, bound: BaseManifest, bases: list[BaseManifest]) -> BaseMismatch | None:
    light = describe_base(directory, hash_weights=False)
    matches = [b for b in bases if not differing(light, b)]
    facts = light
    if bound in matches and bound.weights_hash is not None:
        log.info("%s: hashing its weights to tell it from base %s", directory, bound.name)
        facts = describe_base(directory)
        matches = [b for b in matches if not differing(facts, b)]
    if bound in matches:
        return None
    return BaseMismatch(
        declared=str(directory),
        evidence="fingerprint",
        names=[b.name for b in matches],
        differs=differing(facts, bound),
    )


def declared_base_mismatch(
    config: dict[str, Any], bound: BaseManifest, bases: list[BaseManifest]
) -> BaseMismatch | None:
    """The mismatch between the base the adapter declares and `bound`, or None when they agree or it cannot tell."""
    declaration = declared(config)
    if declaration is None:
        return None
    if names := named_by_path(declaration, bases):
        return None if bound.name in names else BaseMismatch(declared=declaration, evidence="path", names=names)
    directory = Path(declaration).expanduser()
    if (directory / "config.json").is_file():
        try:
            found = _by_fingerprint(directory, bound, bases)
        except ValidationError as exc:  # not a model directory after all: fall back to its name
            log.info("%s: cannot fingerprint it (%s); comparing names only", directory, exc)
        else:
            return None if found is None else found.model_copy(update={"declared": declaration})
    names = named_by_name(declaration, bases)
    if not names:
        log.info("base_model_name_or_path %r names no registered base; cannot check it", declaration)
        return None
    return None if bound.name in names else BaseMismatch(declared=declaration, evidence="name", names=names)


def describe_mismatch(mismatch: BaseMismatch, bound: str) -> str:
    """The refusal's one line (without the file prefix)."""
    quoted = ", ".join(repr(n) for n in mismatch.names)
    plural = "s" if len(mismatch.names) > 1 else ""
    differs = f" ({', '.join(mismatch.differs)} differ from base {bound!r})" if mismatch.differs else ""
    if mismatch.evidence == "fingerprint" and not mismatch.names:
        what = f"is a model directory that is not base {bound!r}{differs}"
        fix = f"register it (loragate registry base add {mismatch.declared} --name NAME) and push with --base NAME"
    else:
        if mismatch.evidence == "fingerprint":
            what = f"is a model directory with the fingerprint of base{plural} {quoted}{differs}"
        else:
            what = f"names base{plural} {quoted} (by its {mismatch.evidence})"
        fix = f"push with --base {mismatch.names[0]}"
    return (
        f"base_model_name_or_path {mismatch.declared!r} {what}, but the push binds the adapter to base {bound!r} "
        f"(same shapes, another model): {fix}, or pass --allow-base-mismatch to accept it (recorded in the manifest)"
    )
