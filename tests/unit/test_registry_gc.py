"""`gc`: orphaned blobs deleted once old enough, live and shared ones kept, pushes in flight safe; local and S3."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from adapters_registry.cli import parse_duration
from adapters_registry.gc import GcPlan, collect_garbage, plan_gc
from adapters_registry.layout import blob_key
from adapters_registry.registry import Registry, open_registry
from adapters_registry.s3 import S3Store
from adapters_registry.store import ObjectStat
from adapters_registry.verify import verify_registry
from loragate.cli import main
from tests.unit.test_registry import _sha, _variant
from tests.unit.test_registry_concurrency import PAUSED_PUSH, _spawn

HOUR = 3600.0
A, B, C = (blob_key(c * 64) for c in "abc")


@pytest.mark.parametrize(
    ("stats", "referenced", "min_age", "plan"),
    [
        ({}, set(), 0, GcPlan([], [])),
        ({A: ObjectStat(1, 0), B: ObjectStat(1, 0)}, {A}, 0, GcPlan([B], [])),  # referenced: never deleted
        ({A: ObjectStat(1, 1000 - HOUR)}, set(), HOUR, GcPlan([A], [])),  # exactly min_age old: deleted
        ({A: ObjectStat(1, 1001 - HOUR)}, set(), HOUR, GcPlan([], [A])),  # one second younger: kept
        ({A: ObjectStat(1, 2000)}, set(), 0, GcPlan([], [A])),  # in the future (clock skew): kept
        ({C: ObjectStat(1, 0), B: ObjectStat(1, 900), A: ObjectStat(1, 0)}, {C}, 200, GcPlan([A], [B])),
        ({"blobs/sha256/aa/" + "b" * 64: ObjectStat(1, 0)}, set(), 0, GcPlan([], [])),  # wrong fan-out folder
        ({"blobs/sha256/aa/aa-partial": ObjectStat(1, 0), "blobs/x": ObjectStat(1, 0)}, set(), 0, GcPlan([], [])),
    ],
)
def test_plan_gc(stats: dict[str, ObjectStat], referenced: set[str], min_age: float, plan: GcPlan) -> None:
    assert plan_gc(referenced, stats, 1000.0, min_age) == plan


def test_plan_gc_refuses_a_negative_age() -> None:
    with pytest.raises(ValueError, match="min_age_s must be >= 0"):
        plan_gc(set(), {}, 0.0, -1)


@pytest.mark.parametrize(
    ("text", "seconds"), [("1h", 3600), ("30m", 1800), ("3600s", 3600), ("90", 90), ("1.5h", 5400), ("2d", 172800)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "-5m", "1h30m"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected a duration"):
        parse_duration(text)


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _blobs(reg: Registry) -> set[str]:
    return set(reg.store.list_keys("blobs/"))


def _age(reg: Registry, seconds: float) -> None:
    """Make every blob of a local registry `seconds` older."""
    for key, stat in reg.store.stats("blobs/").items():
        path = reg.store.local_path(key)
        assert path is not None
        os.utime(path, (stat.mtime - seconds, stat.mtime - seconds))


def _paused_push(reg: Registry, adapter: Path, stage: str, marker: Path, seconds: float) -> subprocess.Popen[str]:
    """A push (another process) stopped at `stage` for `seconds`, then carrying on."""
    proc = _spawn(PAUSED_PUSH, reg.location, str(adapter), "support", stage, str(marker), str(seconds))
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"push exited with {proc.returncode} before pausing: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"push never reached {stage}")
        time.sleep(0.02)
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _killed_push(reg: Registry, adapter: Path, marker: Path) -> set[str]:
    """Kill a push after its blobs and before its record; the blob keys it left."""
    before = _blobs(reg)
    _kill(_paused_push(reg, adapter, "blobs-written", marker, 3600))
    return _blobs(reg) - before


# ---- the local store -------------------------------------------------------------------------------------------------
def test_killed_push_orphans_are_deleted_once_old(registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> None:
    orphans = _killed_push(registry, adapter_dirs[0], tmp_path / "paused")
    assert len(orphans) == 3 and registry.list_adapters() == []

    young = collect_garbage(registry)  # default min age: one hour
    assert (young.deleted, young.young, young.kept, young.bytes_freed) == ([], sorted(orphans), 3, 0)

    _age(registry, 2 * HOUR)
    sizes = {k: s.size for k, s in registry.store.stats("blobs/").items()}
    dry = collect_garbage(registry, dry_run=True)
    assert (dry.dry_run, dry.deleted, dry.kept, dry.bytes_freed) == (True, sorted(orphans), 0, sum(sizes.values()))
    assert _blobs(registry) == orphans  # a dry run deletes nothing

    report = collect_garbage(registry)
    assert (report.deleted, report.young, report.kept) == (sorted(orphans), [], 0)
    assert report.bytes_freed == sum(sizes.values()) > 0
    assert _blobs(registry) == set()
    m = registry.push(adapter_dirs[0], "support", "tiny")  # the same content pushes again from scratch
    assert m.version == 1 and verify_registry(registry) == []


def test_removed_version_frees_only_unshared_blobs(
    registry: Registry, tiny_model: Path, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    one = registry.push(adapter_dirs[0], "support", "tiny")
    two = registry.push(_variant(adapter_dirs[0], tmp_path / "v2", "only in v2"), "support", "tiny")
    three = registry.push(_variant(adapter_dirs[0], tmp_path / "v3", "also in a base"), "support", "tiny")
    base_dir = tmp_path / "base-copy"
    shutil.copytree(tiny_model, base_dir)
    (base_dir / "notes.md").write_text("also in a base")
    base = registry.add_base(base_dir, "tiny-copy", copy=True)
    assert base.files is not None and base.files["notes.md"] == three.files["README.md"]
    registry.remove("support@2")
    registry.remove("support@3")
    total = len(_blobs(registry))
    _age(registry, 2 * HOUR)

    freed = blob_key(two.files["README.md"])
    size = registry.store.stats(freed)[freed].size
    report = collect_garbage(registry)
    assert (report.deleted, report.bytes_freed, report.kept) == ([freed], size, total - 1)
    assert _blobs(registry) == {blob_key(h) for h in [*one.files.values(), *base.files.values()]}
    assert verify_registry(registry) == []
    fresh = open_registry(registry.location, cache_dir=tmp_path / "fresh-cache")
    folder = fresh.materialize(one)
    assert sorted(p.name for p in folder.iterdir()) == sorted(one.files)
    assert (fresh.base_dir("tiny-copy") / "notes.md").read_text() == "also in a base"
    assert collect_garbage(registry).deleted == []  # nothing left to collect


def test_gc_prunes_the_local_cache_of_removed_versions(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    one = registry.push(adapter_dirs[0], "support", "tiny")
    two = registry.push(_variant(adapter_dirs[0], tmp_path / "v2", "only in v2"), "support", "tiny")
    kept, gone = registry.materialize(one), registry.materialize(two)
    registry.remove("support@2")

    assert collect_garbage(registry, min_age_s=HOUR).cache_pruned == []  # folders as young as a push in flight stay
    old = time.time() - 2 * HOUR
    os.utime(gone, (old, old))
    dry = collect_garbage(registry, min_age_s=HOUR, dry_run=True)
    assert dry.cache_pruned == [f"adapters/{two.digest_hex}"] and gone.is_dir()
    assert collect_garbage(registry, min_age_s=HOUR).cache_pruned == [f"adapters/{two.digest_hex}"]
    assert not gone.exists() and kept.is_dir()
    assert {p.name: _sha(p) for p in kept.iterdir()} == one.files  # the live version's folder is intact
    assert registry.materialize(one) == kept


def test_push_reusing_an_old_orphan_refreshes_its_age(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    orphans = _killed_push(registry, adapter_dirs[0], tmp_path / "first")
    _age(registry, 2 * HOUR)
    # a second push of the same content finds the blobs stored and stops just before its record
    push = _paused_push(registry, adapter_dirs[0], "blobs-written", tmp_path / "second", 3600)
    try:
        report = collect_garbage(registry)  # without the touch, these old orphans would go
        assert (report.deleted, report.young) == ([], sorted(orphans))
        assert _blobs(registry) == orphans
    finally:
        _kill(push)
    assert registry.push(adapter_dirs[0], "support", "tiny").version == 1
    assert verify_registry(registry) == []


def test_pushing_a_materialized_folder_of_the_same_store_works(registry: Registry, adapter_dirs: list[Path]) -> None:
    # the folder's files are hard links of the blobs: touching the blobs must not look like a change to the source
    folder = registry.materialize(registry.push(adapter_dirs[0], "support", "tiny"))
    assert registry.push(folder, "copy", "tiny").version == 1


def test_push_re_uploads_a_blob_deleted_before_its_record_was_seen(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    push = _paused_push(registry, adapter_dirs[0], "version-written", tmp_path / "paused", 3)
    victim = sorted(_blobs(registry))[0]
    registry.store.delete(victim)  # what a gc that listed its references just before the record does
    assert push.communicate(timeout=120)[0].strip() == "support@1"
    assert victim in _blobs(registry)
    assert verify_registry(registry) == []


def test_local_delete_if_older_keeps_a_touched_key(registry: Registry) -> None:
    store = registry.store
    store.put_bytes("blobs/k", b"data")
    mtime = store.stats("blobs/")["blobs/k"].mtime
    assert store.delete_if_older("blobs/k", mtime - 1) is False and store.get_bytes("blobs/k") == b"data"
    path = store.local_path("blobs/k")
    assert path is not None
    os.utime(path, (mtime - HOUR, mtime - HOUR))
    assert store.touch("blobs/k") is True
    assert store.delete_if_older("blobs/k", store.now() - 60) is False and store.get_bytes("blobs/k") == b"data"
    assert store.delete_if_older("blobs/k", store.now()) is True and store.get_bytes("blobs/k") is None
    assert (store.touch("blobs/k"), store.delete_if_older("blobs/k", store.now())) == (False, False)
    assert list((Path(store.location) / ".tmp").iterdir()) == []  # nothing left aside


def test_gc_is_audited(registry_template: Path, adapter_dirs: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "reg"
    shutil.copytree(registry_template, root)
    events: list[dict[str, Any]] = []
    reg = open_registry(root, audit=events.append)
    reg.push(adapter_dirs[0], "support", "tiny")
    reg.remove("support@1")
    _age(reg, 2 * HOUR)
    collect_garbage(reg, dry_run=True)
    assert [e["action"] for e in events] == ["registry.push", "registry.remove"]  # a dry run writes nothing
    collect_garbage(reg)
    assert events[-1] == {
        "action": "registry.gc",
        "target": str(root),
        "result": "ok",
        "who": None,
        "error": None,
        "details": {"min_age_s": HOUR, "deleted": 3, "bytes_freed": events[-1]["details"]["bytes_freed"], "kept": 0},
    }
    assert events[-1]["details"]["bytes_freed"] > 0


def test_cli(registry: Registry, adapter_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loc = ["--registry", registry.location]
    registry.push(adapter_dirs[0], "support", "tiny")
    registry.remove("support@1")
    keys = sorted(_blobs(registry))
    size = sum(s.size for s in registry.store.stats("blobs/").values())

    assert main(["registry", "gc", "--min-age", "30m", *loc]) == 0
    assert capsys.readouterr().out == (
        "deleted 0 blob(s), 0 B; kept 3, of which 3 unreferenced but younger than 1800s\n"
    )
    _age(registry, 2 * HOUR)
    assert main(["registry", "gc", "--dry-run", "--json", *loc]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "dry_run": True,
        "min_age_s": HOUR,
        "kept": 0,
        "deleted": keys,
        "bytes_freed": size,
        "young": [],
        "cache_pruned": [],
    }
    assert main(["registry", "gc", "--min-age", "1h", *loc]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"deleted {k}" for k in keys]
    assert lines[3].startswith("deleted 3 blob(s), ") and lines[3].endswith(
        "; kept 0, of which 0 unreferenced but younger than 3600s"
    )
    assert _blobs(registry) == set()
    with pytest.raises(SystemExit):
        main(["registry", "gc", "--min-age", "soon", *loc])


# ---- S3 (a real S3-protocol server on loopback) --------------------------------------------------------------------
# S3 ages cannot be set back: these tests wait, and LastModified has one-second resolution.
S3_AGE = 2.0


def test_s3_store_ages(s3_bucket: str) -> None:
    store = S3Store.from_url(f"s3://{s3_bucket}/p")
    store.put_bytes("blobs/k", b"data")
    stat = store.stats("blobs/")["blobs/k"]
    assert stat.size == 4 and abs(store.now() - stat.mtime) < 5
    time.sleep(1.1)
    assert store.touch("blobs/k") is True and store.get_bytes("blobs/k") == b"data"
    assert store.stats("blobs/")["blobs/k"].mtime > stat.mtime
    assert store.delete_if_older("blobs/k", stat.mtime) is False  # touched after the cutoff
    assert store.delete_if_older("blobs/k", store.now() + 1) is True and store.get_bytes("blobs/k") is None
    assert (store.touch("blobs/k"), store.delete_if_older("blobs/k", store.now() + 1)) == (False, False)


def test_s3_orphans_removed_version_and_reused_orphan(
    s3_registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    one = s3_registry.push(adapter_dirs[0], "support", "tiny")
    two = s3_registry.push(_variant(adapter_dirs[0], tmp_path / "v2", "only in v2"), "support", "tiny")
    s3_registry.remove("support@2")
    killed = _variant(adapter_dirs[1], tmp_path / "killed", "only in the killed push")
    orphans = _killed_push(s3_registry, killed, tmp_path / "first")
    # its config is the same as support@1's: only its weights and README are orphans
    assert orphans == {blob_key(_sha(killed / f)) for f in ("adapter_model.safetensors", "README.md")}
    unreferenced = sorted({blob_key(two.files["README.md"]), *orphans})
    assert collect_garbage(s3_registry, min_age_s=HOUR).young == unreferenced

    time.sleep(S3_AGE + 1.1)
    # the same content again, stopped before its record: it refreshes the old orphans
    push = _paused_push(s3_registry, killed, "blobs-written", tmp_path / "second", 3600)
    try:
        report = collect_garbage(s3_registry, min_age_s=S3_AGE, dry_run=True)
        assert (report.deleted, report.young) == ([blob_key(two.files["README.md"])], sorted(orphans))
        report = collect_garbage(s3_registry, min_age_s=S3_AGE)
        assert report.deleted == [blob_key(two.files["README.md"])]
        assert report.young == sorted(orphans)
    finally:
        _kill(push)
    assert _blobs(s3_registry) == {blob_key(h) for h in one.files.values()} | orphans

    time.sleep(S3_AGE + 1.1)
    report = collect_garbage(s3_registry, min_age_s=S3_AGE)
    assert (report.deleted, report.young) == (sorted(orphans), [])
    assert _blobs(s3_registry) == {blob_key(h) for h in one.files.values()}
    assert verify_registry(s3_registry) == []
    folder = open_registry(s3_registry.location, cache_dir=tmp_path / "fresh").materialize(one)
    assert sorted(p.name for p in folder.iterdir()) == sorted(one.files)
