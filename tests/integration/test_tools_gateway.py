"""Tool calling through the gateway against the real vLLM (CPU) engines, with the official openai client.

The shared gateway's engines run with a tool-calling chat template, and `tool_call_parser: auto` picks vLLM's
hermes parser from it. A random tiny model cannot decide to call a tool, but a forced one (a named function or
`tool_choice: "required"`) is constrained by vLLM's structured outputs into the hermes envelope, and a `strict`
tool pins the arguments to its schema. Those grammars allow free whitespace, which a random model emits until
`max_tokens`; the requests push whitespace-only tokens down with `logit_bias` (what a real model needs no help for).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from adapters_registry.registry import Registry
from tests.fixtures.gateway import GatewayUnderTest

pytestmark = pytest.mark.integration

# Small on purpose: the tiny model's byte-level vocabulary spends a token on almost every JSON character, and the
# shared engines' context is 512 tokens.
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER, "strict": True},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}, "strict": True},
    },
]
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(gateway: GatewayUnderTest) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def no_whitespace(tiny_model: Path) -> dict[str, int]:
    """logit_bias that keeps the random model from padding the JSON grammar with whitespace."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
    return {str(i): -100 for i, text in texts.items() if text and not text.strip()}


@pytest.fixture(scope="module")
def tools_adapter(gateway_registry: Registry, adapter_dirs: list[Path]) -> str:
    gateway_registry.push(adapter_dirs[1], "t-tools", "tiny")
    return "t-tools"


def _weather_call(call: Any) -> dict[str, Any]:
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.id
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER)
    return arguments


def test_engines_run_with_the_parser_picked_from_the_chat_template(gateway: GatewayUnderTest) -> None:
    specs = [engine.process.spec for engine in gateway.state.supervisor.engines.values()]
    assert [(s.tool_call_parser, s.enable_auto_tool_choice) for s in specs] == [("hermes", True), ("hermes", True)]


def test_a_named_function_returns_its_tool_call(client: openai.OpenAI, no_whitespace: dict[str, int]) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=96, logit_bias=no_whitespace
    )
    message = reply.choices[0].message
    [call] = message.tool_calls or []
    _weather_call(call)
    assert message.role == "assistant"
    assert message.content in (None, "")  # vLLM 0.32 answers "" where OpenAI answers null
    assert reply.choices[0].finish_reason == "stop"


def test_required_tool_choice_streams_a_tool_call_for_an_adapter(
    client: openai.OpenAI, no_whitespace: dict[str, int], tools_adapter: str
) -> None:
    stream = client.chat.completions.create(
        model=tools_adapter,
        messages=MESSAGES,
        tools=TOOLS[:1],
        tool_choice="required",
        parallel_tool_calls=False,  # "required" may otherwise go on to a second call
        max_tokens=96,
        logit_bias=no_whitespace,
        stream=True,
    )
    names: list[str] = []
    arguments = ""
    ids = set()
    for chunk in stream:
        assert chunk.model.startswith(f"{tools_adapter}@")  # the adapter answered, not the base
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            assert delta_call.index == 0
            if delta_call.id:
                ids.add(delta_call.id)
            if delta_call.function and delta_call.function.name:
                names.append(delta_call.function.name)
            if delta_call.function and delta_call.function.arguments:
                arguments += delta_call.function.arguments
    assert names == ["get_weather"] and len(ids) == 1
    jsonschema.validate(json.loads(arguments), WEATHER)


def test_a_tool_result_goes_back_to_the_model(client: openai.OpenAI, no_whitespace: dict[str, int]) -> None:
    first = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=96, logit_bias=no_whitespace
    )
    [call] = first.choices[0].message.tool_calls or []
    history: list[Any] = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
    ]
    # The default tool_choice with tools is "auto" (LangChain's bind_tools, litellm): the engine must accept it.
    second = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    assert second.choices[0].message.role == "assistant"
    assert second.choices[0].finish_reason == "length"
    assert second.usage is not None and second.usage.completion_tokens == 4
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]
