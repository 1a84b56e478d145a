"""Rollouts on an alias (`promote --weight`): the split lives in the alias record, moves are audited and undone by
rollback like any other, the split is deterministic per key and close to its weight, and bad moves are refused with
one line and change nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapters_registry.aliases import Resolution, describe_state, split_bucket
from adapters_registry.audit import AuditLog
from adapters_registry.errors import ConflictError, ValidationError
from adapters_registry.manifest import AliasShadow, AliasSplit, RolloutPolicy
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


# ---- rollout policies, automatic stops, shadows ----------------------------------------------------------------------
POLICY = RolloutPolicy(max_error_ratio=0.02, min_contract_validity=0.99, window_s=60, min_requests=10)


def test_a_policy_rides_with_its_rollout_and_a_stop_is_a_compare_and_swap_one_replica_wins(support: Registry) -> None:
    support.audit = AuditLog(store=support.store).registry_hook("test")
    support.promote("support@2", "prod", weight=10, policy=POLICY)
    support.promote("support@2", "prod", weight=30)  # a later weight keeps the policy
    record = support.alias_records("support")["prod"]
    assert record.split is not None and record.split.policy == POLICY
    assert support.resolve_split("support:prod").policy == POLICY
    figures = {"requests": 12, "contract_validity": 0.0}
    stopped = support.stop_rollout("support", "prod", 2, "gateway:a", "contract validity 0% < 99%", figures)
    again = support.stop_rollout("support", "prod", 2, "gateway:b", "contract validity 0% < 99%", figures)
    assert stopped is not None and (stopped.version, stopped.split) == (1, None) and again is None
    move = support.alias_records("support")["prod"].history[-1]
    assert (move.who, move.reason, move.from_split, move.to_split) == (
        "gateway:a",
        "contract validity 0% < 99%",
        AliasSplit(version=2, weight=30, policy=POLICY),
        None,
    )
    stops = [e for e in AuditLog(store=support.store).read() if e["action"] == "registry.rollout_stop"]
    assert [(e["who"], e["result"], e["details"]["reason"], e["details"]["figures"]) for e in stops] == [
        ("gateway:a", "ok", "contract validity 0% < 99%", figures),
        ("gateway:b", "already_done", "contract validity 0% < 99%", figures),
    ]
    support.rollback("support", "prod")  # a person can still restore the rollout the gateway stopped
    assert _state(support) == (1, (2, 30))


@pytest.mark.parametrize(
    ("policy", "weight", "message"),
    [
        (POLICY, None, "a rollout policy watches a candidate: it needs a weight of 1-99"),
        (POLICY, 100, "a rollout policy watches a candidate: it needs a weight of 1-99"),
        (RolloutPolicy(max_error_ratio=2), 10, "a rollout policy's max error ratio is a fraction, 0-1, not 2"),
        (
            RolloutPolicy(min_contract_validity=-0.5),
            10,
            "a rollout policy's min contract validity is a fraction, 0-1, not -0.5",
        ),
        (RolloutPolicy(max_ttft_ratio=0), 10, "a rollout policy's max TTFT ratio must be above 0, not 0"),
        (RolloutPolicy(max_ttft_ratio=2, window_s=0), 10, "a rollout policy's window must be above 0 seconds, not 0"),
        (
            RolloutPolicy(max_ttft_ratio=2, min_requests=0),
            10,
            "a rollout policy judges after at least 1 request, not 0",
        ),
        (
            RolloutPolicy(),
            10,
            "a rollout policy needs a rule: a max error ratio, a max p99 TTFT ratio or a min contract validity",
        ),
    ],
)
def test_bad_policies_are_refused_and_change_nothing(
    support: Registry, policy: RolloutPolicy, weight: int | None, message: str
) -> None:
    before = support.alias_records("support")
    with pytest.raises(ValidationError) as info:
        support.promote("support@2", "prod", weight=weight, policy=policy)
    assert str(info.value) == message
    assert support.alias_records("support") == before


def test_a_shadow_is_set_kept_across_weights_dropped_on_its_own_version_and_rolled_back(support: Registry) -> None:
    support.promote("support@1", "prod", shadow=("support@2", 5))
    record = support.alias_records("support")["prod"]
    assert (record.version, record.shadow) == (1, AliasShadow(version=2, percent=5))
    assert describe_state(record) == "support@1; shadow support@2 (5%)"
    resolution = support.resolve_split("support:prod")
    assert resolution.shadow is not None and (resolution.shadow.ref, resolution.shadow_percent) == ("support@2", 5)
    copied = [resolution.shadows(f"req-{i}") for i in range(4000)]
    assert 0.04 <= sum(c is not None for c in copied) / len(copied) <= 0.06
    support.promote("support@3", "prod", weight=10)  # a rollout beside it keeps the shadow
    assert describe_state(support.alias_records("support")["prod"]) == (
        "support@1 (90%), support@3 (10%); shadow support@2 (5%)"
    )
    support.promote("support@1", "prod", shadow=("support@2", 50))  # a shadow change leaves the rollout alone
    assert _state(support) == (1, (3, 10))
    support.promote("support@2", "prod")  # completing to the shadowed version ends the shadow
    assert support.alias_records("support")["prod"].shadow is None
    support.rollback("support", "prod")
    assert support.alias_records("support")["prod"].shadow == AliasShadow(version=2, percent=50)
    with pytest.raises(ConflictError):
        support.remove("support@2")  # a shadowed version is served: not removable
    support.promote("support@1", "prod", shadow=("", 0))
    assert support.alias_records("support")["prod"].shadow is None


def test_the_cli_sets_a_policy_and_a_shadow_and_shows_them(
    support: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    loc = ["--registry", support.location]
    policy = ["--max-error-ratio", "0.02", "--min-contract-validity", "0.99", "--window", "60", "--min-requests", "10"]
    code, out, err = _run(capsys, "promote", "support@2", "--alias", "prod", "--weight", "10", *policy, *loc)
    assert (code, out, err) == (0, "support:prod -> support@1 (90%), support@2 (10%)\n", "")
    shadow = ["--shadow", "support@3", "--shadow-percent", "5"]
    assert _run(capsys, "promote", "support@1", "--alias", "prod", *shadow, *loc)[:2] == (
        0,
        "support:prod -> support@1 (90%), support@2 (10%); shadow support@3 (5%)\n",
    )
    code, out, _ = _run(capsys, "aliases", "support", *loc)
    assert out.splitlines()[1] == "  policy: errors <= 2%, contract >= 99% over 60s (>= 10 requests)"
    shown = json.loads(_run(capsys, "aliases", "support", "--json", *loc)[1])["prod"]
    assert (shown["split"]["policy"]["min_contract_validity"], shown["shadow"]) == (0.99, {"version": 3, "percent": 5})
    for argv, message in (
        (["--weight", "10", "--window", "60"], "--window and --min-requests shape a rollout policy: give a rule too "
         "(--max-error-ratio, --max-ttft-ratio or --min-contract-validity)"),
        (["--shadow", "support@3"], "--shadow needs --shadow-percent (the share of the alias's requests to copy)"),
        (["--shadow-percent", "5"], "--shadow-percent needs --shadow REF (0 alone stops the alias's shadow)"),
        (["--shadow", "support@3", "--shadow-percent", "101"],
         "a shadow percent is a share of the alias's requests, 0-100, not 101"),
    ):  # fmt: skip
        before = support.alias_records("support")
        assert _run(capsys, "promote", "support@1", "--alias", "prod", *argv, *loc) == (2, "", f"error: {message}\n")
        assert support.alias_records("support") == before
