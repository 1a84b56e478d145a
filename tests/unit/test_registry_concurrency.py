"""Registry writes from several processes at once, and a push killed half-way (SIGKILL at a pause point)."""

from __future__ import annotations

import itertools
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adapters_registry.errors import NotFoundError
from adapters_registry.registry import Registry
from adapters_registry.verify import verify_registry

REPO = Path(__file__).resolve().parents[2]

# Each worker imports first, then waits for the "go" file so that all of them write at the same moment.
PUSH = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from adapters_registry import open_registry
    reg = open_registry(sys.argv[1])
    go = Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.005)
    print(reg.push(Path(sys.argv[2]), sys.argv[3], "tiny").ref)
    """
)
# A push that stops at one stage for `seconds` (writing its pid to the marker file first), then carries on.
PAUSED_PUSH = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from adapters_registry import open_registry
    location, adapter, name, stage, marker, seconds = sys.argv[1:]

    def pause(at):
        if at == stage:
            Path(marker).write_text(str(os.getpid()))
            time.sleep(float(seconds))

    print(open_registry(location).push(Path(adapter), name, "tiny", on_stage=pause).ref)
    """
)
PROMOTE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from adapters_registry import open_registry
    reg = open_registry(sys.argv[1])
    go = Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.005)
    for _ in range(5):
        reg.promote(sys.argv[2], "prod", who=sys.argv[3])
    """
)


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(out.strip())
    return outs


def _variants(src: Path, root: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        shutil.copytree(src, root / f"v{i}")
        (root / f"v{i}" / "README.md").write_text(f"variant {i}")
        out.append(root / f"v{i}")
    return out


def test_concurrent_pushes_get_distinct_versions(registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> None:
    variants = _variants(adapter_dirs[0], tmp_path, 4)
    go = tmp_path / "go"
    procs = [_spawn(PUSH, registry.location, str(v), "support", str(go)) for v in variants]
    go.touch()
    refs = _finish(procs)
    assert sorted(refs) == ["support@1", "support@2", "support@3", "support@4"]
    by_ref = {m.ref: m.files["README.md"] for m in registry.list_adapters("support")}
    for ref, variant in zip(refs, variants, strict=True):
        assert by_ref[ref] == registry.push(variant, "support", "tiny").files["README.md"]
        assert registry.push(variant, "support", "tiny").ref == ref  # re-push finds the same version
    assert verify_registry(registry) == []


def test_concurrent_alias_moves_lose_no_update(registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> None:
    for variant in _variants(adapter_dirs[0], tmp_path, 3):
        registry.push(variant, "support", "tiny")
    go = tmp_path / "go"
    procs = [_spawn(PROMOTE, registry.location, f"support@{v}", f"user{v}", str(go)) for v in (1, 2, 3)]
    go.touch()
    _finish(procs)
    history = registry.alias_history("support", "prod")
    assert len(history) == 15
    assert sorted(m.who for m in history) == ["user1"] * 5 + ["user2"] * 5 + ["user3"] * 5
    for before, after in itertools.pairwise(history):
        assert after.from_version == before.to_version  # every move saw the one before it
    assert registry.aliases("support") == {"prod": history[-1].to_version}


def _killed_at(stage: str, registry: Registry, adapter: Path, tmp_path: Path) -> None:
    marker = tmp_path / f"paused-{stage}"
    proc = _spawn(PAUSED_PUSH, registry.location, str(adapter), "support", stage, str(marker), "3600")
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"push exited with {proc.returncode} before pausing: {proc.stderr.read() if proc.stderr else ''}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"push never reached {stage}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def test_push_killed_before_its_record_leaves_no_version(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    _killed_at("blobs-written", registry, adapter_dirs[0], tmp_path)
    assert len(registry.store.list_keys("blobs/")) == 3  # the blobs got written ...
    assert registry.list_adapters() == []  # ... but no version is visible
    with pytest.raises(NotFoundError):
        registry.resolve("support")
    assert verify_registry(registry) == []
    assert registry.push(adapter_dirs[0], "support", "tiny").version == 1


def test_push_killed_after_its_record_is_complete(registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> None:
    _killed_at("version-written", registry, adapter_dirs[0], tmp_path)
    m = registry.resolve("support")
    assert m.version == 1
    assert registry.resolve(f"support@sha256:{m.digest_hex[:8]}") == m  # found without its index entry
    assert registry.push(adapter_dirs[0], "support", "tiny") == m
    assert registry.push(adapter_dirs[1], "support", "tiny").version == 2
    assert verify_registry(registry) == []
