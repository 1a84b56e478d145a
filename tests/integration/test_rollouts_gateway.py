"""Rollouts on the real engines (the session gateway: two vLLM CPU engines): a rollout policy that stops a candidate
breaking its contract by itself, audited, and unloads it; shadow traffic whose agreement metric tells an identical
candidate from a differing one while the caller never sees or pays for the copy."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.gateway import GatewayUnderTest
from tests.harness import wait_until

pytestmark = pytest.mark.integration

PROMPTS = ["Hello there", "Once upon a time", "The weather today", "Tell me a story"]


def client(gw: GatewayUnderTest) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=120)


def promote(gw: GatewayUnderTest, **body: Any) -> dict[str, Any]:
    moved = httpx.post(f"{gw.url}/admin/aliases/promote", json=body, timeout=120)
    assert moved.status_code == 200, moved.text
    answer: dict[str, Any] = moved.json()
    return answer


def resident(gw: GatewayUnderTest, lora_name: str) -> list[str]:
    return sorted(e["id"] for e in gw.engines() if lora_name in [r["engine_name"] for r in e["resident"]])


def keys_for(gw: GatewayUnderTest, ref: str, version: int, count: int) -> list[str]:
    """Split keys (x-loragate-split-key values) the alias `ref` sends to `version` now."""
    picks = gw.registry.resolve_split(ref)
    return [key for key in (f"k{i}" for i in range(400)) if picks.pick(f"header:{key}").version == version][:count]


def test_a_candidate_breaking_its_contract_is_rolled_back_by_the_gateway_audited_and_unloaded(
    gateway: GatewayUnderTest, adapter_dirs: list[Path]
) -> None:
    """ro@2 answers break its contract (40 letters cannot fit in the callers' 4 tokens): with a policy of at least
    90% valid answers over 3 requests, the gateway sets its weight back to 0 by itself within the policy window,
    the stop is in the alias history and the audit log with its figures, counted, and ro@2 is unloaded."""
    reg = gateway.registry
    good = reg.push(adapter_dirs[0], "ro", "tiny", contract={"regex": "[a-z ]+"})
    bad = reg.push(adapter_dirs[1], "ro", "tiny", contract={"regex": "[a-z]{40}"})
    reg.promote(good.ref, "live")
    policy = {"min_contract_validity": 0.9, "window_s": 120, "min_requests": 3}
    moved = promote(gateway, ref=bad.ref, alias="live", weight=50, policy=policy)
    assert moved["split"] == {"version": 2, "weight": 50, "policy": policy}
    card = client(gateway).models.retrieve("ro:live").model_dump()
    assert card["split"]["policy"]["min_contract_validity"] == 0.9

    def ask(key: str) -> httpx.Response:
        answer = httpx.post(
            f"{gateway.base_url}/chat/completions",
            json={"model": "ro:live", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                  "temperature": 0},
            headers={"x-loragate-split-key": key},
            timeout=120,
        )  # fmt: skip
        assert answer.status_code == 200, answer.text
        return answer

    canaries, stays = keys_for(gateway, "ro:live", 2, 3), keys_for(gateway, "ro:live", 1, 2)
    for key in stays:
        answer = ask(key)
        assert (answer.headers["x-loragate-adapter"], answer.headers["x-loragate-output-valid"]) == (good.ref, "true")
    for key in canaries:
        answer = ask(key)
        assert (answer.headers["x-loragate-adapter"], answer.headers["x-loragate-output-valid"]) == (bad.ref, "false")

    def stopped() -> bool:
        return reg.alias_records("ro")["live"].split is None

    wait_until(stopped, policy["window_s"], "the gateway stopping ro@2's rollout", interval_s=0.2)
    move = reg.alias_records("ro")["live"].history[-1]
    assert move.who.startswith("gateway:") and (move.from_version, move.to_version, move.to_split) == (1, 1, None)
    assert move.reason == "contract validity 0.0% < 90.0% (3 answers checked) over 3 requests in 120s"
    stops = [e for e in gateway.state.security.audit.read() if e["action"] == "registry.rollout_stop"]
    assert [(e["who"], e["target"], e["result"]) for e in stops] == [(move.who, "ro:live", "ok")]
    figures = stops[0]["details"]["figures"]
    assert (figures["candidate"]["requests"], figures["candidate"]["contract_validity"]) == (3, 0.0)
    assert (figures["current"]["requests"], figures["current"]["contract_validity"]) == (2, 1.0)
    assert gateway.metric("loragate_rollout_rollbacks_total", alias="ro:live", version="2") == 1
    assert gateway.metric("loragate_rollout_rollbacks_total", reason="contract_validity") == 1
    # every caller is back on ro@1, and ro@2, which no alias serves now, is unloaded where it was
    assert {ask(key).headers["x-loragate-adapter"] for key in canaries} == {good.ref}
    wait_until(lambda: not resident(gateway, bad.engine_name), 60, "ro@2 unloaded", interval_s=0.2)
    assert resident(gateway, good.engine_name)


def test_a_version_that_loses_its_weight_is_unloaded_unless_another_alias_serves_it(
    gateway: GatewayUnderTest, adapter_dirs: list[Path]
) -> None:
    reg = gateway.registry
    first, second = reg.push(adapter_dirs[0], "wz", "tiny"), reg.push(adapter_dirs[1], "wz", "tiny")
    reg.promote(first.ref, "live")
    reg.promote(second.ref, "other")  # wz@2 is served under wz:other as well
    assert chat(gateway, "wz:live") and chat(gateway, "wz:other")
    promote(gateway, ref=second.ref, alias="live", weight=10)
    holders = resident(gateway, second.engine_name)
    assert holders
    assert promote(gateway, ref=second.ref, alias="live", weight=0)["unloaded"] == {second.ref: []}
    assert resident(gateway, second.engine_name) == holders  # wz:other still serves it
    assert promote(gateway, ref=first.ref, alias="other")["unloaded"] == {second.ref: holders}
    assert resident(gateway, second.engine_name) == [] and resident(gateway, first.engine_name)
    assert promote(gateway, ref=first.ref, alias="other")["unloaded"] == {}  # a move that takes nothing away
    # a stop made elsewhere (the CLI, another replica): this gateway's next look at the alias unloads it too
    promote(gateway, ref=second.ref, alias="live", weight=10)
    chat(gateway, "wz:live")  # this gateway has seen the split
    assert resident(gateway, second.engine_name)
    reg.promote(second.ref, "live", weight=0)

    def unloaded_after_a_request() -> bool:
        chat(gateway, "wz:live")  # a request after the resolver's TTL refreshes the alias and finds wz@2 gone
        return not resident(gateway, second.engine_name)

    wait_until(unloaded_after_a_request, 60, "wz@2 unloaded after the CLI's stop", interval_s=0.5)


def chat(gw: GatewayUnderTest, model: str, **kw: Any) -> str:
    reply = client(gw).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=4, temperature=0, **kw
    )
    return reply.choices[0].message.content or ""


def test_shadow_agreement_is_1_for_the_same_weights_and_moves_for_others_and_the_caller_never_sees_or_pays(
    gateway: GatewayUnderTest, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    """sh:live on sh@1 shadowed at 100% by sh@3 (sh@1's weights pushed again) and then by sh@2 (other weights): the
    agreement ratio stays 1, then counts exactly the prompts whose greedy answers differ on the two versions, asked
    directly; the callers get sh@1's answers, streamed or not, and only their own tokens are counted."""
    reg = gateway.registry
    same = tmp_path / "same"
    shutil.copytree(adapter_dirs[0], same)
    (same / "README.md").write_text("sh@1's weights, pushed again")
    one, other, twin = (reg.push(d, "sh", "tiny") for d in (adapter_dirs[0], adapter_dirs[1], same))
    reg.promote(one.ref, "live")
    body: dict[str, Any] = {"max_tokens": 8, "temperature": 0}

    def direct(ref: str, prompt: str) -> str:
        return client(gateway).completions.create(model=ref, prompt=prompt, **body).choices[0].text

    def tokens(version: int) -> float:
        return gateway.metric("loragate_completion_tokens_total", adapter="sh", version=str(version))

    def requests(version: int) -> float:
        return gateway.metric("loragate_requests_total", adapter="sh", version=str(version))

    def shadowed(shadow: int, outcome: str) -> float:
        return gateway.metric("loragate_shadow_requests_total", alias="sh:live", shadow=str(shadow), outcome=outcome)

    answers = {p: direct(one.ref, p) for p in PROMPTS}
    differing = sum(answers[p] != direct(other.ref, p) for p in PROMPTS)
    assert differing >= 1  # the premise: two random adapters differ at temperature 0 on some of these prompts
    assert all(answers[p] == direct(twin.ref, p) for p in PROMPTS)  # and the same weights never do

    for shadow, expect_differ in ((twin, 0), (other, differing)):
        moved = promote(gateway, ref=one.ref, alias="live", shadow=shadow.ref, shadow_percent=100)
        assert moved["shadow"] == {"version": shadow.version, "percent": 100}
        assert client(gateway).models.retrieve("sh:live").model_dump()["shadow"] == {
            "version": shadow.ref,
            "percent": 100,
        }
        before_tokens, before_shadow_requests = tokens(1), requests(shadow.version)
        paid = 0
        for i, prompt in enumerate(PROMPTS):
            if i % 2:  # a streamed caller: its copy goes out whole
                chunks = list(client(gateway).completions.create(model="sh:live", prompt=prompt, stream=True,
                              stream_options={"include_usage": True}, **body))  # fmt: skip
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                usage = chunks[-1].usage
            else:
                raw = client(gateway).completions.with_raw_response.create(model="sh:live", prompt=prompt, **body)
                assert raw.headers["x-loragate-adapter"] == one.ref
                text, usage = raw.parse().choices[0].text, raw.parse().usage
            assert text == answers[prompt]  # the caller's answer is its version's, never the shadow's
            assert usage is not None
            paid += usage.completion_tokens

        def compared(version: int = shadow.version) -> float:
            return shadowed(version, "agree") + shadowed(version, "differ")

        wait_until(lambda: compared() == len(PROMPTS), 120, f"{len(PROMPTS)} shadow copies to {shadow.ref} compared")
        assert shadowed(shadow.version, "differ") == expect_differ
        ratio = gateway.metric(
            "loragate_shadow_agreement_ratio", alias="sh:live", current="1", shadow=str(shadow.version)
        )
        assert ratio == (len(PROMPTS) - expect_differ) / len(PROMPTS)
        # the callers paid for their own tokens only; the shadow's calls are no requests of theirs
        assert tokens(1) - before_tokens == paid
        assert requests(shadow.version) == before_shadow_requests
        assert gateway.metric(
            "loragate_shadow_latency_seconds_count", alias="sh:live", shadow=str(shadow.version)
        ) == len(PROMPTS)
    stopped = promote(gateway, ref=one.ref, alias="live", shadow_percent=0)
    assert (stopped["shadow"], stopped["serves"]) == (None, "sh@1")


@pytest.fixture(scope="module")
def bd(gateway: GatewayUnderTest, adapter_dirs: list[Path]) -> None:
    """bd@1 on bd:live, bd@2 beside it (never served: the refused moves below)."""
    for adapter in adapter_dirs:
        gateway.registry.push(adapter, "bd", "tiny")
    gateway.registry.promote("bd@1", "live")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"ref": "bd@2", "weight": 10, "policy": {"max_error_ratio": 2}},
            "invalid alias 'bd@2': a rollout policy's max error ratio is a fraction, 0-1, not 2",
        ),
        (
            {"ref": "bd@2", "policy": {"min_contract_validity": 0.9}},
            "invalid alias 'bd@2': a rollout policy watches a candidate: it needs a weight of 1-99",
        ),
        (
            {"ref": "bd@2", "weight": 10, "policy": {"window_s": 60}},
            "invalid alias 'bd@2': a rollout policy needs a rule: a max error ratio, a max p99 TTFT ratio or a min "
            "contract validity",
        ),
        (
            {"ref": "bd@2", "weight": 10, "policy": {"min_requests": "many"}},
            "policy.min_requests: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            {"ref": "bd@2", "weight": 10, "policy": {"max_error_rate": 0.02}},
            "policy.max_error_rate: Extra inputs are not permitted",
        ),
        (
            {"ref": "bd@1", "shadow": "bd@2"},
            "`shadow` needs `shadow_percent` (the share of the alias's requests to copy)",
        ),
        ({"ref": "bd@1", "shadow_percent": 5}, "`shadow_percent` needs `shadow` (0 alone stops the alias's shadow)"),
        (
            {"ref": "bd@1", "shadow": "bd@2", "shadow_percent": 101},
            "shadow_percent: Input should be less than or equal to 100",
        ),
    ],
)
def test_bad_rollout_requests_get_one_line_400s_and_change_nothing(
    gateway: GatewayUnderTest, bd: None, body: dict[str, Any], message: str
) -> None:
    reg = gateway.registry
    before = reg.alias_records("bd")
    refused = httpx.post(f"{gateway.url}/admin/aliases/promote", json={"alias": "live", **body}, timeout=30)
    assert (refused.status_code, refused.json()["error"]["message"]) == (400, message)
    assert reg.alias_records("bd") == before
