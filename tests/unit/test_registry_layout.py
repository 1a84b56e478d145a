"""adapters_registry.layout: every key and cache folder the registry writes, and the readers of those keys."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from adapters_registry import layout

HEX = "ab" + "0" * 62


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (lambda: layout.base_key("tiny"), "bases/tiny.json"),
        (lambda: layout.blob_key(HEX), f"blobs/sha256/ab/{HEX}"),
        (lambda: layout.versions_prefix("support"), "adapters/support/versions/"),
        (lambda: layout.version_key("support", 3), "adapters/support/versions/000000003.json"),
        (lambda: layout.version_key("support", 1234567890), "adapters/support/versions/1234567890.json"),
        (lambda: layout.digest_dir("support", HEX), f"adapters/support/digests/ab/{HEX}"),
        (lambda: layout.digest_entry("support", HEX, 7), f"adapters/support/digests/ab/{HEX}/000000007"),
        (lambda: layout.digest_fanout("support", "abc123"), "adapters/support/digests/ab/"),
        (lambda: layout.head_key("support"), "adapters/support/head.json"),
        (lambda: layout.aliases_prefix("support"), "adapters/support/aliases/"),
        (lambda: layout.alias_key("support", "prod"), "adapters/support/aliases/prod.json"),
        (lambda: layout.cached_version_dir(HEX), f"adapters/{HEX}"),
        (lambda: layout.cached_base_dir(f"sha256:{HEX}"), f"bases/{HEX}"),
        (lambda: layout.cached_blob(HEX), f"blobs/ab/{HEX}"),
    ],
)
def test_keys(key: Callable[[], str], expected: str) -> None:
    assert key() == expected


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("bases/tiny.json", "tiny"),
        ("bases/llama-3.1-8b.json", "llama-3.1-8b"),
    ],
)
def test_base_name(key: str, name: str) -> None:
    assert layout.base_name(key) == name
    assert layout.base_key(name) == key


@pytest.mark.parametrize(
    ("version", "key"), [(1, "000000001.json"), (42, "000000042.json"), (10**9, "1000000000.json")]
)
def test_version_number(version: int, key: str) -> None:
    assert layout.version_number("support", f"adapters/support/versions/{key}") == version
    assert layout.version_number("support", layout.version_key("support", version)) == version


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("adapters/support/versions/000000001.json", "support"),
        ("adapters/a.b-c/versions/000000012.json", "a.b-c"),
        ("adapters/support/head.json", None),
        ("adapters/support/aliases/prod.json", None),
        (f"adapters/support/digests/ab/{HEX}/000000001", None),
        ("adapters/support/versions", None),
        ("bases/tiny.json", None),
        (f"blobs/sha256/ab/{HEX}", None),
    ],
)
def test_versioned_name(key: str, name: str | None) -> None:
    assert layout.versioned_name(key) == name


def test_alias_name() -> None:
    assert layout.alias_name("support", "adapters/support/aliases/canary-2.json") == "canary-2"
    assert layout.alias_name("support", layout.alias_key("support", "prod")) == "prod"


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        (f"blobs/sha256/ab/{HEX}", True),
        (f"blobs/sha256/aa/{HEX}", False),  # the wrong fan-out folder
        (f"blobs/sha256/ab/{HEX[:-1]}", False),  # too short
        (f"blobs/sha256/ab/{HEX}0", False),  # too long
        (f"blobs/sha256/AB/{HEX.upper()}", False),  # not lower-case hex
        ("blobs/sha256/aa/aa-partial", False),
        ("blobs/x", False),
        (f"adapters/support/digests/ab/{HEX}", False),
    ],
)
def test_is_blob_key(key: str, ok: bool) -> None:
    assert layout.is_blob_key(key) is ok
