"""Which base model the gateway serves: a model directory, or a base in the registry (and under which name)."""

from __future__ import annotations

from pathlib import Path

from adapters_registry import Registry
from adapters_registry.errors import NotFoundError
from gateway.errors import StartupError
from gateway.settings import Settings


class BaseModelError(StartupError):
    """`base` names neither a directory nor a registry base."""


def resolve_served_base(settings: Settings, registry: Registry) -> tuple[str | None, str]:
    """(model path for managed engines, served base name)."""
    if settings.mode == "external":
        return None, settings.base_name or str(settings.base)
    assert settings.base is not None
    path = Path(settings.base).expanduser()
    if path.is_dir():
        return str(path.resolve()), settings.base_name or path.name
    try:
        registry.get_base(settings.base)
    except NotFoundError as exc:
        raise BaseModelError(f"base '{settings.base}' is neither a directory nor a registered base") from exc
    return str(registry.base_dir(settings.base)), settings.base_name or settings.base


def bound_base_name(settings: Settings, served_name: str) -> str:
    """The registry base that adapters must be bound to: `base` when it names a registry base, else the served name."""
    if settings.base and not Path(settings.base).expanduser().is_dir():
        return settings.base
    return served_name
