"""deploy/adapter_sync.py (the engine pods' sidecar) against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters_registry.layout import blob_key
from adapters_registry.registry import Registry, default_cache_dir, open_registry
from adapters_registry.store import sha256_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "adapter_sync.py"


def run_sync(location: str, cache_root: Path, moto_endpoint: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LORAGATE_REGISTRY": location,
        "LORAGATE_CACHE": str(cache_root),
        "LORAGATE_S3_ENDPOINT_URL": moto_endpoint,
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--once", *extra], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_sidecar_fills_the_folder_the_gateway_will_name(
    s3_registry: Registry,
    adapter_dirs: list[Path],
    moto_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pushed = [s3_registry.push(path, f"sync-{i}", "tiny") for i, path in enumerate(adapter_dirs)]
    location = s3_registry.location
    engine_cache = tmp_path / "engine-pod-cache"

    proc = run_sync(location, engine_cache, moto_endpoint)
    assert proc.returncode == 0, proc.stderr
    assert "2 ready, 0 merge-only skipped, 0 failed" in proc.stderr

    # The gateway pod: same location, same cache root, its own (empty) disk.
    monkeypatch.setenv("LORAGATE_CACHE", str(engine_cache))
    for manifest in pushed:
        expected = default_cache_dir(location) / "adapters" / manifest.digest_hex
        assert expected.is_dir(), "the sidecar did not assemble the version where the gateway looks"
        assert {p.name: sha256_file(p) for p in expected.iterdir()} == manifest.files
        assert open_registry(location).materialize(manifest) == expected
        assert open_registry(location).materialized_path(manifest) == expected  # what a non-materializing gateway names


def test_sidecar_reports_a_broken_version_and_still_syncs_the_others(
    s3_registry: Registry,
    adapter_dirs: list[Path],
    moto_endpoint: str,
    tmp_path: Path,
) -> None:
    good = s3_registry.push(adapter_dirs[0], "good", "tiny")
    broken = s3_registry.push(adapter_dirs[1], "broken", "tiny")
    weights = broken.files["adapter_model.safetensors"]
    assert weights not in good.files.values()
    s3_registry.store.delete(blob_key(weights))

    proc = run_sync(s3_registry.location, tmp_path / "cache", moto_endpoint)
    assert proc.returncode == 1
    assert "1 ready, 0 merge-only skipped, 1 failed" in proc.stderr
    assert "adapter-sync: broken@1 failed: NotFoundError" in proc.stderr
    cache = tmp_path / "cache" / "registry" / default_cache_dir(s3_registry.location).name / "adapters"
    assert sorted(p.name for p in cache.iterdir()) == [good.digest_hex]


def test_sidecar_prunes_what_removed_versions_left_in_the_pod_cache(
    s3_registry: Registry,
    adapter_dirs: list[Path],
    moto_endpoint: str,
    tmp_path: Path,
) -> None:
    kept = s3_registry.push(adapter_dirs[0], "kept", "tiny")
    gone = s3_registry.push(adapter_dirs[1], "gone", "tiny")
    shared = set(kept.files.values()) & set(gone.files.values())
    only_gone = set(gone.files.values()) - shared
    assert only_gone, "the two adapters must differ in some file"
    cache = tmp_path / "cache" / "registry" / default_cache_dir(s3_registry.location).name
    assert run_sync(s3_registry.location, tmp_path / "cache", moto_endpoint).returncode == 0
    assert sorted(p.name for p in (cache / "adapters").iterdir()) == sorted([kept.digest_hex, gone.digest_hex])
    (cache / "adapters" / ("0" * 64)).mkdir()  # a folder of some version removed long ago

    s3_registry.remove(gone.ref)
    proc = run_sync(s3_registry.location, tmp_path / "cache", moto_endpoint)
    assert proc.returncode == 0, proc.stderr
    assert f"1 ready, 0 merge-only skipped, 0 failed, {2 + len(only_gone)} pruned" in proc.stderr
    assert [p.name for p in (cache / "adapters").iterdir()] == [kept.digest_hex]
    cached_blobs = {p.name for p in (cache / "blobs").glob("*/*")}
    assert cached_blobs == set(kept.files.values())  # shared files stay, the removed version's own go
    folder = cache / "adapters" / kept.digest_hex
    assert {p.name: sha256_file(p) for p in folder.iterdir()} == kept.files


def test_the_ready_file_follows_the_first_finished_pass(
    s3_registry: Registry, adapter_dirs: list[Path], moto_endpoint: str, tmp_path: Path
) -> None:
    """The chart's readiness probe on the engine pod's sidecar tests this file (test_helm_engine.py)."""
    good = s3_registry.push(adapter_dirs[0], "ready-good", "tiny")
    broken = s3_registry.push(adapter_dirs[1], "ready-broken", "tiny")
    s3_registry.store.delete(blob_key(broken.files["adapter_model.safetensors"]))
    cache = tmp_path / "cache"
    marker = cache / ".adapter-sync-ready"
    proc = run_sync(s3_registry.location, cache, moto_endpoint, "--ready-file", str(marker))
    # A broken version is reported, not waited for: the pass finished, the pod may serve the others.
    assert proc.returncode == 1
    assert marker.read_text() == "1 adapter version(s) synced\n"
    assert f"adapter-sync: first pass done, wrote {marker}" in proc.stderr
    assert (cache / "registry" / default_cache_dir(s3_registry.location).name / "adapters" / good.digest_hex).is_dir()
    # A registry it cannot reach: no pass, no file, the pod stays out of the gateways' engine set.
    unreachable = tmp_path / "unreachable" / ".adapter-sync-ready"
    proc = run_sync(
        s3_registry.location, tmp_path / "unreachable", "http://127.0.0.1:9", "--ready-file", str(unreachable)
    )
    assert proc.returncode != 0
    assert not unreachable.exists()
