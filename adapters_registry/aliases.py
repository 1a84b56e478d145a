"""Aliases (`name:prod`): one record per alias holding its version, its rollout if one is in progress, and its whole
history, moved by compare-and-swap so that concurrent moves lose no update; and the pure decisions about that
history (where a rollback goes, which versions later rollbacks will reach) and about a rollout's split.

A rollout: `promote support@4 --alias prod --weight 10` keeps `prod` on its version and sends 10% of its requests
to `support@4` (the record's `split`); `--weight 100` (or no weight) makes 4 the version; `--weight 0` stops the
rollout. Which requests go where is decided by `Resolution.pick` from a hash of the alias and a split key, so every
gateway replica splits the same callers the same way without talking to the others.

A rollout may carry a policy (`--max-error-ratio 0.02 --min-contract-validity 0.99 --window 300 ...`, a
`RolloutPolicy`): each gateway judges the candidate against it from what it served and, on a breach, stops the
rollout (`stop_rollout`: weight 0, by compare-and-swap, so of several replicas one writes and the others find it
done). `--shadow support@5 --shadow-percent 5` sends a copy of 5% of the alias's requests to support@5 as well
(the record's `shadow`), whose answers the gateway compares with the caller's and throws away.

Rollbacks pop moves like a stack, each restoring the state before it: promote 1, 2, 3 then rollback, rollback moves
the alias to 2, then 1; a rollback after `--weight 10` stops that rollout, after `--weight 100` restores the split.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from adapters_registry.errors import ConflictError, NotFoundError, ValidationError
from adapters_registry.layout import alias_key, alias_name, aliases_prefix
from adapters_registry.manifest import (
    AdapterManifest,
    AliasMove,
    AliasRecord,
    AliasShadow,
    AliasSplit,
    ParityGate,
    RolloutPolicy,
    Tombstone,
    utc_now,
)
from adapters_registry.naming import check_alias, check_name
from adapters_registry.store import ObjectStore
from adapters_registry.versions import read_version

log = logging.getLogger(__name__)

MAX_CAS_ATTEMPTS = 50

Resolve = Callable[[str], AdapterManifest]  # Registry.resolve
Action = Literal["promote", "rollback"]


@dataclass(frozen=True)
class Move:
    """What a move makes of an alias: the version it points at after it, its rollout, its shadow and its parity
    thresholds then."""

    action: Action
    target: AdapterManifest
    split: AliasSplit | None = None
    shadow: AliasShadow | None = None
    gate: ParityGate | None = None


# Given the alias record (None: no such alias yet): the move to make (`AlreadyDone`: none is needed).
Pick = Callable[[AliasRecord | None], Move]


class AlreadyDone(Exception):
    """A pick found the alias already where the move would take it (another replica moved it first)."""


@dataclass(frozen=True)
class Resolution:
    """What a reference serves: one version, or, while its alias rolls out another, both, split by `weight`."""

    ref: str
    current: AdapterManifest
    candidate: AdapterManifest | None = None
    weight: int = 0  # percent of the requests the candidate gets
    policy: RolloutPolicy | None = None  # when a gateway stops the rollout by itself
    shadow: AdapterManifest | None = None  # gets a copy of `shadow_percent` percent of the requests
    shadow_percent: int = 0

    def pick(self, split_key: str) -> AdapterManifest:
        """The version that serves a request with this split key (the same key always gets the same one)."""
        if self.candidate is None or self.weight <= 0:
            return self.current
        return self.candidate if split_bucket(self.ref, split_key) < self.weight else self.current

    def versions(self) -> set[int]:
        """The versions the reference serves now: its own, the candidate's, the shadow's."""
        return {m.version for m in (self.current, self.candidate, self.shadow) if m is not None}

    def shadows(self, request_id: str) -> AdapterManifest | None:
        """The version a copy of this request goes to (None: no copy), drawn per request, not per caller."""
        if self.shadow is None or split_bucket(f"{self.ref}\x00shadow", request_id) >= self.shadow_percent:
            return None
        return self.shadow


def split_bucket(ref: str, split_key: str) -> int:
    """0-99, uniform over keys and independent between aliases: a candidate of weight w gets the keys below w."""
    digest = hashlib.sha256(f"{ref}\x00{split_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


# ---- reads -----------------------------------------------------------------------------------------------------------
def read_alias(store: ObjectStore, name: str, alias: str) -> tuple[AliasRecord, str] | None:
    """The alias record and its compare-and-swap token."""
    got = store.get_with_token(alias_key(name, alias))
    if got is None:
        return None
    return AliasRecord.model_validate_json(got[0]), got[1]


def aliases(store: ObjectStore, name: str) -> dict[str, int]:
    return {alias: record.version for alias, record in alias_records(store, name).items()}


def alias_records(store: ObjectStore, name: str) -> dict[str, AliasRecord]:
    out: dict[str, AliasRecord] = {}
    for key in store.list_keys(aliases_prefix(check_name(name))):
        alias = alias_name(name, key)
        if (record := read_alias(store, name, alias)) is not None:
            out[alias] = record[0]
    return out


def alias_history(store: ObjectStore, name: str, alias: str) -> list[AliasMove]:
    record = read_alias(store, check_name(name), check_alias(alias))
    return list(record[0].history) if record else []


def rollbacks_reaching(store: ObjectStore, manifest: AdapterManifest) -> dict[str, int]:
    """alias -> how many successive `rollback`s of it would reach `manifest` (aliases that never would: absent)."""
    out: dict[str, int] = {}
    for alias, record in alias_records(store, manifest.name).items():
        for n, (version, split) in enumerate(rollback_states(record.history), start=1):
            if manifest.version in (version, split.version if split else None):
                out[alias] = n
                break
    return out


def check_removable(store: ObjectStore, manifest: AdapterManifest, *, force: bool) -> str:
    """Refuse removing a version an alias points at, or (unless `force`) one a later rollback would reach; the
    rollbacks a forced removal breaks, described ("" when none)."""
    records = alias_records(store, manifest.name)
    pinned = sorted(a for a, record in records.items() if manifest.version in record.versions())
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
def promote(
    store: ObjectStore,
    ref: str,
    alias: str,
    who: str | None,
    resolve: Resolve,
    weight: int | None = None,
    *,
    policy: RolloutPolicy | None = None,
    shadow: tuple[str, int] | None = None,
    gate: ParityGate | None = None,
) -> tuple[AdapterManifest, AliasRecord]:
    """Point `alias` at the version `ref` names (`weight` None or 100), or give it `weight` percent of the alias's
    requests beside the alias's version (1-99, watched by `policy` if given; a later weight keeps the policy), or
    stop its rollout (0). `shadow` (ref, percent) sends a copy of that share of the alias's requests to ref (percent
    0: stop); without it a shadow stays, unless it would shadow the alias's own version. `gate` sets the alias's
    parity thresholds (kept by later moves without one). The target and the alias's new record."""
    check_alias(alias)
    if weight is not None and not 0 <= weight <= 100:
        raise ValidationError(f"a weight is a percentage of the alias's requests, 0-100, not {weight}")
    if gate is not None:
        check_gate(gate)
    if policy is not None:
        check_policy(policy)
        if weight is None or not 1 <= weight <= 99:
            raise ValidationError("a rollout policy watches a candidate: it needs a weight of 1-99")
    target = resolve(ref)
    name = target.name
    shadowed = _shadow(name, shadow, resolve)

    def pick(record: AliasRecord | None) -> Move:
        new_shadow = record.shadow if record is not None and shadow is None else shadowed
        new_gate = gate if gate is not None or record is None else record.gate
        if weight is None or weight == 100:
            split = None
            if shadow is not None and record is not None and target.version == record.version:
                split = record.split  # re-promoting the version to set a shadow leaves its rollout alone
            return Move("promote", target, split, _unless_own(new_shadow, target.version), new_gate)
        if record is None:
            raise ConflictError(f"{name}:{alias} does not exist yet: promote a version to it without --weight first")
        if target.version == record.version:
            raise ConflictError(f"{target.ref} is already {name}:{alias}; a weight is for another version")
        split = record.split
        if split is not None and split.version != target.version:
            raise ConflictError(
                f"{name}:{alias} is rolling out {name}@{split.version} ({split.weight}%); complete it (--weight 100) "
                "or roll it back first"
            )
        if weight == 0 and split is None:
            raise ConflictError(f"{name}:{alias} has no rollout of {target.ref} to stop")
        current = resolve(f"{name}@{record.version}")
        kept = policy if policy is not None else (split.policy if split is not None else None)
        new_split = AliasSplit(version=target.version, weight=weight, policy=kept) if weight else None
        return Move("promote", current, new_split, _unless_own(new_shadow, record.version), new_gate)

    return target, move_alias(store, name, alias, who, pick)


