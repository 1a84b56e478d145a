"""Output contracts carried by a registry version: a JSON schema, `{"regex": ...}` or `{"choice": [...]}`.

`normalize_contract` is called at push time; it raises `ValueError` with a one-line reason for a contract the
gateway could not enforce.
"""

from __future__ import annotations

from typing import Any


def normalize_contract(raw: Any) -> dict[str, Any]:
    """Return the contract in canonical form: {"type": "json_schema"|"regex"|"choice", ...}."""
    import jsonschema

    if not isinstance(raw, dict) or not raw:
        raise ValueError("contract must be a non-empty JSON object")
    options = {k: raw[k] for k in ("contract_retry",) if k in raw}
    if set(raw) - {"contract_retry"} == {"regex"}:
        if not isinstance(raw["regex"], str) or not raw["regex"]:
            raise ValueError("contract regex must be a non-empty string")
        return {"type": "regex", "regex": raw["regex"], **options}
    if set(raw) - {"contract_retry"} == {"choice"}:
        choice = raw["choice"]
        if not isinstance(choice, list) or not choice or not all(isinstance(c, str) for c in choice):
            raise ValueError("contract choice must be a non-empty list of strings")
        return {"type": "choice", "choice": choice, **options}
    schema = {k: v for k, v in raw.items() if k != "contract_retry"}
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"contract is not a valid JSON schema: {exc.message}") from exc
    return {"type": "json_schema", "schema": schema, **options}
