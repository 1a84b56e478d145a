"""History that must not break: a version a later rollback would reach is not removed without --force (which says
which rollback it breaks), and names are unique regardless of case."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters_registry.errors import ConflictError, ValidationError
from adapters_registry.manifest import AliasMove
from adapters_registry.registry import Registry
from loragate.cli import main


def _versions(registry: Registry, src: Path, tmp_path: Path, n: int) -> None:
    for i in range(n):
        variant = tmp_path / f"v{i}"
        shutil.copytree(src, variant)
        (variant / "README.md").write_text(f"variant {i}")
        registry.push(variant, "support", "tiny")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_rm_of_a_version_a_rollback_would_reach_is_refused(
    registry: Registry,
    adapter_dirs: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _versions(registry, adapter_dirs[0], tmp_path, 4)
    for version in (1, 2, 3):
        registry.promote(f"support@{version}", "prod")
    registry.promote("support@1", "canary")
    registry.promote("support@2", "canary")
    loc = ["--registry", registry.location]
    assert _run(capsys, "rm", "support@1", *loc) == (
        2,
        "",
        "error: support@1 is in the history of alias canary, prod: the next `loragate registry rollback support "
        "--alias canary` and the 2nd `loragate registry rollback support --alias prod` would go back to it; removing "
        "it would break that rollback (--force removes it anyway)\n",
    )
    assert _run(capsys, "rm", "support@4", *loc)[:2] == (0, "removed support@4\n")  # in no history: removed
    assert [m.ref for m in registry.list_adapters()] == ["support@1", "support@2", "support@3"]

    caplog.set_level("WARNING", "adapters_registry.registry")
    assert _run(capsys, "rm", "support@1", "--force", *loc)[:2] == (0, "removed support@1\n")
    assert [r.getMessage() for r in caplog.records if r.name == "adapters_registry.registry" and r.levelno >= 30] == [
        "removed support@1 (--force): the next `loragate registry rollback support --alias canary` and the 2nd "
        "`loragate registry rollback support --alias prod` would go back to it and will now fail"
    ]
    assert _run(capsys, "rollback", "support", "--alias", "prod", *loc)[:2] == (0, "support:prod -> support@2\n")
    code, out, err = _run(capsys, "rollback", "support", "--alias", "prod", *loc)
    assert (code, out) == (2, "")
    assert err.startswith("error: support:prod would roll back to support@1, which was removed at ")
    assert err.endswith("; promote a version instead\n")
    assert registry.resolve("support:prod").version == 2  # the failed rollback moved nothing


def _move(action: str, frm: int | None, to: int) -> AliasMove:
    return AliasMove(action=action, who="t", when="t", from_version=frm, to_version=to)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("moves", "chain"),
    [
        ([], []),
        ([("promote", None, 1)], []),
        ([("promote", None, 1), ("promote", 1, 2), ("promote", 2, 3)], [2, 1]),
        ([("promote", None, 1), ("promote", 1, 2), ("promote", 2, 3), ("rollback", 3, 2)], [1]),
        ([("promote", None, 1), ("promote", 1, 2), ("rollback", 2, 1), ("promote", 1, 3)], [1]),
        ([("promote", None, 2), ("promote", 2, 1), ("promote", 1, 2)], [1, 2]),
    ],
)
def test_rollback_chain(moves: list[tuple[str, int | None, int]], chain: list[int]) -> None:
    from adapters_registry.aliases import rollback_chain

    assert rollback_chain([_move(*m) for m in moves]) == chain


def test_names_are_unique_regardless_of_case(
    registry: Registry, adapter_dirs: list[Path], tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.push(adapter_dirs[0], "upper", "tiny")
    with pytest.raises(ValidationError) as info:
        registry.push(adapter_dirs[1], "UPPER", "tiny")
    assert str(info.value) == (
        "adapter name 'UPPER' differs only in case from the existing adapter 'upper': names are unique regardless of "
        "case (on a case-insensitive disk they would share one folder); use 'upper' or another name"
    )
    assert registry.adapter_names() == ["upper"]
    assert registry.push(adapter_dirs[1], "upper", "tiny").version == 2  # the name itself still takes versions
    code, _, err = _run(capsys, "push", str(adapter_dirs[0]), "--name", "Tiny", "--base", "tiny",
                        "--registry", registry.location)  # fmt: skip
    assert (code, err) == (
        2,
        "error: adapter name 'Tiny' differs only in case from the existing base 'tiny': names are unique regardless "
        "of case (on a case-insensitive disk they would share one folder); use 'tiny' or another name\n",
    )
    with pytest.raises(ValidationError) as base_info:
        registry.add_base(tiny_model, "TINY")
    assert str(base_info.value).startswith("base name 'TINY' differs only in case from the existing base 'tiny': ")
    with pytest.raises(ValidationError) as clash:
        registry.add_base(tiny_model, "Upper")
    assert str(clash.value).startswith("base name 'Upper' differs only in case from the existing adapter 'upper': ")
    assert [b.name for b in registry.list_bases()] == ["tiny"]


def test_names_are_unique_regardless_of_case_on_s3(s3_registry: Registry, adapter_dirs: list[Path]) -> None:
    s3_registry.push(adapter_dirs[0], "Support", "tiny")
    with pytest.raises(ValidationError) as info:
        s3_registry.push(adapter_dirs[1], "support", "tiny")
    assert str(info.value).startswith("adapter name 'support' differs only in case from the existing adapter 'Support'")
    assert s3_registry.adapter_names() == ["Support"]


def test_remove_still_refuses_the_current_target_with_force(registry: Registry, adapter_dirs: list[Path]) -> None:
    registry.push(adapter_dirs[0], "support", "tiny")
    registry.promote("support@1", "prod")
    with pytest.raises(ConflictError) as info:
        registry.remove("support@1", force=True)
    assert str(info.value) == "support@1 is the target of alias prod; promote another version there first"
