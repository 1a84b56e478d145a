"""The gateway's side of rollouts: the policy decision (`judge`, table-driven), the watch that stops a rollout on a
real registry (one replica writes, the other reads it done) and the shadow comparison."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from adapters_registry.aliases import Resolution
from adapters_registry.audit import AuditLog
from adapters_registry.manifest import RolloutPolicy
from adapters_registry.registry import Registry
from gateway.call import Call
from gateway.resolver import Resolver
from gateway.rollouts import JUDGE_EVERY_S, Figures, Outcome, RolloutWatch, figures, judge
from gateway.shadow import agreement, choice_texts, greedy

POLICY = RolloutPolicy(max_error_ratio=0.05, max_ttft_ratio=2, min_contract_validity=0.9, window_s=60, min_requests=4)
CLEAN = Figures(requests=10, error_ratio=0.0, judged=10, contract_validity=1.0, p99_ttft_s=0.1)


@pytest.mark.parametrize(
    ("candidate", "current", "rule", "reason"),
    [
        (CLEAN, CLEAN, None, None),
        (Figures(3, 1.0, 3, 0.0, 9.0), CLEAN, None, None),  # 3 < min_requests: not judged yet
        (
            Figures(10, 0.1, 10, 1.0, 0.1),
            CLEAN,
            "error_ratio",
            "error ratio 10.0% > 5.0% over 10 requests in 60s",
        ),
        (
            Figures(10, 0.0, 5, 0.8, 0.1),
            CLEAN,
            "contract_validity",
            "contract validity 80.0% < 90.0% (5 answers checked) over 10 requests in 60s",
        ),
        (Figures(10, 0.0, 0, None, 0.1), CLEAN, None, None),  # no contract to check: validity not judged
        (
            Figures(10, 0.0, 10, 1.0, 0.25),
            CLEAN,
            "ttft_ratio",
            "p99 TTFT 0.250s is 2.50x the current version's 0.100s (> 2x) over 10 requests in 60s",
        ),
        (Figures(10, 0.0, 10, 1.0, 0.2), CLEAN, None, None),  # exactly 2x: within the policy
        (Figures(10, 0.0, 10, 1.0, 9.0), Figures(0, 0.0, 0, None, None), None, None),  # nothing to compare with
        (Figures(10, 0.5, 10, 0.0, 9.0), CLEAN, "error_ratio", "error ratio 50.0% > 5.0% over 10 requests in 60s"),
    ],
)
def test_judge(candidate: Figures, current: Figures, rule: str | None, reason: str | None) -> None:
    breach = judge(POLICY, candidate, current)
    assert (breach.rule if breach else None, breach.reason if breach else None) == (rule, reason)


def test_figures_of_a_window() -> None:
    validity: list[bool | None] = [True, False, None]
    outcomes = [Outcome(float(i), i % 4 == 0, 0.01 * (i + 1) if i % 2 else None, validity[i % 3]) for i in range(8)]
    assert figures(outcomes) == Figures(
        requests=8, error_ratio=0.25, judged=6, contract_validity=3 / 6, p99_ttft_s=0.08
    )
    assert figures([]) == Figures(0, 0.0, 0, None, None)


@pytest.fixture
def rolled_out(registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> Registry:
    """support@1 on support:prod, support@2 rolled out at 50% under a policy of 90% valid answers over 3."""
    for i in range(2):
        variant = tmp_path / f"v{i}"
        shutil.copytree(adapter_dirs[0], variant)
        (variant / "README.md").write_text(f"variant {i}")
        registry.push(variant, "support", "tiny")
    registry.promote("support@1", "prod")
    policy = RolloutPolicy(min_contract_validity=0.9, window_s=60, min_requests=3)
    registry.promote("support@2", "prod", weight=50, policy=policy)
    registry.audit = AuditLog(store=registry.store).registry_hook("test")
    return registry


def _call(rollout: Resolution, version: int, *, valid: bool | None = None, status: int = 200) -> Call:
    """A finished call the alias's rollout (as one gateway resolved it) sent to `support@version`."""
    call = Call("chat", f"r-{version}", status=status, output_valid=valid)
    call.resolved(rollout.current if version == rollout.current.version else rollout.candidate, "x")
    call.rollout = rollout
    return call


