"""Pure decisions of gateway.structured: constraint in force, engine form, output checks, retries."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

import pytest

from adapters_registry import AdapterManifest
from gateway.call import Call
from gateway.errors import InvalidRequest
from gateway.hooks import Verdict
from gateway.structured import (
    Constraint,
    InvalidConstraint,
    StructuredOutputs,
    check_output,
    check_text,
    compile_schema,
    prepare_request,
    schema_cache_info,
    should_retry,
)

SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["pos", "neg"]}, "ok": {"type": "boolean"}},
    "required": ["label", "ok"],
    "additionalProperties": False,
}
OTHER = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
SCHEMA_CONTRACT = {"type": "json_schema", "schema": SCHEMA, "contract_retry": 1}
REGEX_CONTRACT = {"type": "regex", "regex": "[a-c]{3}"}

PREPARE: list[
    tuple[str, dict[str, Any], dict[str, Any] | None, dict[str, Any] | None, tuple[str, Any, str, int] | None]
] = [
    ("nothing", {}, None, None, None),
    ("text format, no contract", {"response_format": {"type": "text"}}, None, None, None),
    (
        "response_format json_schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}},
        None,
        {"json": SCHEMA},
        ("json_schema", SCHEMA, "request", 0),
    ),
    (
        "response_format json_object",
        {"response_format": {"type": "json_object"}},
        None,
        {"json_object": True},
        ("json_object", None, "request", 0),
    ),
    (
        "structured_outputs json",
        {"structured_outputs": {"json": SCHEMA}},
        None,
        {"json": SCHEMA},
        ("json_schema", SCHEMA, "request", 0),
    ),
    (
        "structured_outputs json as text",
        {"structured_outputs": {"json": json.dumps(SCHEMA)}},
        None,
        {"json": SCHEMA},
        ("json_schema", SCHEMA, "request", 0),
    ),
    (
        "structured_outputs regex with option",
        {"structured_outputs": {"regex": "[0-9]+", "whitespace_pattern": " ?"}},
        None,
        {"regex": "[0-9]+", "whitespace_pattern": " ?"},
        ("regex", "[0-9]+", "request", 0),
    ),
    (
        "structured_outputs choice",
        {"structured_outputs": {"choice": ["y", "n"]}},
        None,
        {"choice": ["y", "n"]},
        ("choice", ("y", "n"), "request", 0),
    ),
    (
        "structured_outputs grammar",
        {"structured_outputs": {"grammar": 'root ::= "a"'}},
        None,
        {"grammar": 'root ::= "a"'},
        ("grammar", 'root ::= "a"', "request", 0),
    ),
    ("guided_json", {"guided_json": SCHEMA}, None, {"json": SCHEMA}, ("json_schema", SCHEMA, "request", 0)),
    ("guided_regex", {"guided_regex": "a+"}, None, {"regex": "a+"}, ("regex", "a+", "request", 0)),
    (
        "guided_choice",
        {"guided_choice": ["a", "b"]},
        None,
        {"choice": ["a", "b"]},
        ("choice", ("a", "b"), "request", 0),
    ),
    (
        "guided_grammar",
        {"guided_grammar": "root ::= x"},
        None,
        {"grammar": "root ::= x"},
        ("grammar", "root ::= x", "request", 0),
    ),
    (
        "guided_regex with legacy options",
        {"guided_regex": "a+", "guided_whitespace_pattern": " ", "guided_decoding_backend": "outlines"},
        None,
        {"regex": "a+", "whitespace_pattern": " "},
        ("regex", "a+", "request", 0),
    ),
    ("contract applies", {}, SCHEMA_CONTRACT, {"json": SCHEMA}, ("json_schema", SCHEMA, "contract", 1)),
    (
        "text format is no constraint: contract applies",
        {"response_format": {"type": "text"}},
        REGEX_CONTRACT,
        {"regex": "[a-c]{3}"},
        ("regex", "[a-c]{3}", "contract", 0),
    ),
    (
        "choice contract",
        {},
        {"type": "choice", "choice": ["x", "y"]},
        {"choice": ["x", "y"]},
        ("choice", ("x", "y"), "contract", 0),
    ),
    (
        "request schema wins over contract",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": OTHER}}},
        SCHEMA_CONTRACT,
        {"json": OTHER},
        ("json_schema", OTHER, "request", 0),
    ),
    (
        "tool calling: no contract",
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        SCHEMA_CONTRACT,
        None,
        None,
    ),
    (
        "legacy field wins over contract",
        {"guided_choice": ["q"]},
        SCHEMA_CONTRACT,
        {"choice": ["q"]},
        ("choice", ("q",), "request", 0),
    ),
]


@pytest.mark.parametrize(
    ("fields", "contract", "engine_so", "constraint"),
    [c[1:] for c in PREPARE],
    ids=[c[0] for c in PREPARE],
)
def test_prepare_request(
    fields: dict[str, Any],
    contract: dict[str, Any] | None,
    engine_so: dict[str, Any] | None,
    constraint: tuple[str, Any, str, int] | None,
) -> None:
    prepared = prepare_request({**BASE, **fields}, contract)
    plain = {**BASE, **{k: v for k, v in fields.items() if k == "tools"}}
    expected_body = plain if engine_so is None else {**plain, "structured_outputs": engine_so}
    assert prepared.body == expected_body
    if constraint is None:
        assert prepared.constraint is None
    else:
        assert prepared.constraint == Constraint(*constraint)  # type: ignore[arg-type]


def test_prepare_request_leaves_the_input_body_untouched() -> None:
    body = {**BASE, "guided_json": SCHEMA}
    snapshot = json.loads(json.dumps(body))
    prepare_request(body, SCHEMA_CONTRACT)
    assert body == snapshot


REFUSED: list[tuple[str, dict[str, Any], dict[str, Any] | None, str, str]] = [
    (
        "two constraints",
        {"response_format": {"type": "json_object"}, "guided_regex": "a"},
        None,
        "guided_regex",
        "give one output constraint, not response_format and guided_regex",
    ),
    (
        "response_format not object",
        {"response_format": "json"},
        None,
        "response_format",
        "response_format must be an object with a 'type'",
    ),
    (
        "unknown response_format type",
        {"response_format": {"type": "xml"}},
        None,
        "response_format",
        "unsupported response_format type 'xml' (expected text, json_object or json_schema)",
    ),
    (
        "json_schema without schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        None,
        "response_format",
        "response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
    ),
    (
        "invalid schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
        None,
        "response_format",
        "response_format: schema is invalid: 'foo' is not valid under any of the given schemas (at type)",
    ),
    (
        "unsupported schema",
        {"structured_outputs": {"json": {"type": "string", "format": "weird"}}},
        None,
        "structured_outputs",
        "structured_outputs: schema is not supported by the structured-generation backend: "
        "Format weird is not supported by Outlines",
    ),
    (
        "schema text not JSON",
        {"guided_json": "{oops"},
        None,
        "guided_json",
        "guided_json: schema is not valid JSON: "
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    ),
    ("schema not object", {"guided_json": [1]}, None, "guided_json", "guided_json: schema must be a JSON object"),
    (
        "bad regex",
        {"structured_outputs": {"regex": "(ab"}},
        None,
        "structured_outputs",
        "structured_outputs: regex does not compile: missing ), unterminated subpattern at position 0",
    ),
    (
        "empty choice",
        {"guided_choice": []},
        None,
        "guided_choice",
        "guided_choice: choice must be a non-empty list of non-empty strings",
    ),
    (
        "empty grammar",
        {"guided_grammar": " "},
        None,
        "guided_grammar",
        "guided_grammar: grammar must be a non-empty string",
    ),
    (
        "structured_outputs not object",
        {"structured_outputs": []},
        None,
        "structured_outputs",
        "structured_outputs must be an object",
    ),
    (
        "structured_outputs unknown key",
        {"structured_outputs": {"regex": "a", "flavour": 1}},
        None,
        "structured_outputs",
        "unknown structured_outputs key(s): flavour",
    ),
    (
        "structured_outputs two kinds",
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
        None,
        "structured_outputs",
        "structured_outputs needs exactly one of json, json_object, regex, choice, grammar, structural_tag, got 2",
    ),
    (
        "structured_outputs options only",
        {"structured_outputs": {"disable_any_whitespace": True}},
        SCHEMA_CONTRACT,
        "structured_outputs",
        "structured_outputs needs exactly one of json, json_object, regex, choice, grammar, structural_tag, got 0",
    ),
    ("malformed contract", {}, {"type": "xml"}, "model", "the adapter's contract is malformed (type 'xml')"),
]


@pytest.mark.parametrize(
    ("fields", "contract", "param", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_invalid_constraints_are_refused_with_reason(
    fields: dict[str, Any], contract: dict[str, Any] | None, param: str, message: str
) -> None:
    with pytest.raises(InvalidConstraint) as info:
        prepare_request({**BASE, **fields}, contract)
    assert (info.value.message, info.value.param) == (message, param)
    assert (info.value.status, info.value.code, isinstance(info.value, InvalidRequest)) == (
        400,
        "invalid_constraint",
        True,
    )


def test_compiled_schemas_are_cached_by_canonical_json() -> None:
    schema = {"type": "object", "properties": {"cache_probe": {"const": 7}}}
    reordered = {"properties": {"cache_probe": {"const": 7}}, "type": "object"}
    before = schema_cache_info()
    first = compile_schema(schema)
    second = compile_schema(reordered)
    after = schema_cache_info()
    assert first is second
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    assert len(first.digest) == 64


SCHEMA_C = Constraint("json_schema", SCHEMA, "request")
TEXTS: list[tuple[str, Constraint, str | None, bool | None]] = [
    ("schema valid", SCHEMA_C, '{"label":"pos","ok":true}', True),
    ("schema spaced", SCHEMA_C, '{ "label": "neg", "ok": false }', True),
    ("schema wrong enum", SCHEMA_C, '{"label":"meh","ok":true}', False),
    ("schema extra key", SCHEMA_C, '{"label":"pos","ok":true,"x":1}', False),
    ("schema truncated", SCHEMA_C, '{"label":"pos","o', False),
    ("schema no content", SCHEMA_C, None, False),
    ("json_object object", Constraint("json_object", None, "request"), '{"a": [1]}', True),
    ("json_object array", Constraint("json_object", None, "request"), "[1]", False),
    ("regex full match", Constraint("regex", "[a-c]{3}", "request"), "abc", True),
    ("regex partial match", Constraint("regex", "[a-c]{3}", "request"), "abcd", False),
    ("regex backtracking bounded", Constraint("regex", "(x+x+)+y", "request"), "x" * 5000, None),
    ("choice in", Constraint("choice", ("yes", "no"), "request"), "no", True),
    ("choice out", Constraint("choice", ("yes", "no"), "request"), "No", False),
    ("grammar unchecked", Constraint("grammar", "root ::= x", "request"), "x", None),
]


@pytest.mark.parametrize(("constraint", "text", "expected"), [c[1:] for c in TEXTS], ids=[c[0] for c in TEXTS])
def test_check_text(constraint: Constraint, text: str | None, expected: bool | None) -> None:
    assert check_text(text, constraint) is expected


def chat(*contents: str | None) -> dict[str, Any]:
    return {"choices": [{"index": i, "message": {"role": "assistant", "content": c}} for i, c in enumerate(contents)]}


def completion(*texts: str) -> dict[str, Any]:
    return {"choices": [{"index": i, "text": t} for i, t in enumerate(texts)]}


REGEX_C = Constraint("regex", "[a-c]{3}", "contract", 1)
OUTPUTS: list[tuple[str, dict[str, Any], Constraint | None, bool | None]] = [
    ("no constraint", chat("anything"), None, None),
    ("chat valid", chat("abc"), REGEX_C, True),
    ("chat invalid", chat("abz"), REGEX_C, False),
    ("completions valid", completion("cab"), REGEX_C, True),
    ("n=2 one invalid", chat("abc", "zzz"), REGEX_C, False),
    ("n=2 both valid", completion("abc", "bbb"), REGEX_C, True),
    ("no choices", {"choices": []}, REGEX_C, False),
    ("grammar unchecked", chat("x"), Constraint("grammar", "root ::= x", "request"), None),
]


@pytest.mark.parametrize(("response", "constraint", "expected"), [c[1:] for c in OUTPUTS], ids=[c[0] for c in OUTPUTS])
def test_check_output(response: dict[str, Any], constraint: Constraint | None, expected: bool | None) -> None:
    assert check_output(response, constraint) is expected


RETRIES: list[tuple[str, bool | None, Constraint | None, int, bool]] = [
    ("invalid, contract allows one", False, REGEX_C, 0, True),
    ("invalid, retry spent", False, REGEX_C, 1, False),
    ("valid", True, REGEX_C, 0, False),
    ("unchecked", None, REGEX_C, 0, False),
    ("request constraint never retried", False, Constraint("regex", "a", "request", 0), 0, False),
    ("contract without retry", False, Constraint("regex", "a", "contract", 0), 0, False),
    ("no constraint", False, None, 0, False),
]


@pytest.mark.parametrize(
    ("valid", "constraint", "attempt", "expected"), [c[1:] for c in RETRIES], ids=[c[0] for c in RETRIES]
)
def test_should_retry(valid: bool | None, constraint: Constraint | None, attempt: int, expected: bool) -> None:
    assert should_retry(valid, constraint, attempt) is expected


def call_for(contract: dict[str, Any] | None, *, stream: bool = False) -> Call:
    manifest = cast(AdapterManifest, SimpleNamespace(contract=contract)) if contract is not None else None
    return Call("chat", "req-1", stream=stream, model="m", manifest=manifest)


def test_hook_applies_the_contract_and_retries_a_broken_answer_once() -> None:
    hook, call = StructuredOutputs(), call_for(REGEX_CONTRACT | {"contract_retry": 1})
    body = hook.prepare(call, dict(BASE))
    assert body == {**BASE, "structured_outputs": {"regex": "[a-c]{3}"}}
    assert hook.finish(call, body, chat("abz")) == Verdict(False, retry=True)
    assert hook.finish(call, body, chat("abz")) == Verdict(False, retry=False)  # contract_retry 1: once
    assert hook.finish(call_for(None), dict(BASE), chat("abz")) == Verdict(None, retry=False)
    assert hook.prepare(call_for(None), dict(BASE)) == BASE  # nothing to apply: the body goes as it came


@pytest.mark.parametrize(
    ("stream", "extra", "answer", "expected", "retry"),
    [
        (False, {}, chat("abc"), True, False),
        (True, {}, chat("abz"), False, False),  # a stream already reached the client: judged, never retried
        (False, {"echo": True}, completion("Code: abc"), None, False),  # the text starts with the prompt
    ],
    ids=["valid", "stream", "echo"],
)
def test_hook_finish(
    stream: bool, extra: dict[str, Any], answer: dict[str, Any], expected: bool | None, retry: bool
) -> None:
    hook, call = StructuredOutputs(), call_for(REGEX_CONTRACT | {"contract_retry": 1}, stream=stream)
    body = hook.prepare(call, {**BASE, **extra})
    assert hook.finish(call, body, answer) == Verdict(expected, retry)
