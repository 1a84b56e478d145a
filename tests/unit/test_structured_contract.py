"""Output contracts at push time: adapters_registry.contract.normalize_contract."""

from __future__ import annotations

from typing import Any

import pytest

from adapters_registry.contract import canonical_json, contract_satisfied, normalize_contract

OBJ = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}

ACCEPTED: list[tuple[str, Any, dict[str, Any]]] = [
    ("schema", OBJ, {"type": "json_schema", "schema": OBJ}),
    ("schema with retry", {**OBJ, "contract_retry": 1}, {"type": "json_schema", "schema": OBJ, "contract_retry": 1}),
    ("scalar schema", {"type": "boolean"}, {"type": "json_schema", "schema": {"type": "boolean"}}),
    (
        "draft-07 schema",
        {"$schema": "http://json-schema.org/draft-07/schema#", "enum": ["a", "b"]},
        {"type": "json_schema", "schema": {"$schema": "http://json-schema.org/draft-07/schema#", "enum": ["a", "b"]}},
    ),
    ("regex", {"regex": "[A-Z][0-9]{2}"}, {"type": "regex", "regex": "[A-Z][0-9]{2}"}),
    (
        "choice",
        {"choice": ["yes", "no"], "contract_retry": 0},
        {"type": "choice", "choice": ["yes", "no"], "contract_retry": 0},
    ),
    (
        "canonical regex",
        {"type": "regex", "regex": "a+", "contract_retry": 3},
        {"type": "regex", "regex": "a+", "contract_retry": 3},
    ),
    ("canonical schema", {"type": "json_schema", "schema": OBJ}, {"type": "json_schema", "schema": OBJ}),
]


@pytest.mark.parametrize(("raw", "expected"), [(raw, exp) for _, raw, exp in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted_contracts_normalise_and_renormalise_unchanged(raw: Any, expected: dict[str, Any]) -> None:
    assert normalize_contract(raw) == expected
    assert normalize_contract(normalize_contract(raw)) == expected


REFUSED: list[tuple[str, Any, str]] = [
    ("not an object", ["a"], "contract must be a non-empty JSON object"),
    ("empty", {}, "contract must be a non-empty JSON object"),
    ("only options", {"contract_retry": 1}, "contract schema must be a non-empty JSON object"),
    (
        "bad type",
        {"type": "foo"},
        "contract schema is invalid: 'foo' is not valid under any of the given schemas (at type)",
    ),
    (
        "bad keyword value",
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": "3"}}},
        "contract schema is invalid: '3' is not of type 'number' (at properties/n/minimum)",
    ),
    (
        "unsupported by outlines",
        {"not": {"type": "string"}},
        "contract schema is not supported by the structured-generation backend: "
        'Unsupported JSON Schema structure {"not":{"type":"string"}}',
    ),
    (
        "unknown format",
        {"type": "string", "format": "weird"},
        "contract schema is not supported by the structured-generation backend: "
        "Format weird is not supported by Outlines",
    ),
    (
        "dangling ref",
        {"$ref": "#/$defs/missing"},
        "contract schema is not supported by the structured-generation backend: Invalid reference path: $defs",
    ),
    (
        "regex syntax",
        {"regex": "(ab"},
        "contract regex does not compile: missing ), unterminated subpattern at position 0",
    ),
    ("empty regex", {"regex": ""}, "contract regex must be a non-empty string"),
    ("regex not string", {"regex": 5}, "contract regex must be a non-empty string"),
    ("empty choice", {"choice": []}, "contract choice must be a non-empty list of non-empty strings"),
    ("choice of numbers", {"choice": [1, 2]}, "contract choice must be a non-empty list of non-empty strings"),
    ("repeated choice", {"choice": ["a", "a"]}, "contract choice must not repeat an option"),
    (
        "regex and choice",
        {"regex": "a", "choice": ["a"]},
        "contract must hold exactly one of regex, choice (besides contract_retry), got ['choice', 'regex']",
    ),
    (
        "regex and stray key",
        {"regex": "a", "flags": "i"},
        "contract must hold exactly one of regex, choice (besides contract_retry), got ['flags', 'regex']",
    ),
    ("canonical with stray key", {"type": "regex", "regex": "a", "x": 1}, "unexpected key(s) in a regex contract: x"),
    (
        "canonical schema empty",
        {"type": "json_schema", "schema": {}},
        "contract schema must be a non-empty JSON object",
    ),
    ("retry bool", {"regex": "a", "contract_retry": True}, "contract_retry must be an integer from 0 to 3, got True"),
    ("retry too many", {"regex": "a", "contract_retry": 4}, "contract_retry must be an integer from 0 to 3, got 4"),
    ("retry negative", {"regex": "a", "contract_retry": -1}, "contract_retry must be an integer from 0 to 3, got -1"),
]


@pytest.mark.parametrize(("raw", "message"), [(raw, msg) for _, raw, msg in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_contracts_give_one_line_reason(raw: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_contract(raw)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_schema_too_large_is_refused() -> None:
    schema = {"enum": [f"option-{i:05d}" for i in range(6000)]}
    with pytest.raises(ValueError, match=r"^contract schema is too large \(\d+ characters, at most 65536\)$"):
        normalize_contract(schema)


def test_canonical_json_is_key_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1}'
    assert canonical_json({"a": "é"}) == '{"a":"é"}'


SATISFIED: list[tuple[str, dict[str, Any], str, bool]] = [
    ("schema ok", {"type": "json_schema", "schema": OBJ}, '{"code": "A1"}', True),
    ("schema missing key", {"type": "json_schema", "schema": OBJ}, '{"kode": "A1"}', False),
    ("schema not json", {"type": "json_schema", "schema": OBJ}, '{"code": "A1"', False),
    ("regex ok", {"type": "regex", "regex": "[A-Z][0-9]{2}"}, "B12", True),
    ("regex partial", {"type": "regex", "regex": "[A-Z][0-9]{2}"}, "B123", False),
    ("choice ok", {"type": "choice", "choice": ["yes", "no"]}, "yes", True),
    ("choice other", {"type": "choice", "choice": ["yes", "no"]}, "yes ", False),
]


@pytest.mark.parametrize(("contract", "text", "expected"), [c[1:] for c in SATISFIED], ids=[c[0] for c in SATISFIED])
def test_contract_satisfied(contract: dict[str, Any], text: str, expected: bool) -> None:
    assert contract_satisfied(contract, text) is expected