def check_policy(policy: RolloutPolicy) -> None:
    """Refuse a policy that could never be judged or could never hold, with one line."""
    fractions = (("max error ratio", policy.max_error_ratio), ("min contract validity", policy.min_contract_validity))
    for field, value in fractions:
        if value is not None and not 0 <= value <= 1:
            raise ValidationError(f"a rollout policy's {field} is a fraction, 0-1, not {value:g}")
    if policy.max_ttft_ratio is not None and policy.max_ttft_ratio <= 0:
        raise ValidationError(f"a rollout policy's max TTFT ratio must be above 0, not {policy.max_ttft_ratio:g}")
    if policy.window_s <= 0:
        raise ValidationError(f"a rollout policy's window must be above 0 seconds, not {policy.window_s:g}")
    if policy.min_requests < 1:
        raise ValidationError(f"a rollout policy judges after at least 1 request, not {policy.min_requests}")
    if (policy.max_error_ratio, policy.max_ttft_ratio, policy.min_contract_validity) == (None, None, None):
        raise ValidationError(
            "a rollout policy needs a rule: a max error ratio, a max p99 TTFT ratio or a min contract validity"
        )


def check_gate(gate: ParityGate) -> None:
    """Refuse parity thresholds that are not fractions, with one line."""
    fields = (
        ("min agreement", gate.min_agreement),
        ("max agreement drop", gate.max_agreement_drop),
        ("min contract validity", gate.min_contract_validity),
    )
    for field, value in fields:
        if value is not None and not 0 <= value <= 1:
            raise ValidationError(f"a parity gate's {field} is a fraction, 0-1, not {value:g}")


