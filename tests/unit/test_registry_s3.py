"""The registry on S3, against a real S3-protocol server (moto in server mode) on loopback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest

from adapters_registry.errors import ConflictError, IntegrityError, NotFoundError
from adapters_registry.layout import blob_key
from adapters_registry.registry import Registry, open_registry
from adapters_registry.s3 import S3Store
from adapters_registry.verify import verify_registry
from tests.unit.test_registry_concurrency import PUSH, _finish, _killed_at, _spawn, _variants


def test_conditional_writes(s3_bucket: str, moto_endpoint: str) -> None:
    store = S3Store.from_url(f"s3://{s3_bucket}/p")
    assert store.put_bytes("k", b"one", if_absent=True) is True
    assert store.put_bytes("k", b"two", if_absent=True) is False
    assert store.get_bytes("k") == b"one"
    got = store.get_with_token("k")
    assert got is not None and got[0] == b"one"
    assert store.put_if_match("k", b"three", got[1]) is True
    assert store.put_if_match("k", b"four", got[1]) is False  # stale token
    assert store.get_bytes("k") == b"three"
    assert store.put_if_match("new", b"x", None) is True
    assert store.put_if_match("new", b"y", None) is False
    assert store.list_keys("") == ["k", "new"]
    assert (store.exists("k"), store.exists("missing"), store.get_bytes("missing")) == (True, False, None)
    store.delete("k")
    assert store.list_keys("") == ["new"]
    raw = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket=s3_bucket)
    assert [o["Key"] for o in raw["Contents"]] == ["p/new"]


def test_push_resolve_alias_remove(s3_registry: Registry, adapter_dirs: list[Path]) -> None:
    one = s3_registry.push(adapter_dirs[0], "support", "tiny")
    assert s3_registry.push(adapter_dirs[0], "support", "tiny") == one
    two = s3_registry.push(adapter_dirs[1], "support", "tiny")
    s3_registry.promote("support@1", "prod", who="alice")
    s3_registry.promote("support@2", "prod", who="bob")
    assert s3_registry.resolve("support:prod") == two
    assert s3_registry.rollback("support", "prod", who="carol") == one
    assert s3_registry.resolve(f"support@sha256:{two.digest_hex[:8]}") == two
    assert s3_registry.resolve("support") == two
    with pytest.raises(ConflictError):
        s3_registry.remove("support@1")
    s3_registry.remove("support@2")
    assert [m.ref for m in s3_registry.list_adapters()] == ["support@1"]
    assert s3_registry.resolve("support") == one
    with pytest.raises(NotFoundError):
        s3_registry.resolve("support@2")


def test_materialize_downloads_verified_copies(
    s3_registry: Registry, s3_bucket: str, moto_endpoint: str, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    m = s3_registry.push(adapter_dirs[0], "support", "tiny")
    folder = s3_registry.materialize(m)
    assert folder.is_relative_to(tmp_path / "s3-cache")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == m.files
    assert verify_registry(s3_registry) == []

    sha = m.files["adapter_model.safetensors"]
    boto3.client("s3", endpoint_url=moto_endpoint).put_object(
        Bucket=s3_bucket, Key=f"loragate/{blob_key(sha)}", Body=b"tampered"
    )
    bad = hashlib.sha256(b"tampered").hexdigest()
    assert verify_registry(s3_registry, "support@1") == [
        f"support@1: adapter_model.safetensors: corrupted: sha256 is {bad[:12]}..., expected {sha[:12]}..."
    ]
    assert s3_registry.materialize(m) == folder  # already cached and verified: still good
    fresh = open_registry(s3_registry.location, cache_dir=tmp_path / "fresh-cache")
    with pytest.raises(IntegrityError) as info:
        fresh.materialize(m)
    assert str(info.value) == f"blob sha256:{sha} downloaded with sha256:{bad}: refusing it"
    assert not (tmp_path / "fresh-cache" / "adapters" / m.digest_hex).exists()  # no half-assembled folder


def test_concurrent_pushes_from_processes(s3_registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> None:
    variants = _variants(adapter_dirs[0], tmp_path, 3)
    go = tmp_path / "go"
    procs = [_spawn(PUSH, s3_registry.location, str(v), "support", str(go)) for v in variants]
    go.touch()
    assert sorted(_finish(procs)) == ["support@1", "support@2", "support@3"]
    assert [m.version for m in s3_registry.list_adapters("support")] == [1, 2, 3]


def test_killed_push_leaves_no_version(s3_registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> None:
    _killed_at("blobs-written", s3_registry, adapter_dirs[0], tmp_path)
    assert s3_registry.list_adapters() == []
    assert s3_registry.push(adapter_dirs[0], "support", "tiny").version == 1
