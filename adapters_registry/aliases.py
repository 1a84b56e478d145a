"""Pure decisions about alias history: where a rollback goes."""

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