def _shadow(name: str, shadow: tuple[str, int] | None, resolve: Resolve) -> AliasShadow | None:
    if shadow is None or shadow[1] == 0:
        return None
    ref, percent = shadow
    if not 1 <= percent <= 100:
        raise ValidationError(f"a shadow percent is a share of the alias's requests, 0-100, not {percent}")
    version = resolve(ref)
    if version.name != name:
        raise ValidationError(f"a shadow of a {name} alias must be a version of {name}, not {version.ref}")
    return AliasShadow(version=version.version, percent=percent)


def _unless_own(shadow: AliasShadow | None, version: int) -> AliasShadow | None:
    """No shadow of the alias's own version (after completing the rollout of a version it shadowed)."""
    return None if shadow is None or shadow.version == version else shadow


def stop_rollout(
    store: ObjectStore, name: str, alias: str, version: int, who: str | None, reason: str
) -> AliasRecord | None:
    """Set the rollout of `name@version` on the alias to weight 0 (a gateway's policy found it broken, `reason`
    says how); None when the alias no longer rolls that version out (another replica, or a person, moved it)."""

    def pick(record: AliasRecord | None) -> Move:
        if record is None or record.split is None or record.split.version != version:
            raise AlreadyDone
        found = read_version(store, name, record.version)
        if not isinstance(found, AdapterManifest):
            raise ConflictError(f"{name}:{alias} points at {name}@{record.version}, which is gone")
        return Move("promote", found, None, record.shadow, record.gate)

    try:
        return move_alias(store, name, alias, who, pick, reason=reason)
    except AlreadyDone:
        return None


def rollback(
    store: ObjectStore, name: str, alias: str, who: str | None, resolve: Resolve
) -> tuple[AdapterManifest, AliasRecord]:
    """Restore the alias's state before its last move not yet undone: its version, and its rollout if it had one."""
    check_name(name)
    check_alias(alias)

    def pick(record: AliasRecord | None) -> Move:
        if record is None:
            raise NotFoundError(f"{name!r} has no alias {alias!r}")
        undone = move_to_undo(record.history)
        if undone is None or undone.from_version is None:
            raise ConflictError(f"{name}:{alias} has no earlier version to roll back to")
        split = undone.from_split
        shadow = undone.from_shadow
        back = [undone.from_version] + ([split.version] if split else []) + ([shadow.version] if shadow else [])
        for version in back:
            gone = read_version(store, name, version)
            if isinstance(gone, Tombstone):
                raise ConflictError(
                    f"{name}:{alias} would roll back to {name}@{version}, which was removed at {gone.removed_at}; "
                    f"promote a version instead"
                )
        return Move("rollback", resolve(f"{name}@{undone.from_version}"), split, shadow, record.gate)

    record = move_alias(store, name, alias, who, pick)
    return resolve(f"{name}@{record.version}"), record


