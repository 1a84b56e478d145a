"""loragate adapter registry: immutable, verified adapter versions bound to their base model.

    reg = open_registry()                      # $LORAGATE_REGISTRY, ~/.loragate/registry, or "s3://bucket/prefix"
    reg.add_base(Path("models/tiny"), "tiny")
    m = reg.push(Path("out/adapter"), "support", base="tiny")
    reg.promote(m.ref, "prod"); reg.resolve("support:prod"); reg.materialize(m)

Names are imported lazily so that `loragate registry --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters_registry.manifest import AdapterManifest, BaseManifest
    from adapters_registry.registry import Registry, open_registry

__all__ = ["AdapterManifest", "BaseManifest", "Registry", "open_registry"]

_HOMES = {
    "AdapterManifest": "adapters_registry.manifest",
    "BaseManifest": "adapters_registry.manifest",
    "Registry": "adapters_registry.registry",
    "open_registry": "adapters_registry.registry",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'adapters_registry' has no attribute {name!r}")
