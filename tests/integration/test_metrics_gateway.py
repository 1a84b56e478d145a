"""Per-adapter metrics and usage events through the real gateway and real vLLM (CPU) engines.

Traffic goes through the official `openai` client; `/metrics` is scraped over loopback HTTP and parsed with
prometheus_client's parser. The adapters here are pushed under names no other test uses, so their series start at
zero; shared series (base model, `other`) are compared before and after.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.gateway import GatewayUnderTest, derive_adapter
from tests.harness import wait_until

pytestmark = pytest.mark.integration

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]
EXACT = {"ignore_eos": True}  # every completion is exactly max_tokens long


class Scrape:
    """One parsed `/metrics` answer: sample values by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [ls for n, ls, _ in self.samples if n == name]


def scrape(gateway: GatewayUnderTest) -> Scrape:
    response = httpx.get(f"{gateway.url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


@pytest.fixture(scope="module")
def client(gateway: GatewayUnderTest) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=300)


def push_fresh(gateway: GatewayUnderTest, adapter_dirs: list[Path], root: Path, prefix: str, count: int) -> list[str]:
    names = []
    for i in range(count):
        name = f"{prefix}-{i}"
        manifest = gateway.registry.push(derive_adapter(adapter_dirs[i % 2], root / name, seed=600 + i), name, "tiny")
        assert manifest.version == 1
        names.append(name)
    return names


