"""Rollouts on an alias (`promote --weight`): the split lives in the alias record, moves are audited and undone by
rollback like any other, the split is deterministic per key and close to its weight, and bad moves are refused with
one line and change nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapters_registry.aliases import Resolution, split_bucket
from adapters_registry.audit import AuditLog
from adapters_registry.errors import ConflictError, ValidationError
from adapters_registry.registry import Registry
from loragate.cli import main


@pytest.fixture
def support(registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> Registry:
    """support@1..3 (one adapter's weights, three versions), prod on support@1."""
    for i in range(3):
        variant = tmp_path / f"v{i}"
        shutil.copytree(adapter_dirs[0], variant)
        (variant / "README.md").write_text(f"variant {i}")
        registry.push(variant, "support", "tiny")
    registry.promote("support@1", "prod")
    return registry


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _state(registry: Registry) -> tuple[int, tuple[int, int] | None]:
    record = registry.alias_records("support")["prod"]
    return record.version, (record.split.version, record.split.weight) if record.split else None


def test_a_rollout_splits_then_completes_and_rollbacks_undo_each_step(support: Registry) -> None:
    support.promote("support@2", "prod", weight=10)
    assert _state(support) == (1, (2, 10))
    assert support.resolve("support:prod").version == 1  # plain resolution: the alias's own version
    support.promote("support@2", "prod", weight=50)
    support.promote("support@2", "prod", weight=100)
    assert _state(support) == (2, None)
    support.rollback("support", "prod")
    assert _state(support) == (1, (2, 50))  # the state before the last move
    support.rollback("support", "prod")
    assert _state(support) == (1, (2, 10))
    support.rollback("support", "prod")
    assert _state(support) == (1, None)
    support.promote("support@3", "prod", weight=5)
    support.promote("support@3", "prod", weight=0)  # stopped
    assert _state(support) == (1, None)


def test_resolve_split_names_both_versions(support: Registry) -> None:
    support.promote("support@3", "prod", weight=25)
    resolution = support.resolve_split("support:prod")
    assert (resolution.current.ref, resolution.candidate and resolution.candidate.ref) == ("support@1", "support@3")
    assert resolution.weight == 25
    assert support.resolve_split("support@2") == Resolution("support@2", support.resolve("support@2"))


def test_a_split_is_sticky_per_key_near_its_weight_and_independent_per_alias(support: Registry) -> None:
    support.promote("support@2", "prod", weight=10)
    resolution = support.resolve_split("support:prod")
    picks = [resolution.pick(f"key-{i}").version for i in range(4000)]
    assert 0.08 <= picks.count(2) / len(picks) <= 0.12
    assert {resolution.pick("caller-7").version for _ in range(50)} == {resolution.pick("caller-7").version}
    again = support.resolve_split("support:prod")  # another gateway replica reading the same record
    assert [again.pick(f"key-{i}").version for i in range(4000)] == picks
    # the same keys on another alias fall elsewhere: a caller is not the canary of every rollout at once
    same = sum(split_bucket("support:prod", f"k{i}") == split_bucket("support:canary", f"k{i}") for i in range(1000))
    assert same < 50


@pytest.mark.parametrize(
    ("ref", "alias", "weight", "message"),
    [
        (
            "support@2",
            "canary",
            10,
            "support:canary does not exist yet: promote a version to it without --weight first",
        ),
        ("support@1", "prod", 10, "support@1 is already support:prod; a weight is for another version"),
        ("support@2", "prod", 0, "support:prod has no rollout of support@2 to stop"),
        ("support@2", "prod", 101, "a weight is a percentage of the alias's requests, 0-100, not 101"),
        ("support@2", "prod", -1, "a weight is a percentage of the alias's requests, 0-100, not -1"),
    ],
)
def test_bad_rollout_moves_are_refused_and_change_nothing(
    support: Registry, ref: str, alias: str, weight: int, message: str
) -> None:
    before = support.alias_records("support")
    with pytest.raises((ConflictError, ValidationError)) as info:
        support.promote(ref, alias, weight=weight)
    assert str(info.value) == message
    assert support.alias_records("support") == before


def test_a_second_rollout_waits_for_the_first(support: Registry) -> None:
    support.promote("support@2", "prod", weight=10)
    with pytest.raises(ConflictError) as info:
        support.promote("support@3", "prod", weight=10)
    assert str(info.value) == (
        "support:prod is rolling out support@2 (10%); complete it (--weight 100) or roll it back first"
    )
    support.promote("support@3", "prod")  # a plain promote still moves it (and ends the rollout)
    assert _state(support) == (3, None)


def test_a_version_in_a_rollout_cannot_be_removed(support: Registry) -> None:
    support.promote("support@3", "prod", weight=10)
    with pytest.raises(ConflictError) as info:
        support.remove("support@3", force=True)
    assert str(info.value) == "support@3 is the target of alias prod; promote another version there first"
    support.promote("support@3", "prod", weight=0)
    with pytest.raises(ConflictError) as reached:  # a rollback would restore that rollout
        support.remove("support@3")
    assert "the next `loragate registry rollback support --alias prod` would go back to it" in str(reached.value)


def test_the_cli_rolls_out_shows_and_audits(support: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    loc = ["--registry", support.location]
    assert _run(capsys, "promote", "support@2", "--alias", "prod", "--weight", "10", "--who", "ana", *loc) == (
        0,
        "support:prod -> support@1 (90%), support@2 (10%)\n",
        "",
    )
    code, out, _ = _run(capsys, "aliases", "support", *loc)
    assert code == 0 and out.splitlines()[0] == "support:prod -> support@1 (90%), support@2 (10%)"
    assert out.splitlines()[-1].endswith(" promote 1 -> 1 + 2 at 10% by ana")
    code, out, _ = _run(capsys, "aliases", "support", "--json", *loc)
    assert json.loads(out)["prod"]["split"] == {"version": 2, "weight": 10}
    assert _run(capsys, "rollback", "support", "--alias", "prod", *loc)[:2] == (0, "support:prod -> support@1\n")
    code, _, err = _run(capsys, "promote", "support@2", "--alias", "prod", "--weight", "150", *loc)
    assert (code, err) == (2, "error: a weight is a percentage of the alias's requests, 0-100, not 150\n")
    promotes = [e for e in AuditLog(store=support.store).read() if e["action"] == "registry.promote"]
    assert [(e["who"], e["result"], e["details"].get("weight"), e["details"].get("serves")) for e in promotes][-2:] == [
        ("ana", "ok", 10, "support@1 (90%), support@2 (10%)"),
        (promotes[-1]["who"], "error", 150, None),
    ]
