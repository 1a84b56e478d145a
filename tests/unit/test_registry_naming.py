"""Pure decisions of the registry: reference parsing, naming rules and the rollback target."""

from __future__ import annotations

import pytest

from adapters_registry.aliases import rollback_target
from adapters_registry.errors import ValidationError
from adapters_registry.manifest import AliasMove
from adapters_registry.naming import Ref, check_alias, check_name, parse_ref


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("support", Ref("support", "latest")),
        ("support:latest", Ref("support", "latest")),
        ("support@3", Ref("support", "version", version=3)),
        ("Support_v2.1@12", Ref("Support_v2.1", "version", version=12)),
        ("support@sha256:ABCDEF12", Ref("support", "digest", digest_prefix="abcdef12")),
        ("support:prod", Ref("support", "alias", alias="prod")),
        ("support:canary-2", Ref("support", "alias", alias="canary-2")),
    ],
)
def test_parse_ref(ref: str, parsed: Ref) -> None:
    assert parse_ref(ref) == parsed


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("support@0", "invalid reference 'support@0': expected name@<version>=1,2,... or name@sha256:<hex>"),
        ("support@v3", "invalid reference 'support@v3': expected name@<version>=1,2,... or name@sha256:<hex>"),
        (
            "support@sha256:abc",
            "invalid reference 'support@sha256:abc': a digest needs 6-64 hex characters after 'sha256:'",
        ),
        (
            "support@sha256:xyzxyzxyz",
            "invalid reference 'support@sha256:xyzxyzxyz': a digest needs 6-64 hex characters after 'sha256:'",
        ),
        ("support:Prod", "invalid reference 'support:Prod': bad alias 'Prod'"),
        ("", "invalid adapter name '': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
        (
            "-x@1",
            "invalid adapter name '-x': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        ),
        (
            "a/b",
            "invalid adapter name 'a/b': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        ),
    ],
)
def test_parse_ref_errors(ref: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_ref(ref)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("name", "ok"), [("a", True), ("x" * 64, True), ("x" * 65, False), ("a b", False), ("a:b", False)]
)
def test_check_name(name: str, ok: bool) -> None:
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(ValidationError):
            check_name(name)


@pytest.mark.parametrize(
    ("alias", "message"),
    [
        ("latest", "alias 'latest' is reserved: it always means the newest version"),
        ("Prod", "invalid alias 'Prod': use 1-32 lowercase letters, digits, '.', '_' or '-', starting with a letter"),
        ("1st", "invalid alias '1st': use 1-32 lowercase letters, digits, '.', '_' or '-', starting with a letter"),
    ],
)
def test_check_alias_errors(alias: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_alias(alias)
    assert str(info.value) == message


def _moves(*steps: tuple[str, int | None, int]) -> list[AliasMove]:
    return [AliasMove(action=a, who="t", when="now", from_version=f, to_version=t) for a, f, t in steps]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("history", "target"),
    [
        ([], None),
        ([("promote", None, 1)], None),
        ([("promote", None, 1), ("promote", 1, 2)], 1),
        ([("promote", None, 1), ("promote", 1, 2), ("promote", 2, 3)], 2),
        ([("promote", None, 1), ("promote", 1, 2), ("promote", 2, 3), ("rollback", 3, 2)], 1),
        ([("promote", None, 1), ("promote", 1, 2), ("rollback", 2, 1)], None),
        ([("promote", None, 1), ("promote", 1, 2), ("rollback", 2, 1), ("promote", 1, 5)], 1),
        ([("promote", None, 4), ("promote", 4, 4)], 4),
    ],
)
def test_rollback_target(history: list[tuple[str, int | None, int]], target: int | None) -> None:
    assert rollback_target(_moves(*history)) == target