@pytest.fixture(scope="module")
def obs_adapters(
    gateway: GatewayUnderTest, adapter_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    """Two fresh adapters `obs-0`, `obs-1` (version 1) for the request counters."""
    return push_fresh(gateway, adapter_dirs, tmp_path_factory.mktemp("obs"), "obs", 2)


@pytest.fixture(scope="module")
def evict_adapters(
    gateway: GatewayUnderTest, adapter_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    """Five fresh adapters `obs-lru-0` .. `obs-lru-4`, never requested before the eviction test."""
    return push_fresh(gateway, adapter_dirs, tmp_path_factory.mktemp("obs-lru"), "obs-lru", 5)


@pytest.fixture
def usage_lines(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The usage events the gateway logged during the test so far."""
    with caplog.at_level(logging.INFO, logger="gateway.usage"):
        yield lambda: [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.usage"]


def test_counters_per_adapter_equal_what_the_client_saw(
    gateway: GatewayUnderTest,
    client: openai.OpenAI,
    obs_adapters: list[str],
    usage_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    a, b = obs_adapters[0], obs_adapters[1]
    prompt = completion = 0
    request_ids = []
    for max_tokens in (3, 5):
        raw = client.chat.completions.with_raw_response.create(
            model=a, messages=MESSAGES, max_tokens=max_tokens, temperature=0, extra_body=EXACT
        )
        reply = raw.parse()
        assert reply.usage is not None and reply.usage.completion_tokens == max_tokens
        prompt += reply.usage.prompt_tokens
        completion += reply.usage.completion_tokens
        request_ids.append(raw.headers["x-request-id"])
    stream = client.chat.completions.create(
        model=a,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    streamed_usage = None
    for chunk in stream:
        if chunk.usage is not None:
            streamed_usage = chunk.usage
    assert streamed_usage is not None and streamed_usage.completion_tokens == 6
    prompt += streamed_usage.prompt_tokens
    completion += streamed_usage.completion_tokens
    done = client.completions.create(model=b, prompt="Once upon", max_tokens=4, temperature=0, extra_body=EXACT)
    assert done.usage is not None

    m = scrape(gateway)
    ok = {"status_class": "2xx", "error_code": ""}
    av = {"adapter": a, "version": "1"}
    assert m.value("loragate_requests_total", **av, route="chat", **ok) == 3
    assert m.value("loragate_requests_total", **av) == 3
    assert m.value("loragate_prompt_tokens_total", **av) == prompt
    assert m.value("loragate_completion_tokens_total", **av) == completion == 3 + 5 + 6
    assert m.value("loragate_request_duration_seconds_count", **av, route="chat") == 3
    assert m.value("loragate_queue_wait_seconds_count", **av) == 3
    assert m.value("loragate_time_to_first_token_seconds_count", **av) == 1  # only the streamed one
    assert m.value("loragate_time_to_first_token_seconds_sum", **av) > 0
    assert m.value("loragate_time_per_output_token_seconds_count", **av) == 1
    assert m.value("loragate_structured_outputs_total", **av, result="none") == 3

    bv = {"adapter": b, "version": "1"}
    assert m.value("loragate_requests_total", **bv, route="completions", **ok) == 1
    assert m.value("loragate_requests_total", **bv, route="chat") == 0
    assert m.value("loragate_prompt_tokens_total", **bv) == done.usage.prompt_tokens
    assert m.value("loragate_completion_tokens_total", **bv) == done.usage.completion_tokens == 4
    assert m.value("loragate_time_to_first_token_seconds_count", **bv) == 0

    # no request id or user text leaks into a label
    for name, labels, _ in m.samples:
        values = set(labels.values())
        assert not values & set(request_ids), name
        assert "Say something." not in values, name

    events = [e for e in usage_lines() if e["adapter"] in (a, b)]
    assert [e["model"] for e in events] == [f"{a}@1"] * 3 + [f"{b}@1"]
    assert [e["request_id"] for e in events[:2]] == request_ids
    assert sum(e["prompt_tokens"] for e in events[:3]) == prompt
    assert [e["completion_tokens"] for e in events] == [3, 5, 6, 4]
    assert [e["stream"] for e in events] == [False, False, True, False]
    assert all(e["status"] == 200 and e["latency_s"] > 0 for e in events)


def test_base_model_errors_and_unknown_names(gateway: GatewayUnderTest, client: openai.OpenAI) -> None:
    before = scrape(gateway)
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=2, temperature=0, extra_body=EXACT
    )
    assert reply.usage is not None
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="obs-no-such-adapter", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # vLLM's own 400, passed through
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1000)  # > max_model_len 512
    # a stream without stream_options: the client sees no usage chunk, the gateway still meters the tokens
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=7, temperature=0, stream=True, extra_body=EXACT
        )
    )
    assert chunks and all(chunk.usage is None and chunk.choices for chunk in chunks)
    after = scrape(gateway)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    base = {"adapter": "", "version": ""}
    assert delta("loragate_requests_total", **base, route="chat", status_class="2xx", error_code="") == 2
    assert delta("loragate_requests_total", **base, status_class="4xx", error_code="upstream_error") == 1
    assert delta("loragate_prompt_tokens_total", **base) == 2 * reply.usage.prompt_tokens  # same prompt twice
    assert delta("loragate_completion_tokens_total", **base) == 2 + 7
    assert delta("loragate_time_to_first_token_seconds_count", **base) == 1
    missing = {"adapter": "other", "version": "", "status_class": "4xx", "error_code": "model_not_found"}
    assert delta("loragate_requests_total", **missing) == 1
    assert not any(ls.get("adapter") == "obs-no-such-adapter" for _, ls, _ in after.samples)


def test_lru_eviction_is_counted_per_engine(
    gateway: GatewayUnderTest, client: openai.OpenAI, evict_adapters: list[str]
) -> None:
    """5 new adapters on 2 engines x 2 slots: one engine takes >= 3 of them, so LRU must evict.

    Per engine e that took k new adapters with f free slots before: k loads, max(0, k - f) evictions in all
    (older adapters go first), max(0, k - usable slots) of them ours.
    """
    gateway.wait_engines_healthy()
    pinned = {e["id"]: sum(1 for r in e["resident"] if r.get("pinned")) for e in gateway.engines()}
    before = scrape(gateway)
    placed: dict[str, list[str]] = {}
    for name in evict_adapters:
        raw = client.chat.completions.with_raw_response.create(
            model=name, messages=MESSAGES, max_tokens=1, temperature=0
        )
        placed.setdefault(raw.headers["x-loragate-engine"], []).append(name)
    after = scrape(gateway)
    assert max(len(names) for names in placed.values()) >= 3

    engines = {ls["engine"] for ls in after.labelsets("loragate_engine_up")}
    assert set(placed) <= engines and len(engines) == 2
    ours_evicted = 0.0
    for engine in engines:
        names = placed.get(engine, [])
        k, free = len(names), before.value("loragate_engine_free_adapter_slots", engine=engine)
        assert after.value("loragate_engine_adapter_slots", engine=engine) == 2
        loads = [after.value("loragate_adapter_loads_total", engine=engine, adapter=n, version="1") for n in names]
        assert loads == [1] * k
        assert [after.value("loragate_adapter_load_seconds_count", engine=engine, adapter=n) for n in names] == loads
        evictions = after.value("loragate_adapter_evictions_total", engine=engine) - before.value(
            "loragate_adapter_evictions_total", engine=engine
        )
        assert evictions == max(0, k - free), (engine, k, free)
        usable = 2 - pinned[engine]  # pinned adapters are never evicted
        ours = [after.value("loragate_adapter_evictions_total", engine=engine, adapter=n) for n in names]
        assert ours == [1] * max(0, k - usable) + [0] * min(k, usable)  # the oldest of ours go first
        resident = [after.value("loragate_adapter_resident", engine=engine, adapter=n, version="1") for n in names]
        assert resident == [0] * max(0, k - usable) + [1] * min(k, usable)
        assert after.value("loragate_engine_free_adapter_slots", engine=engine) == max(0, free - k)
        assert after.value("loragate_engine_up", engine=engine) == 1
        assert after.value("loragate_engine_inflight_requests", engine=engine) == 0
        ours_evicted += sum(ours)
    assert ours_evicted == sum(max(0, len(names) - 2 + pinned[e]) for e, names in placed.items()) >= 1

    # the tier comes from vLLM's lora_requests_info, read by the supervisor's next /metrics probe
    def known_tiers() -> set[str]:
        tiers = {
            ls["tier"]
            for n, ls, v in scrape(gateway).samples
            if n == "loragate_adapter_resident" and ls["adapter"] in evict_adapters and v > 0
        }
        return tiers if "unknown" not in tiers else set()

    assert wait_until(known_tiers, 60, "a known tier for each resident adapter", interval_s=0.5) <= {"gpu", "cpu"}
