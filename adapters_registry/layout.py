"""Where the registry keeps things: the store's key scheme and the local cache's folder names (pure).

Store keys:
    bases/<base>.json                                     BaseManifest (create-only)
    blobs/sha256/<hex[:2]>/<hex>                          file contents and golden prompts, content-addressed
    adapters/<name>/versions/<000000003>.json             AdapterManifest, written last and create-only: the commit
    adapters/<name>/digests/<hex[:2]>/<hex>/<000000003>   index for name@sha256:<prefix> and re-push detection
    adapters/<name>/head.json                             hint of the newest version (readers probe past it)
    adapters/<name>/aliases/<alias>.json                  AliasRecord with its history, replaced by compare-and-swap

Local cache folders (relative to the cache root):
    adapters/<digest hex>/                                a version's files, assembled from verified blobs
    bases/<fingerprint hex>/                              a copied base's files
    blobs/<hex[:2]>/<hex>                                 a blob downloaded from a remote store
"""

from __future__ import annotations

import re

BASES = "bases/"
BLOBS = "blobs/"
ADAPTERS = "adapters/"


def base_key(name: str) -> str:
    return f"{BASES}{name}.json"


def base_name(key: str) -> str:
    """`bases/<base>.json` -> `<base>`."""
    return key.removeprefix(BASES).removesuffix(".json")


_BLOB_KEY = re.compile(r"blobs/sha256/([0-9a-f]{2})/(\1[0-9a-f]{62})")


def blob_key(hex_digest: str) -> str:
    return f"{BLOBS}sha256/{hex_digest[:2]}/{hex_digest}"


def is_blob_key(key: str) -> bool:
    """A well-formed blob key: a full sha256 hex in its own fan-out folder (gc deletes nothing else)."""
    return _BLOB_KEY.fullmatch(key) is not None


def versions_prefix(name: str) -> str:
    return f"{ADAPTERS}{name}/versions/"


def version_key(name: str, version: int) -> str:
    return f"{versions_prefix(name)}{version:09d}.json"


def version_number(name: str, key: str) -> int:
    """`adapters/<name>/versions/000000003.json` -> 3."""
    return int(key.removeprefix(versions_prefix(name)).removesuffix(".json"))


def versioned_name(key: str) -> str | None:
    """The adapter name of a key under `adapters/<name>/versions/`; None for any other key."""
    parts = key.split("/")
    if len(parts) > 3 and f"{parts[0]}/" == ADAPTERS and parts[2] == "versions":
        return parts[1]
    return None


def digest_dir(name: str, hex_digest: str) -> str:
    return f"{ADAPTERS}{name}/digests/{hex_digest[:2]}/{hex_digest}"


def digest_entry(name: str, hex_digest: str, version: int) -> str:
    return f"{digest_dir(name, hex_digest)}/{version:09d}"


def digest_fanout(name: str, hex_prefix: str) -> str:
    """The folder that holds every digest starting with `hex_prefix` (at least 2 characters)."""
    return f"{ADAPTERS}{name}/digests/{hex_prefix[:2]}/"


def head_key(name: str) -> str:
    return f"{ADAPTERS}{name}/head.json"


def aliases_prefix(name: str) -> str:
    return f"{ADAPTERS}{name}/aliases/"


def alias_key(name: str, alias: str) -> str:
    return f"{aliases_prefix(name)}{alias}.json"


def alias_name(name: str, key: str) -> str:
    """`adapters/<name>/aliases/prod.json` -> `prod`."""
    return key.removeprefix(aliases_prefix(name)).removesuffix(".json")


def cached_version_dir(digest_hex: str) -> str:
    return f"{ADAPTERS}{digest_hex}"


def cached_base_dir(fingerprint: str) -> str:
    return f"{BASES}{fingerprint.removeprefix('sha256:')}"


def cached_blob(hex_digest: str) -> str:
    return f"{BLOBS}{hex_digest[:2]}/{hex_digest}"
