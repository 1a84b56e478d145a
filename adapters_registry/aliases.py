"""Pure decisions about alias history: where a rollback goes, and which versions later rollbacks will reach."""

from __future__ import annotations

from adapters_registry.manifest import AliasMove


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
