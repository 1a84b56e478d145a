"""Audit log: one JSON line per action to the logger, a file and the store; a broken sink never fails the action."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from adapters_registry.audit import CURRENT_ACTOR, AuditLog, cli_actor
from adapters_registry.local import LocalStore


def test_record_goes_to_logger_file_and_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = LocalStore(tmp_path / "store")
    log = AuditLog(store=store, path=tmp_path / "audit.jsonl")
    with caplog.at_level(logging.INFO, logger="loragate.audit"):
        first = log.record("key:abc:ops", "registry.promote", "acme@3", "ok", details={"alias": "prod"})
        log.record("cli:me@host", "keys.revoke", "nobody", "error", error="no key with id or name 'nobody'")
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 2
    event = json.loads(lines[0])
    assert event == {
        "at": first.at.isoformat(),
        "who": "key:abc:ops",
        "action": "registry.promote",
        "target": "acme@3",
        "result": "ok",
        "error": None,
        "details": {"alias": "prod"},
    }
    assert [r.getMessage() for r in caplog.records if r.name == "loragate.audit"] == lines
    stored = log.read()
    assert [e["action"] for e in stored] == ["registry.promote", "keys.revoke"]
    assert stored[1]["error"] == "no key with id or name 'nobody'"
    assert log.read(day=first.at.strftime("%Y-%m-%d")) == stored
    assert log.read(day="1999-01-01") == []


def test_broken_sinks_are_warned_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class BrokenStore(LocalStore):
        def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
            raise OSError("disk full")

    log = AuditLog(store=BrokenStore(tmp_path / "s"), path=tmp_path / "missing-dir" / "audit.jsonl")
    with caplog.at_level(logging.WARNING, logger="adapters_registry.audit"):
        event = log.record("local", "admin.POST /admin/x", None, "ok")
    assert event.result == "ok"
    warnings = [r.getMessage() for r in caplog.records if r.name == "adapters_registry.audit"]
    assert len(warnings) == 2
    assert "audit file" in warnings[0] and "audit event not stored" in warnings[1] and "disk full" in warnings[1]


def test_registry_hook_maps_the_registry_dict(tmp_path: Path) -> None:
    log = AuditLog(store=LocalStore(tmp_path))
    hook = log.registry_hook("gateway")
    hook({"action": "registry.push", "target": "acme@1", "result": "ok", "who": None, "error": None, "details": {}})
    hook({"action": "registry.remove", "target": "acme@1", "result": "error", "who": "ops", "error": "in use"})
    token = CURRENT_ACTOR.set("key:abc:acme")
    try:
        hook({"action": "registry.promote", "target": "acme@1 -> :prod", "result": "ok", "who": None})
    finally:
        CURRENT_ACTOR.reset(token)
    events = log.read()
    assert [(e["who"], e["action"], e["result"], e["error"]) for e in events] == [
        ("gateway", "registry.push", "ok", None),
        ("ops", "registry.remove", "error", "in use"),
        ("key:abc:acme", "registry.promote", "ok", None),
    ]


def test_cli_actor_and_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli_actor().startswith("cli:") and "@" in cli_actor()
    monkeypatch.setenv("LORAGATE_AUDIT_FILE", str(tmp_path / "a.jsonl"))
    AuditLog.for_cli(None).record("me", "keys.list", None, "ok")
    assert json.loads((tmp_path / "a.jsonl").read_text())["action"] == "keys.list"