def test_two_replicas_find_the_same_breach_one_stops_the_rollout_the_other_reads_it_done(rolled_out: Registry) -> None:
    now = [100.0]
    stopped: list[tuple[str, int]] = []
    counted: list[tuple[str, str, str]] = []

    async def on_stopped(name: str, version: int) -> None:
        stopped.append((name, version))

    def replica(who: str) -> RolloutWatch:
        return RolloutWatch(
            lambda: rolled_out,
            who,
            on_stopped=on_stopped,
            on_rollback=lambda *labels: counted.append(labels),
            clock=lambda: now[0],
        )

    rollout = rolled_out.resolve_split("support:prod")  # both replicas resolved it before either stopped it

    async def serve() -> None:
        a, b = replica("gateway:a"), replica("gateway:b")
        for watch in (a, b):
            watch(_call(rollout, 1, valid=True))
            watch(_call(rollout, 2, valid=False, status=499))  # a hang-up says nothing about the version
            for _ in range(2):
                watch(_call(rollout, 2, valid=False))
            assert not watch._stopping  # two answers are not enough to judge
            watch(_call(rollout, 2, valid=False))
            await asyncio.gather(*watch._stopping.values())

    asyncio.run(serve())
    record = rolled_out.alias_records("support")["prod"]
    assert (record.version, record.split) == (1, None)
    assert [m.who for m in record.history] == [record.history[0].who, record.history[1].who, "gateway:a"]
    stops = [e for e in AuditLog(store=rolled_out.store).read() if e["action"] == "registry.rollout_stop"]
    assert [(e["who"], e["result"]) for e in stops] == [("gateway:a", "ok"), ("gateway:b", "already_done")]
    assert stops[0]["details"]["figures"]["candidate"] == {
        "requests": 3,
        "error_ratio": 0.0,
        "judged": 3,
        "contract_validity": 0.0,
        "p99_ttft_s": None,
    }
    assert counted == [("support:prod", "2", "contract_validity")]  # counted once, by the replica that wrote it
    assert stopped == [("support", 2), ("support", 2)]  # each replica forgets the alias and retires the version


def test_outcomes_older_than_the_window_are_not_judged(rolled_out: Registry) -> None:
    now = [0.0]

    rollout = rolled_out.resolve_split("support:prod")

    async def serve() -> RolloutWatch:
        watch = RolloutWatch(lambda: rolled_out, "gateway:a", clock=lambda: now[0])
        for _ in range(2):
            watch(_call(rollout, 2, valid=False))
        now[0] = 61.0  # past the 60 s window: those two are gone
        watch(_call(rollout, 2, valid=False))
        return watch

    watch = asyncio.run(serve())
    assert not watch._stopping and rolled_out.alias_records("support")["prod"].split is not None


def test_a_judged_alias_is_judged_again_only_after_a_second(rolled_out: Registry) -> None:
    """Once the candidate has `min_requests` calls it is judged at once; after that at most every JUDGE_EVERY_S,
    so a busy rollout does not scan both windows on every call: a breach inside the second waits for the next."""
    now = [0.0]
    rollout = rolled_out.resolve_split("support:prod")

    async def serve() -> RolloutWatch:
        watch = RolloutWatch(lambda: rolled_out, "gateway:a", clock=lambda: now[0])
        for _ in range(3):
            watch(_call(rollout, 2, valid=True))  # judged at the third: clean
        for _ in range(30):
            watch(_call(rollout, 2, valid=False))  # 30 of 33 invalid, all inside the same second: not judged
        assert not watch._stopping
        now[0] = JUDGE_EVERY_S
        watch(_call(rollout, 2, valid=False))
        await asyncio.gather(*watch._stopping.values())
        return watch

    asyncio.run(serve())
    assert rolled_out.alias_records("support")["prod"].split is None


@pytest.mark.parametrize(
    ("primary", "shadow", "as_json", "agree"),
    [
        (["a b"], ["a b"], False, True),
        (["a b"], ["a c"], False, False),
        (['{"a": 1}'], ['{ "a":1 }'], True, True),  # the same parsed JSON
        (['{"a": 1}'], ['{ "a":1 }'], False, False),  # no JSON constraint: the text
        (['{"a": 1'], ['{"a": 1'], True, True),  # cut short, not JSON: compared as text
        (["x", "y"], ["x"], False, False),
        ([None], [None], False, True),
    ],
)
def test_agreement(primary: list[str | None], shadow: list[str | None], as_json: bool, agree: bool) -> None:
    assert agreement(primary, shadow, as_json) is agree


def test_choice_texts_and_greedy() -> None:
    chat = {"choices": [{"index": 1, "message": {"content": "b"}}, {"index": 0, "message": {"content": "a"}}]}
    assert choice_texts(chat) == ["a", "b"]
    assert choice_texts({"choices": [{"index": 0, "text": "t"}]}) == ["t"]
    assert choice_texts({"error": {}}) is None and choice_texts(None) is None
    assert (greedy({"temperature": 0}), greedy({"top_k": 1}), greedy({}), greedy({"temperature": 0.7})) == (
        True,
        True,
        False,
        False,
    )


def test_a_resolver_refresh_reports_the_versions_an_alias_stopped_serving(rolled_out: Registry) -> None:
    dropped: list[tuple[str, int]] = []
    resolver = Resolver(rolled_out, ttl_s=0)
    resolver.on_dropped = lambda name, version: dropped.append((name, version))

    async def look() -> set[int]:
        answer = await resolver.resolve("support:prod")
        await asyncio.gather(*resolver._pending.values())  # the refresh behind the answer
        return answer.versions()

    assert asyncio.run(look()) == {1, 2}
    rolled_out.promote("support@2", "prod", weight=0)  # stopped elsewhere (the CLI, another replica)
    assert asyncio.run(look()) == {1, 2} and dropped == [("support", 2)]  # the stale answer, then the refresh
    assert asyncio.run(look()) == {1} and dropped == [("support", 2)]
