"""`loragate keys create|list|revoke` against a real local registry: the key is printed once, only a hash is stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters_registry.audit import AuditLog
from adapters_registry.registry import open_registry
from gateway.keys import AuthOutcome, KeyStore
from loragate.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = str(tmp_path / "reg")
    status, out, err = run(
        capsys, "keys", "create", "--registry", where, "--name", "acme", "--adapters", "acme*, support-bot",
        "--rpm", "60", "--max-concurrency", "2", "--expires", "2099-01-31",
    )  # fmt: skip
    assert status == 0
    secret = out.strip()
    assert secret.startswith("lg-") and "\n" not in secret
    assert "it is shown only now" in err
    store = open_registry(where).store
    keys = KeyStore(store, cache_ttl_s=0)
    outcome, record = keys.authenticate(secret)
    assert outcome is AuthOutcome.OK and record is not None
    assert (record.name, record.adapters, record.bases, record.rpm, record.max_concurrency, record.admin) == (
        "acme", ("acme*", "support-bot"), ("*",), 60, 2, False,
    )  # fmt: skip
    assert record.expires_at is not None and record.expires_at.isoformat() == "2099-02-01T00:00:00+00:00"
    for key in store.list_keys(""):
        assert secret.encode() not in (store.get_bytes(key) or b""), key

    status, out, _ = run(capsys, "keys", "create", "--registry", where, "--name", "ops", "--admin", "--bases", "tiny")
    assert status == 0
    status, out, _ = run(capsys, "keys", "list", "--registry", where)
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        f"{record.key_id}  acme  active  adapters=acme*,support-bot  bases=*  expires=2099-02-01"
    )
    assert lines[0].endswith("rpm=60 conc=2")
    assert "  ops  active  admin  adapters=*  bases=tiny  expires=never" in lines[1]
    assert secret not in out

    status, out, _ = run(capsys, "keys", "revoke", "--registry", where, "acme")
    assert (status, out) == (0, f"revoked {record.key_id} (acme)\n")
    assert keys.authenticate(secret) == (AuthOutcome.REVOKED, None)
    status, out, _ = run(capsys, "keys", "list", "--registry", where, "--json")
    listed = json.loads(out)  # one JSON document, like every other --json
    assert [(k["name"], k["revoked"]) for k in listed] == [("acme", True), ("ops", False)]
    assert all("key_hash" not in k for k in listed)

    actions = [(e["action"], e["result"]) for e in AuditLog(store=store).read()]
    assert actions == [("keys.create", "ok"), ("keys.create", "ok"), ("keys.revoke", "ok")]
    assert AuditLog(store=store).read()[0]["who"].startswith("cli:")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--name", "x", "--rpm", "0"], "error: --rpm 0: must be at least 1"),
        (["--name", "x", "--expires", "2001-01-01"], "error: --expires '2001-01-01': that moment has already passed"),
        (
            ["--name", "x", "--expires", "soon"],
            "error: --expires 'soon': expected an ISO date (2027-01-31) or datetime",
        ),
        (["--name", "bad name"], "error: key name 'bad name': use 1-64 letters, digits, '.', '_', '-', '@'"),
    ],
)
def test_create_refuses_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    where = str(tmp_path / "reg")
    status, out, err = run(capsys, "keys", "create", "--registry", where, *argv)
    assert (status, out, err) == (2, "", message + "\n")
    assert KeyStore(open_registry(where).store).list() == []
    assert [e["result"] for e in AuditLog(store=open_registry(where).store).read()] == ["error"]


def test_revoke_unknown_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "keys", "revoke", "--registry", str(tmp_path / "reg"), "nobody")
    assert (status, out, err) == (2, "", "error: no key with id or name 'nobody'\n")


def test_commands_print_what_was_asked_and_log_only_with_v(tmp_path: Path) -> None:
    """No INFO lines or audit JSON on stderr from a command whose output is its answer; -v brings them back."""
    import subprocess
    import sys

    where = str(tmp_path / "reg")
    argv = [
        sys.executable,
        "-c",
        "from loragate.cli import main; raise SystemExit(main())",
        "keys",
        "create",
        "--registry",
        where,
        "--name",
        "quiet",
    ]
    quiet = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert quiet.stderr.startswith("created key") and "INFO" not in quiet.stderr and '"action"' not in quiet.stderr
    argv = [
        sys.executable,
        "-c",
        "from loragate.cli import main; raise SystemExit(main())",
        "-v",
        "keys",
        "create",
        "--registry",
        where,
        "--name",
        "loud",
    ]
    loud = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert "INFO loragate.audit" in loud.stderr
