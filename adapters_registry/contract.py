"""Output contracts carried by a registry version: a JSON schema, `{"regex": ...}` or `{"choice": [...]}`.

`normalize_contract` is called at push time; it raises `ValueError` with a one-line reason for a contract the
gateway could not enforce. JSON schemas must pass the metaschema and compile with outlines (the structured
generation backend turns them into a regex), so a broken schema is refused at registration, not at the first
request. The canonical form is accepted again unchanged, so normalising twice is harmless:

    {"type": "json_schema", "schema": {...}}   {"type": "regex", "regex": "..."}   {"type": "choice", "choice": [...]}

each optionally with `"contract_retry": n` (0-3): how many times the gateway retries an answer that breaks it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

CONTRACT_TYPES = ("json_schema", "regex", "choice")
MAX_CONTRACT_RETRY = 3
MAX_SCHEMA_CHARS = 65_536


def normalize_contract(raw: Any) -> dict[str, Any]:
    """Return the contract in canonical form: {"type": "json_schema"|"regex"|"choice", ...}."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("contract must be a non-empty JSON object")
    options = _options(raw)
    body = {k: v for k, v in raw.items() if k != "contract_retry"}
    if body.get("type") in CONTRACT_TYPES:
        return _from_canonical(body, options)
    if "regex" in body or "choice" in body:
        (key,) = _only_key(body, ("regex", "choice"))
        return _from_canonical({"type": key, key: body[key]}, options)
    return _from_canonical({"type": "json_schema", "schema": body}, options)


def _options(raw: dict[str, Any]) -> dict[str, Any]:
    if "contract_retry" not in raw:
        return {}
    retry = raw["contract_retry"]
    if isinstance(retry, bool) or not isinstance(retry, int) or not 0 <= retry <= MAX_CONTRACT_RETRY:
        raise ValueError(f"contract_retry must be an integer from 0 to {MAX_CONTRACT_RETRY}, got {retry!r}")
    return {"contract_retry": retry}


def _only_key(body: dict[str, Any], allowed: tuple[str, ...]) -> list[str]:
    keys = sorted(body)
    if len(keys) != 1 or keys[0] not in allowed:
        raise ValueError(f"contract must hold exactly one of {', '.join(allowed)} (besides contract_retry), got {keys}")
    return keys


def _from_canonical(body: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    kind = body["type"]
    extra = sorted(set(body) - {"type", "schema" if kind == "json_schema" else kind})
    if extra:
        raise ValueError(f"unexpected key(s) in a {kind} contract: {', '.join(extra)}")
    if kind == "regex":
        regex_problem = regex_error(body.get("regex"))
        if regex_problem:
            raise ValueError(f"contract {regex_problem}")
        return {"type": "regex", "regex": body["regex"], **options}
    if kind == "choice":
        choice_problem = choice_error(body.get("choice"))
        if choice_problem:
            raise ValueError(f"contract {choice_problem}")
        return {"type": "choice", "choice": list(body["choice"]), **options}
    schema = body.get("schema")
    if not isinstance(schema, dict) or not schema:
        raise ValueError("contract schema must be a non-empty JSON object")
    schema_problem = schema_error(schema)
    if schema_problem:
        raise ValueError(f"contract {schema_problem}")
    return {"type": "json_schema", "schema": schema, **options}


def regex_error(regex: Any) -> str | None:
    """Why `regex` cannot serve as an output constraint, or None."""
    if not isinstance(regex, str) or not regex:
        return "regex must be a non-empty string"
    try:
        re.compile(regex)
    except re.error as exc:
        return f"regex does not compile: {exc}"
    return None


def choice_error(choice: Any) -> str | None:
    """Why `choice` cannot serve as an output constraint, or None."""
    if not isinstance(choice, list) or not choice or not all(isinstance(c, str) and c for c in choice):
        return "choice must be a non-empty list of non-empty strings"
    if len(set(choice)) != len(choice):
        return "choice must not repeat an option"
    return None


def schema_error(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a JSON schema the structured-generation backend can enforce, or None."""
    import jsonschema
    from outlines_core.json_schema import build_regex_from_schema

    text = canonical_json(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        return f"schema is too large ({len(text)} characters, at most {MAX_SCHEMA_CHARS})"
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"schema is invalid: {exc.message}" + (f" (at {where})" if where else "")
    try:
        build_regex_from_schema(text)
    except (ValueError, TypeError, RuntimeError) as exc:
        return f"schema is not supported by the structured-generation backend: {_first_line(exc)}"
    return None


def contract_satisfied(contract: Mapping[str, Any], text: str) -> bool:
    """Whether an answer `text` keeps to a normalised contract (training's evaluation, benchmarks)."""
    kind = contract["type"]
    if kind == "regex":
        return re.fullmatch(contract["regex"], text) is not None
    if kind == "choice":
        return text in contract["choice"]
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError:
        return False
    schema = contract["schema"]
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    return bool(validator.is_valid(value))


def canonical_json(value: Any) -> str:
    """Key-sorted compact JSON: equal schemas give equal text (and equal hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
