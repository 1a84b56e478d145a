"""Pure parsing of adapter references and the naming rules for adapters, bases and aliases.

A reference is one of: `name` (latest version), `name@3`, `name@sha256:<hex prefix>`, `name:alias`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from adapters_registry.errors import ValidationError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALIAS_RE = re.compile(r"[a-z][a-z0-9._-]{0,31}")
DIGEST_PREFIX_RE = re.compile(r"[0-9a-f]{6,64}")
LATEST = "latest"
MIN_DIGEST_PREFIX = 6

RefKind = Literal["latest", "version", "digest", "alias"]


@dataclass(frozen=True)
class Ref:
    name: str
    kind: RefKind
    version: int | None = None
    digest_prefix: str | None = None
    alias: str | None = None


def check_name(name: str, what: str = "adapter name") -> str:
    if not NAME_RE.fullmatch(name):
        raise ValidationError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS_RE.fullmatch(alias):
        raise ValidationError(
            f"invalid alias {alias!r}: use 1-32 lowercase letters, digits, '.', '_' or '-', starting with a letter"
        )
    if alias == LATEST:
        raise ValidationError(f"alias {LATEST!r} is reserved: it always means the newest version")
    return alias


def parse_ref(ref: str) -> Ref:
    """Parse a reference; raises ValidationError with the reason when it is malformed."""
    if "@" in ref:
        name, _, selector = ref.partition("@")
        check_name(name)
        if selector.startswith("sha256:"):
            prefix = selector.removeprefix("sha256:").lower()
            if not DIGEST_PREFIX_RE.fullmatch(prefix):
                raise ValidationError(
                    f"invalid reference {ref!r}: a digest needs {MIN_DIGEST_PREFIX}-64 hex characters after 'sha256:'"
                )
            return Ref(name, "digest", digest_prefix=prefix)
        if selector.isdigit() and int(selector) > 0:
            return Ref(name, "version", version=int(selector))
        raise ValidationError(f"invalid reference {ref!r}: expected name@<version>=1,2,... or name@sha256:<hex>")
    if ":" in ref:
        name, _, alias = ref.partition(":")
        check_name(name)
        if alias == LATEST:
            return Ref(name, "latest")
        if not ALIAS_RE.fullmatch(alias):
            raise ValidationError(f"invalid reference {ref!r}: bad alias {alias!r}")
        return Ref(name, "alias", alias=alias)
    check_name(ref)
    return Ref(ref, "latest")
