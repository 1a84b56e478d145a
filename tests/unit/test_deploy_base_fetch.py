"""deploy/base_fetch.py (the engine pods' init container for engine.modelVolume.registryBase) against a real
S3-protocol server (moto) on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from adapters_registry.registry import Registry
from adapters_registry.store import sha256_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "base_fetch.py"


def run_fetch(location: str, moto_endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORAGATE_REGISTRY": location, "LORAGATE_S3_ENDPOINT_URL": moto_endpoint}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_a_copied_base_lands_verified_where_vllm_reads_it(
    s3_registry: Registry, tiny_model: Path, moto_endpoint: str, tmp_path: Path
) -> None:
    base = s3_registry.add_base(tiny_model, "tiny-copy", copy=True)
    assert base.files is not None
    out = tmp_path / "models" / "tiny-copy"
    proc = run_fetch(s3_registry.location, moto_endpoint, "--base", "tiny-copy", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"base-fetch: tiny-copy ready at {out}" in proc.stderr
    assert {p.name: sha256_file(p) for p in out.iterdir()} == base.files
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()
    }
    # The copy lives on the same volume (the link is relative), so a pod that keeps the volume keeps it.
    assert out.is_symlink() and not os.readlink(out).startswith("/")
    assert out.resolve().is_relative_to(out.parent.resolve())
    # A second run (a restarted init container) finds it and downloads nothing.
    blobs = sorted(p.stat().st_mtime_ns for p in (out.parent / ".loragate-cache").rglob("blobs/*/*"))
    again = run_fetch(s3_registry.location, moto_endpoint, "--base", "tiny-copy", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert sorted(p.stat().st_mtime_ns for p in (out.parent / ".loragate-cache").rglob("blobs/*/*")) == blobs


def test_a_base_it_cannot_copy_is_one_line(s3_registry: Registry, moto_endpoint: str, tmp_path: Path) -> None:
    out = tmp_path / "models" / "x"
    # "tiny" is registered by path only (its weights are on this machine, not in the registry).
    proc = run_fetch(s3_registry.location, moto_endpoint, "--base", "tiny", "--out", str(out))
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: base 'tiny' is registered without its weights (from ")
    assert line.endswith("register it with --copy, or mount a volume holding it (engine.modelVolume.existingClaim)")
    proc = run_fetch(s3_registry.location, moto_endpoint, "--base", "nobody", "--out", str(out))
    assert (proc.returncode, proc.stderr.splitlines()) == (
        1,
        ["error: base model 'nobody' is not registered (loragate registry base add DIR --name nobody)"],
    )
    assert not out.exists()
