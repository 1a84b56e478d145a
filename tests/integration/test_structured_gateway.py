"""Structured outputs through the gateway against real vLLM (CPU) engines, called with the official openai client.

Schemas use enum/boolean/bounded fields so that the random tiny model finishes in a few tokens.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters_registry.registry import Registry
from tests.fixtures.gateway import GatewayUnderTest

pytestmark = pytest.mark.integration

VERDICT = {
    "type": "object",
    "properties": {"label": {"enum": ["pos", "neg"]}, "ok": {"type": "boolean"}},
    "required": ["label", "ok"],
    "additionalProperties": False,
}
CODE = {
    "type": "object",
    "properties": {"code": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"}, "n": {"type": "integer", "maximum": 9}},
    "required": ["code", "n"],
    "additionalProperties": False,
}
MESSAGES: list[Any] = [{"role": "user", "content": "Classify: the service was quick and friendly."}]
VALID_HEADER = "x-loragate-output-valid"


@pytest.fixture(scope="module")
def client(gateway: GatewayUnderTest) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def contracted(gateway_registry: Registry, adapter_dirs: list[Path]) -> dict[str, str]:
    """Adapters pushed with and without contracts (same weights): their registry names by role."""
    reg = gateway_registry
    reg.push(adapter_dirs[0], "s-code", "tiny", contract=CODE)
    reg.push(adapter_dirs[0], "s-plain", "tiny")
    reg.push(adapter_dirs[0], "s-strict", "tiny", contract={"regex": "[a-z]{40}", "contract_retry": 1})
    reg.push(adapter_dirs[0], "s-strict-once", "tiny", contract={"regex": "[a-z]{40}"})
    return {"code": "s-code", "plain": "s-plain", "retry": "s-strict", "no-retry": "s-strict-once"}


def keeps_schema(text: str | None, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text or ""), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def schema_format(schema: dict[str, Any]) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_request_returns_valid_json(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, max_tokens=40, temperature=0, response_format=schema_format(VERDICT)
    )
    answer = raw.parse()
    content = answer.choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), VERDICT)
    assert answer.choices[0].finish_reason == "stop"
    assert raw.headers[VALID_HEADER] == "true"


def test_contract_applies_without_a_request_constraint(client: openai.OpenAI, contracted: dict[str, str]) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=contracted["code"], messages=MESSAGES, max_tokens=40, temperature=0
    )
    content = raw.parse().choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), CODE)
    assert raw.headers[VALID_HEADER] == "true"
    # The same weights without a contract: nothing constrains the output, nothing is judged.
    plain = client.chat.completions.with_raw_response.create(
        model=contracted["plain"], messages=MESSAGES, max_tokens=40, temperature=0
    )
    assert VALID_HEADER not in plain.headers
    assert not keeps_schema(plain.parse().choices[0].message.content, CODE)


def test_request_constraint_overrides_the_contract(client: openai.OpenAI, contracted: dict[str, str]) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=contracted["code"],
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}},
    )
    assert raw.parse().choices[0].message.content in ("alpha", "beta")
    assert raw.headers[VALID_HEADER] == "true"
    completion = client.completions.create(
        model=contracted["code"], prompt="Code:", max_tokens=10, temperature=0, extra_body={"guided_regex": "[a-c]{3}"}
    )
    assert re.fullmatch("[a-c]{3}", completion.choices[0].text)


def test_guided_json_from_an_old_client_is_translated(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, max_tokens=40, temperature=0, extra_body={"guided_json": VERDICT}
    )
    content = raw.parse().choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), VERDICT)
    assert raw.headers[VALID_HEADER] == "true"


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        (
            {
                "response_format": schema_format(
                    {"type": "object", "properties": {"n": {"type": "integer", "minimum": "0"}}}
                )
            },
            "response_format",
            "response_format: schema is invalid: '0' is not of type 'number' (at properties/n/minimum)",
        ),
        (
            {"extra_body": {"guided_json": {"not": {"type": "string"}}}},
            "guided_json",
            "guided_json: schema is not supported by the structured-generation backend: "
            'Unsupported JSON Schema structure {"not":{"type":"string"}}',
        ),
        (
            {"extra_body": {"structured_outputs": {"regex": "(ab"}}},
            "structured_outputs",
            "structured_outputs: regex does not compile: missing ), unterminated subpattern at position 0",
        ),
    ],
    ids=["invalid schema", "unsupported schema", "invalid regex"],
)
def test_invalid_constraint_is_a_bad_request(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, **kwargs)
    assert info.value.status_code == 400
    assert info.value.code == "invalid_constraint"
    assert info.value.param == param
    assert info.value.body == {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": "invalid_constraint",
    }


def test_streaming_with_a_schema(client: openai.OpenAI, gateway: GatewayUnderTest) -> None:
    def counts() -> tuple[float, float]:  # the base's streamed answers judged valid / not judged
        return structured_count(gateway, "", "valid", ""), structured_count(gateway, "", "none", "")

    def settled(expected: tuple[float, float]) -> bool:  # a stream is judged after the client read its end
        deadline = time.monotonic() + 15
        while counts() != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return counts() == expected

    valid, unjudged = counts()
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        stream=True,
        response_format=schema_format(VERDICT),
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1
    jsonschema.validate(json.loads("".join(pieces)), VERDICT)
    assert settled((valid + 1, unjudged))  # the gateway assembled the stream and checked it against the schema

    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, stream=True)
    assert [chunk for chunk in plain]
    assert settled((valid + 1, unjudged + 1))  # nothing to check: counted as not judged


def engine_requests(gateway: GatewayUnderTest) -> float:
    """Finished requests summed over the gateway's engines, read from vLLM's own /metrics."""
    total = 0.0
    for engine in gateway.engines():
        text = httpx.get(f"{engine['url']}/metrics", timeout=10).text
        total += sum(float(m) for m in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))
    return total


def wait_engine_requests(gateway: GatewayUnderTest, at_least: float, timeout_s: float = 15.0) -> float:
    """vLLM updates its counters just after answering: wait (bounded) until `at_least` requests are counted."""
    deadline = time.monotonic() + timeout_s
    while (total := engine_requests(gateway)) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return total


def structured_count(gateway: GatewayUnderTest, adapter: str, result: str, version: str = "1") -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    wanted = {"adapter": adapter, "version": version, "result": result}
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "loragate_structured_outputs_total" and sample.labels == wanted
    )


@pytest.mark.parametrize(("role", "engine_calls"), [("retry", 2), ("no-retry", 1)])
def test_contract_retry_resends_a_broken_answer_once(
    client: openai.OpenAI, gateway: GatewayUnderTest, contracted: dict[str, str], role: str, engine_calls: int
) -> None:
    name = contracted[role]
    # 40 letters cannot fit in 4 tokens: every answer breaks the contract. The first call also loads the adapter.
    start = engine_requests(gateway)
    client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=4, temperature=0)
    before = wait_engine_requests(gateway, start + engine_calls)
    invalid_before = structured_count(gateway, name, "invalid")
    raw = client.chat.completions.with_raw_response.create(model=name, messages=MESSAGES, max_tokens=4, temperature=0)
    assert raw.headers[VALID_HEADER] == "false"
    assert raw.parse().choices[0].finish_reason == "length"
    assert wait_engine_requests(gateway, before + engine_calls) - before == engine_calls
    assert structured_count(gateway, name, "invalid") - invalid_before == 1
