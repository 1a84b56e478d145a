"""Audit log: every registry, alias, key and admin action as one JSON line (who, what, when, result).

Each event goes to the ``loragate.audit`` logger, to an optional append-only file, and to the registry's object
store under ``audit/<day>/<time>-<random>.json`` (one immutable object per event, so replicas never overwrite each
other). A failing sink is logged as a warning and never fails the action being audited. Events carry names, refs
and key ids only, never request bodies or key secrets.

Stdlib and the store interface only, so the CLIs can import it cheaply.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters_registry.store import ObjectStore

logger = logging.getLogger(__name__)
AUDIT_LOGGER = "loragate.audit"
AUDIT_PREFIX = "audit/"
# Who the current request acts for (set by the gateway's security middleware); registry writes made while serving
# it are attributed to that key. Copied into `asyncio.to_thread` workers like every context variable.
CURRENT_ACTOR: ContextVar[str | None] = ContextVar("loragate_audit_actor", default=None)


@dataclass(frozen=True)
class AuditEvent:
    who: str
    action: str
    target: str | None
    result: str
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    error: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_line(self) -> str:
        return json.dumps(
            {
                "at": self.at.isoformat(),
                "who": self.who,
                "action": self.action,
                "target": self.target,
                "result": self.result,
                "error": self.error,
                "details": dict(self.details),
            },
            sort_keys=True,
            default=str,
        )


def cli_actor() -> str:
    """Who runs a CLI command: ``cli:<user>@<host>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


class AuditLog:
    def __init__(self, *, store: ObjectStore | None = None, path: Path | None = None) -> None:
        self._store = store
        self._path = path
        self._lock = threading.Lock()
        self._events = logging.getLogger(AUDIT_LOGGER)

    @classmethod
    def for_cli(cls, store: ObjectStore | None) -> AuditLog:
        """The audit log a CLI command writes: the store, plus ``$LORAGATE_AUDIT_FILE`` when set."""
        path = os.environ.get("LORAGATE_AUDIT_FILE")
        return cls(store=store, path=Path(path) if path else None)

    def record(
        self,
        who: str,
        action: str,
        target: str | None,
        result: str,
        *,
        error: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        event = AuditEvent(who, action, target, result, error=error, details=details or {})
        line = event.to_line()
        self._events.info("%s", line)
        if self._path is not None:
            try:
                with self._lock, self._path.open("a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
            except OSError as exc:
                logger.warning("audit file %s not written: %s", self._path, exc)
        if self._store is not None:
            key = f"{AUDIT_PREFIX}{event.at:%Y-%m-%d}/{event.at:%H%M%S%f}-{secrets.token_hex(4)}.json"
            try:
                self._store.put_bytes(key, line.encode(), if_absent=True)
            except Exception as exc:  # any store failure: the audited action has already happened
                logger.warning("audit event not stored under %s: %s", key, exc)
        return event

    def registry_hook(self, who: str | None = None) -> Callable[[Mapping[str, Any]], None]:
        """A callable for the Registry's audit hook: one dict per registry write.

        Actor: the record's ``who``, else the request's key (`CURRENT_ACTOR`), else ``who``, else the CLI user.
        """
        actor = who or cli_actor()

        def hook(record: Mapping[str, Any]) -> None:
            self.record(
                str(record.get("who") or CURRENT_ACTOR.get() or actor),
                str(record.get("action", "registry.unknown")),
                record.get("target"),
                str(record.get("result", "ok")),
                error=record.get("error"),
                details=record.get("details") or {},
            )

        return hook

    def read(self, day: str | None = None) -> list[dict[str, Any]]:
        """Stored events (all, or of one ``YYYY-MM-DD`` day), oldest first."""
        if self._store is None:
            return []
        prefix = f"{AUDIT_PREFIX}{day}/" if day else AUDIT_PREFIX
        events = []
        for key in sorted(self._store.list_keys(prefix)):
            raw = self._store.get_bytes(key)
            if raw is not None:
                events.append(json.loads(raw))
        return sorted(events, key=lambda e: str(e["at"]))