def move_alias(
    store: ObjectStore, name: str, alias: str, who: str | None, pick: Pick, *, reason: str | None = None
) -> AliasRecord:
    """Compare-and-swap loop: read the record, `pick` the move, write it unless someone moved the alias meanwhile."""
    key = alias_key(name, alias)
    for _ in range(MAX_CAS_ATTEMPTS):
        current = read_alias(store, name, alias)
        record, token = current if current else (None, None)
        chosen = pick(record)
        move = AliasMove(
            action=chosen.action,
            who=_who(who),
            when=utc_now(),
            from_version=record.version if record else None,
            to_version=chosen.target.version,
            from_split=record.split if record else None,
            to_split=chosen.split,
            from_shadow=record.shadow if record else None,
            to_shadow=chosen.shadow,
            reason=reason,
        )
        history = [*(record.history if record else []), move]
        new = AliasRecord(
            name=name,
            alias=alias,
            version=chosen.target.version,
            split=chosen.split,
            shadow=chosen.shadow,
            gate=chosen.gate,
            history=history,
        )
        if store.put_if_match(key, new.to_json(), token):
            log.info("%s:%s %s -> %s by %s", name, alias, describe_state(record), describe_state(new), move.who)
            return new
    raise ConflictError(f"{name}:{alias} is being moved by others; try again")


def describe_state(record: AliasRecord | None) -> str:
    """`support@3`, or `support@3 (90%), support@4 (10%)` while a rollout is in progress, then `; shadow support@5
    (5%)` while one is shadowed; `nothing` for no record."""
    if record is None:
        return "nothing"
    shadow = f"; shadow {record.name}@{record.shadow.version} ({record.shadow.percent}%)" if record.shadow else ""
    if record.split is None:
        return f"{record.name}@{record.version}{shadow}"
    weight = record.split.weight
    return f"{record.name}@{record.version} ({100 - weight}%), {record.name}@{record.split.version} ({weight}%){shadow}"


def _who(who: str | None) -> str:
    if who:
        return who
    try:
        return os.environ.get("LORAGATE_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ---- decisions on the history (pure) ---------------------------------------------------------------------------------
def move_to_undo(history: list[AliasMove]) -> AliasMove | None:
    """The newest promote not yet undone by a rollback (rollbacks pop promotes like a stack)."""
    undone = 0
    for move in reversed(history):
        if move.action == "rollback":
            undone += 1
        elif undone:
            undone -= 1
        else:
            return move
    return None


def rollback_target(history: list[AliasMove]) -> int | None:
    """The version the next rollback moves the alias to."""
    move = move_to_undo(history)
    return move.from_version if move else None


def rollback_states(history: list[AliasMove]) -> list[tuple[int, AliasSplit | None]]:
    """The states (version, rollout) successive rollbacks would restore, in order (the first rollback's first)."""
    moves = list(history)
    states: list[tuple[int, AliasSplit | None]] = []
    current = moves[-1].to_version if moves else None
    while (undone := move_to_undo(moves)) is not None and undone.from_version is not None:
        states.append((undone.from_version, undone.from_split))
        moves.append(
            AliasMove(action="rollback", who="", when="", from_version=current, to_version=undone.from_version)
        )
        current = undone.from_version
    return states


def rollback_chain(history: list[AliasMove]) -> list[int]:
    """The versions successive rollbacks would move the alias to, in order (the first rollback's target first)."""
    return [version for version, _ in rollback_states(history)]


def describe_rollbacks(name: str, reaching: dict[str, int]) -> str:
    """`{"prod": 1, "canary": 2}` -> "the next `loragate registry rollback NAME --alias prod` and the 2nd ..." """
    return " and ".join(
        f"{'the next' if n == 1 else f'the {_ordinal(n)}'} `loragate registry rollback {name} --alias {alias}`"
        for alias, n in sorted(reaching.items())
    )


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
