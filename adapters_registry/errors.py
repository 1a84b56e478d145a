"""Exceptions raised by the registry.

RegistryError            base class; str(exc) is one line fit for a user
├── NotFoundError        unknown adapter, version, alias or base
├── ValidationError      an adapter or base refused at push/add; `.path` names the offending file
├── ConflictError        a name already taken, an ambiguous reference, a refused delete, a lost update race
├── IntegrityError       stored bytes whose sha256 does not match the recorded digest
└── StorageError         the backend failed (I/O, S3 error) in a way the caller cannot fix by changing input
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every registry error."""


class NotFoundError(RegistryError):
    pass


class ValidationError(RegistryError):
    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


class ConflictError(RegistryError):
    pass


class IntegrityError(RegistryError):
    pass


class StorageError(RegistryError):
    pass
