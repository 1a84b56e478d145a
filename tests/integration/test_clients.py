"""Clients nobody on this project wrote, against the real engine through the gateway: the Responses API (the
official SDK and LangChain), vLLM's own tokenize/detokenize/version/health, by adapter name like chat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.gateway import GatewayUnderTest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def adapter(gateway: GatewayUnderTest, adapter_dirs: list[Path]) -> str:
    gateway.registry.push(adapter_dirs[0], "clients", "tiny")
    return "clients"


def sdk(gateway: GatewayUnderTest) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="none", max_retries=0)


def test_the_responses_api_through_the_sdk_plain_and_streamed(gateway: GatewayUnderTest, adapter: str) -> None:
    before = gateway.metric("loragate_requests_total", route="responses", adapter=adapter)
    tokens_before = gateway.metric("loragate_completion_tokens_total", adapter=adapter)
    raw = sdk(gateway).responses.with_raw_response.create(model=adapter, input="Hello there", max_output_tokens=8)
    response = raw.parse()
    # the tiny model never stops on its own: the answer ends at max_output_tokens ("incomplete", as OpenAI says)
    assert raw.headers["x-loragate-adapter"] == f"{adapter}@1" and response.status in {"completed", "incomplete"}
    assert response.output_text and response.usage is not None and response.usage.output_tokens > 0
    events = list(sdk(gateway).responses.create(model=adapter, input="Hello there", max_output_tokens=8, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] in {"response.completed", "response.incomplete"}
    assert any(kind == "response.output_text.delta" for kind in kinds)
    streamed_usage = events[-1].response.usage  # type: ignore[union-attr]
    assert streamed_usage is not None
    assert gateway.metric("loragate_requests_total", route="responses", adapter=adapter) == before + 2
    tokens = response.usage.output_tokens + streamed_usage.output_tokens
    assert gateway.metric("loragate_completion_tokens_total", adapter=adapter) == tokens_before + tokens
    with pytest.raises(openai.NotFoundError):
        sdk(gateway).responses.create(model="no-such-adapter", input="Hello")


def test_langchain_with_the_responses_api_and_without(gateway: GatewayUnderTest, adapter: str) -> None:
    from langchain_openai import ChatOpenAI

    common: dict[str, Any] = {"base_url": gateway.base_url, "api_key": "none", "max_tokens": 8, "max_retries": 0}
    for use_responses_api in (True, False):
        llm = ChatOpenAI(model=adapter, use_responses_api=use_responses_api, **common)
        message = llm.invoke("Hello there")
        assert message.text, use_responses_api
        assert message.response_metadata.get("model_name", "").startswith(f"{adapter}@"), message.response_metadata


def test_vllms_tokenize_detokenize_version_and_health_pass_through(gateway: GatewayUnderTest, adapter: str) -> None:
    engine = gateway.engines()[0]["url"]
    via = httpx.post(f"{gateway.url}/tokenize", json={"model": adapter, "prompt": "Hello there"}, timeout=60)
    direct = httpx.post(f"{engine}/tokenize", json={"model": "tiny", "prompt": "Hello there"}, timeout=60)
    assert via.status_code == 200 and via.json()["tokens"] == direct.json()["tokens"]
    assert via.headers["x-loragate-adapter"] == f"{adapter}@1"
    back = httpx.post(f"{gateway.url}/detokenize", json={"model": adapter, "tokens": via.json()["tokens"]}, timeout=60)
    assert (
        back.status_code == 200
        and back.json()["prompt"]
        == httpx.post(
            f"{engine}/detokenize", json={"model": "tiny", "tokens": via.json()["tokens"]}, timeout=60
        ).json()["prompt"]
    )
    assert httpx.get(f"{gateway.url}/version", timeout=10).json() == httpx.get(f"{engine}/version", timeout=10).json()
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200
    missing = httpx.post(f"{gateway.url}/tokenize", json={"model": "no-such", "prompt": "x"}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
