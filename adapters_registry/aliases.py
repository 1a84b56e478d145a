"""Aliases (`name:prod`): one record per alias holding its version and its whole history, moved by compare-and-swap
so that concurrent moves lose no update; and the pure decisions about that history (where a rollback goes, which
versions later rollbacks will reach).

Rollbacks pop promotes like a stack: promote 1, 2, 3 then rollback, rollback moves the alias to 2, then 1.
"""

from __future__ import annotations

import getpass
import logging
import os
from collections.abc import Callable
from typing import Literal

from adapters_registry.errors import ConflictError, NotFoundError
from adapters_registry.layout import alias_key, alias_name, aliases_prefix
from adapters_registry.manifest import AdapterManifest, AliasMove, AliasRecord, Tombstone, utc_now
from adapters_registry.naming import check_alias, check_name
from adapters_registry.store import ObjectStore
from adapters_registry.versions import read_version

log = logging.getLogger(__name__)

MAX_CAS_ATTEMPTS = 50

Resolve = Callable[[str], AdapterManifest]  # Registry.resolve
# Given the alias record (None: no such alias yet), the move to make and the version it goes to.
Pick = Callable[[AliasRecord | None], tuple[Literal["promote", "rollback"], AdapterManifest]]


# ---- reads -----------------------------------------------------------------------------------------------------------
def read_alias(store: ObjectStore, name: str, alias: str) -> tuple[AliasRecord, str] | None:
    """The alias record and its compare-and-swap token."""
    got = store.get_with_token(alias_key(name, alias))
    if got is None:
        return None
    return AliasRecord.model_validate_json(got[0]), got[1]


def aliases(store: ObjectStore, name: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for key in store.list_keys(aliases_prefix(check_name(name))):
        alias = alias_name(name, key)
        if (record := read_alias(store, name, alias)) is not None:
            out[alias] = record[0].version
    return out


def alias_history(store: ObjectStore, name: str, alias: str) -> list[AliasMove]:
    record = read_alias(store, check_name(name), check_alias(alias))
    return list(record[0].history) if record else []


def rollbacks_reaching(store: ObjectStore, manifest: AdapterManifest) -> dict[str, int]:
    """alias -> how many successive `rollback`s of it would reach `manifest` (aliases that never would: absent)."""
    out: dict[str, int] = {}
    for alias in aliases(store, manifest.name):
        chain = rollback_chain(alias_history(store, manifest.name, alias))
        if manifest.version in chain:
            out[alias] = chain.index(manifest.version) + 1
    return out


def check_removable(store: ObjectStore, manifest: AdapterManifest, *, force: bool) -> str:
    """Refuse removing a version an alias points at, or (unless `force`) one a later rollback would reach; the
    rollbacks a forced removal breaks, described ("" when none)."""
    pinned = sorted(a for a, v in aliases(store, manifest.name).items() if v == manifest.version)
    if pinned:
        raise ConflictError(
            f"{manifest.ref} is the target of alias {', '.join(pinned)}; promote another version there first"
        )
    reaching = rollbacks_reaching(store, manifest)
    if not reaching:
        return ""
    rollbacks = describe_rollbacks(manifest.name, reaching)
    if not force:
        raise ConflictError(
            f"{manifest.ref} is in the history of alias {', '.join(sorted(reaching))}: {rollbacks} would go "
            "back to it; removing it would break that rollback (--force removes it anyway)"
        )
    return rollbacks


# ---- moves -----------------------------------------------------------------------------------------------------------
def promote(store: ObjectStore, ref: str, alias: str, who: str | None, resolve: Resolve) -> AdapterManifest:
    check_alias(alias)
    target = resolve(ref)
    return move_alias(store, target.name, alias, who, lambda _record: ("promote", target))


def rollback(store: ObjectStore, name: str, alias: str, who: str | None, resolve: Resolve) -> AdapterManifest:
    check_name(name)
    check_alias(alias)

    def pick(record: AliasRecord | None) -> tuple[Literal["rollback"], AdapterManifest]:
        if record is None:
            raise NotFoundError(f"{name!r} has no alias {alias!r}")
        previous = rollback_target(record.history)
        if previous is None:
            raise ConflictError(f"{name}:{alias} has no earlier version to roll back to")
        gone = read_version(store, name, previous)
        if isinstance(gone, Tombstone):
            raise ConflictError(
                f"{name}:{alias} would roll back to {name}@{previous}, which was removed at {gone.removed_at}; "
                f"promote a version instead"
            )
        return "rollback", resolve(f"{name}@{previous}")

    return move_alias(store, name, alias, who, pick)


def move_alias(store: ObjectStore, name: str, alias: str, who: str | None, pick: Pick) -> AdapterManifest:
    """Compare-and-swap loop: read the record, `pick` the move, write it unless someone moved the alias meanwhile."""
    key = alias_key(name, alias)
    for _ in range(MAX_CAS_ATTEMPTS):
        current = read_alias(store, name, alias)
        record, token = current if current else (None, None)
        action, target = pick(record)
        move = AliasMove(
            action=action,
            who=_who(who),
            when=utc_now(),
            from_version=record.version if record else None,
            to_version=target.version,
        )
        history = [*(record.history if record else []), move]
        new = AliasRecord(name=name, alias=alias, version=target.version, history=history)
        if store.put_if_match(key, new.to_json(), token):
            log.info("%s:%s %s -> %s by %s", name, alias, move.from_version, target.version, move.who)
            return target
    raise ConflictError(f"{name}:{alias} is being moved by others; try again")


def _who(who: str | None) -> str:
    if who:
        return who
    try:
        return os.environ.get("LORAGATE_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ---- decisions on the history (pure) ---------------------------------------------------------------------------------
def rollback_target(history: list[AliasMove]) -> int | None:
    """The version before the newest promote not yet undone by a rollback (rollbacks pop promotes like a stack)."""
    undone = 0
    for move in reversed(history):
        if move.action == "rollback":
            undone += 1
        elif undone:
            undone -= 1
        else:
            return move.from_version
    return None


def rollback_chain(history: list[AliasMove]) -> list[int]:
    """The versions successive rollbacks would move the alias to, in order (the first rollback's target first)."""
    moves = list(history)
    chain: list[int] = []
    current = moves[-1].to_version if moves else None
    while (target := rollback_target(moves)) is not None:
        chain.append(target)
        moves.append(AliasMove(action="rollback", who="", when="", from_version=current, to_version=target))
        current = target
    return chain


def describe_rollbacks(name: str, reaching: dict[str, int]) -> str:
    """`{"prod": 1, "canary": 2}` -> "the next `loragate registry rollback NAME --alias prod` and the 2nd ..." """
    return " and ".join(
        f"{'the next' if n == 1 else f'the {_ordinal(n)}'} `loragate registry rollback {name} --alias {alias}`"
        for alias, n in sorted(reaching.items())
    )


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
