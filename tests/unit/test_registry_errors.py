"""Registries that cannot be written or do not exist: one line, a non-zero exit, and nothing written or created.

Read-only is real here: the CLI runs in a process that sees the registry on a read-only bind mount (what a
Kubernetes `readOnly` volume or an `ro` NFS export is), so every write fails in the kernel with EROFS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters_registry.errors import NotFoundError, StorageError
from adapters_registry.registry import Registry, open_registry
from loragate.cli import main
from tests.fixtures.registry import run_read_only


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and modification time: any write changes it."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def populated(registry: Registry, adapter_dirs: list[Path]) -> Registry:
    """support@1 (alias prod) and support@2, support@1 already materialized into the registry's own cache."""
    registry.push(adapter_dirs[0], "support", "tiny")
    registry.push(adapter_dirs[1], "support", "tiny")
    registry.promote("support@1", "prod")
    registry.materialize(registry.resolve("support@1"))
    return registry


READ_ONLY = "Read-only file system"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["push", "{a0}", "--name", "other", "--base", "tiny"], "cannot write to the registry at {root}: {ro}"),
        (["promote", "support@2", "--alias", "prod"], "cannot write to the registry at {root}: {ro}"),
        (["rollback", "support", "--alias", "prod"], "cannot write to the registry at {root}: {ro}"),
        (["rm", "support@2"], "cannot write to the registry at {root}: {ro}"),
        (["gc", "--min-age", "0"], "cannot write to the registry at {root}: {ro}"),
        (["base", "add", "{tiny}", "--name", "tiny2"], "cannot write to the registry at {root}: {ro}"),
        (
            ["materialize", "support@2"],
            "cannot write the local cache at {root}/.cache: {ro}; set LORAGATE_REGISTRY_CACHE to a writable folder",
        ),
    ],
    ids=["push", "promote", "rollback", "rm", "gc", "base-add", "materialize"],
)
def test_writes_to_a_read_only_registry_fail_with_one_line(
    populated: Registry, adapter_dirs: list[Path], tiny_model: Path, argv: list[str], message: str
) -> None:
    root = Path(populated.location)
    before = _tree(root)
    args = [a.format(a0=adapter_dirs[0], tiny=tiny_model) for a in argv]
    done = run_read_only(root, *args, "--registry", str(root))
    assert "Traceback" not in done.stderr
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines()[-1] == "error: " + message.format(root=root, ro=READ_ONLY)
    assert _tree(root) == before


def test_reads_of_a_read_only_registry_work(populated: Registry, tmp_path: Path) -> None:
    root = Path(populated.location)
    before = _tree(root)
    listed = run_read_only(root, "list", "--json", "--registry", str(root))
    assert (listed.returncode, listed.stderr) == (0, "")
    assert [(m["ref"], m["aliases"]) for m in json.loads(listed.stdout)] == [("support@1", ["prod"]), ("support@2", [])]
    cached = run_read_only(root, "materialize", "support:prod", "--registry", str(root))  # already in its cache
    assert (cached.returncode, cached.stdout) == (0, f"{populated.materialized_path(populated.resolve('support@1'))}\n")
    elsewhere = tmp_path / "writable-cache"
    fresh = run_read_only(
        root, "materialize", "support@2", "--registry", str(root), env={"LORAGATE_REGISTRY_CACHE": str(elsewhere)}
    )
    two = populated.resolve("support@2")
    assert (fresh.returncode, fresh.stdout) == (0, f"{elsewhere / 'adapters' / two.digest_hex}\n")
    assert sorted(p.name for p in (elsewhere / "adapters" / two.digest_hex).iterdir()) == sorted(two.files)
    assert run_read_only(root, "verify", "--registry", str(root)).returncode == 0
    assert _tree(root) == before


MISSING = (
    "error: no registry at {where}: the directory does not exist (check --registry or $LORAGATE_REGISTRY; "
    "`loragate registry base add` creates a registry)\n"
)


@pytest.mark.parametrize(
    "argv",
    [
        ["list"],
        ["list", "support", "--json"],
        ["show", "support"],
        ["aliases", "support"],
        ["materialize", "support@1"],
        ["verify"],
        ["gc", "--dry-run"],
        ["gc"],
        ["base", "list"],
        ["base", "show", "tiny"],
        ["push", "{a0}", "--name", "support", "--base", "tiny"],
        ["promote", "support@1", "--alias", "prod"],
        ["rollback", "support", "--alias", "prod"],
        ["rm", "support@1"],
    ],
    ids=lambda argv: "-".join(a for a in argv if not a.startswith("{")),
)
def test_a_missing_registry_is_an_error_and_nothing_is_created(
    tmp_path: Path, adapter_dirs: list[Path], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    where = tmp_path / "nonexistent" / "reg"  # like /nonexistent/reg: not even the parent exists
    args = [a.format(a0=adapter_dirs[0]) for a in argv]
    assert _run(capsys, *args, "--registry", str(where)) == (2, "", MISSING.format(where=where))
    assert not (tmp_path / "nonexistent").exists()


def test_the_environment_location_is_checked_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    where = tmp_path / "typo"
    monkeypatch.setenv("LORAGATE_REGISTRY", str(where))
    assert _run(capsys, "list") == (2, "", MISSING.format(where=where))
    assert not where.exists()


def test_base_add_creates_a_registry(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = tmp_path / "new" / "reg"
    code, out, _ = _run(capsys, "base", "add", str(tiny_model), "--name", "tiny", "--registry", str(where))
    assert (code, out) == (0, f"tiny {open_registry(where).get_base('tiny').fingerprint}\n")
    assert _run(capsys, "list", "--json", "--registry", str(where)) == (0, "[]\n", "")


def test_opening_a_registry_creates_nothing(tmp_path: Path) -> None:
    where = tmp_path / "nonexistent" / "reg"
    reg = open_registry(where)
    assert (reg.list_adapters(), reg.list_bases(), reg.store.probe()) == ([], [], False)
    with pytest.raises(NotFoundError) as info:
        open_registry(where, must_exist=True)
    assert str(info.value) == MISSING.format(where=where).removeprefix("error: ").removesuffix("\n")
    assert not (tmp_path / "nonexistent").exists()


def test_a_missing_s3_registry_is_an_error(s3_registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = s3_registry.location.removeprefix("s3://").split("/")[0]
    typo = f"s3://{bucket}/loragat"
    assert _run(capsys, "list", "--registry", typo) == (
        2,
        "",
        f"error: no registry at {typo}: nothing is stored under that prefix (check --registry or $LORAGATE_REGISTRY; "
        "`loragate registry base add` creates a registry)\n",
    )
    code, out, err = _run(capsys, "list", "--registry", "s3://no-such-bucket-here/loragate")
    assert (code, out, len(err.splitlines())) == (2, "", 1)
    assert err.startswith("error: s3://no-such-bucket-here/loragate/: NoSuchBucket: ")
    assert _run(capsys, "list", "--json", "--registry", s3_registry.location) == (0, "[]\n", "")


def test_an_unreachable_s3_registry_is_one_line(
    registry_template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.engine_process import free_port

    monkeypatch.setenv("LORAGATE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    code, out, err = _run(capsys, "list", "--registry", "s3://bucket/loragate")
    assert (code, out, len(err.splitlines())) == (2, "", 1)
    assert err.startswith("error: s3://bucket/loragate/: Could not connect to the endpoint URL: ")
    with pytest.raises(StorageError):
        open_registry("s3://bucket/loragate").list_adapters()
