"""Structured outputs: which output constraint is in force for a request, how the engine is told, and whether the
answer kept to it.

A request may constrain its output with OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's
`structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`, `structural_tag`) or the `guided_*`
fields that vLLM 0.12 removed (vLLM 0.32 silently ignores them). `prepare_request` rewrites whichever form it
finds into the one vLLM 0.32 accepts (`structured_outputs`). A request's own constraint wins over the adapter's
registry contract; with none (`response_format: {"type": "text"}` counts as none), the contract applies, unless
the request offers `tools` (tool calling then decides the shape of the answer).

Constraints are checked before forwarding (`InvalidConstraint`, a 400 with the reason); compiled JSON schemas are
cached by their canonical JSON. `check_output` judges a non-streamed answer against the constraint in force.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import jsonschema
import regex
from jsonschema.protocols import Validator

from adapters_registry.contract import canonical_json, choice_error, regex_error, schema_error
from gateway.errors import InvalidRequest
from gateway.hooks import Verdict

if TYPE_CHECKING:
    from gateway.call import Call

logger = logging.getLogger(__name__)

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag"]
Source = Literal["request", "contract"]

# structured_outputs keys that pick the constraint, and the engine's name for each kind.
_SO_KINDS: dict[str, ConstraintKind] = {
    "json": "json_schema",
    "json_object": "json_object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "structural_tag": "structural_tag",
}
_ENGINE_KEY: dict[ConstraintKind, str] = {kind: key for key, kind in _SO_KINDS.items()}
_SO_OPTIONS = frozenset({"disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"})
_LEGACY_KINDS: dict[str, ConstraintKind] = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# Legacy options: translated where vLLM 0.32 still has the knob, dropped where the engine's config decides.
_LEGACY_OPTIONS: dict[str, str | None] = {
    "guided_whitespace_pattern": "whitespace_pattern",
    "guided_decoding_backend": None,
}
CONSTRAINT_FIELDS = ("response_format", "structured_outputs", *_LEGACY_KINDS, *_LEGACY_OPTIONS)
REGEX_CHECK_TIMEOUT_S = 0.05
_CONSTRAINT_NOTE = "structured.constraint"  # keys of Call.notes
_ATTEMPT_NOTE = "structured.attempt"


class InvalidConstraint(InvalidRequest):
    """The request's output constraint is malformed or cannot be enforced (400; `param` names the field)."""

    code = "invalid_constraint"


@dataclass(frozen=True)
class Constraint:
    kind: ConstraintKind
    value: Any  # schema dict | regex str | choice tuple | grammar str | structural tag | None (json_object)
    source: Source
    retries: int = 0  # contract_retry: extra attempts for an answer that breaks the contract

    def engine_value(self) -> Any:
        if self.kind == "json_object":
            return True
        return list(self.value) if self.kind == "choice" else self.value


@dataclass(frozen=True)
class Prepared:
    body: dict[str, Any]
    constraint: Constraint | None


@dataclass(frozen=True)
class CompiledSchema:
    digest: str  # sha256 of the canonical JSON
    validator: Validator


def prepare_request(body: Mapping[str, Any], contract: Mapping[str, Any] | None) -> Prepared:
    """The body to forward and the constraint in force. Raises InvalidConstraint for a constraint it cannot enforce."""
    constraint, options = request_constraint(body)
    if constraint is None and contract is not None and not body.get("tools"):  # tool calls shape their own output
        constraint = contract_constraint(contract)
    forwarded = {k: v for k, v in body.items() if k not in CONSTRAINT_FIELDS}
    if constraint is not None:
        forwarded["structured_outputs"] = {_ENGINE_KEY[constraint.kind]: constraint.engine_value(), **options}
    return Prepared(forwarded, constraint)


def request_constraint(body: Mapping[str, Any]) -> tuple[Constraint | None, dict[str, Any]]:
    """The request's own constraint (None if it brings none) and the structured_outputs options to keep."""
    found: list[tuple[str, Constraint]] = []
    options: dict[str, Any] = {}
    response_format = body.get("response_format")
    if response_format is not None:
        rf = _response_format_constraint(response_format)
        if rf is not None:
            found.append(("response_format", rf))
    so = body.get("structured_outputs")
    if so is not None:
        so_constraint, options = _structured_outputs_constraint(so)
        found.append(("structured_outputs", so_constraint))
    for field, kind in _LEGACY_KINDS.items():
        if body.get(field) is not None:
            found.append((field, _checked(kind, body[field], field)))
    for field, option in _LEGACY_OPTIONS.items():
        if body.get(field) is not None and option is not None:
            options.setdefault(option, body[field])
        elif body.get(field) is not None:
            logger.info("ignoring %s: the engine's configuration picks the structured-output backend", field)
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise InvalidConstraint(f"give one output constraint, not {names}", param=found[1][0])
    return (found[0][1] if found else None), options


def contract_constraint(contract: Mapping[str, Any]) -> Constraint:
    """The constraint of a registry contract (as normalised by adapters_registry.contract.normalize_contract)."""
    kind = contract.get("type")
    known: dict[Any, tuple[ConstraintKind, str]] = {
        "json_schema": ("json_schema", "schema"),
        "regex": ("regex", "regex"),
        "choice": ("choice", "choice"),
    }
    if kind not in known or known[kind][1] not in contract:
        raise InvalidConstraint(f"the adapter's contract is malformed (type {kind!r})", param="model")
    checked = _checked(known[kind][0], contract[known[kind][1]], "model")
    return Constraint(checked.kind, checked.value, "contract", int(contract.get("contract_retry", 0)))


def _response_format_constraint(rf: Any) -> Constraint | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise InvalidConstraint("response_format must be an object with a 'type'", param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object", None, "request")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidConstraint(
                "response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
                param="response_format",
            )
        return _checked("json_schema", spec["schema"], "response_format")
    raise InvalidConstraint(
        f"unsupported response_format type {kind!r} (expected text, json_object or json_schema)",
        param="response_format",
    )


def _structured_outputs_constraint(so: Any) -> tuple[Constraint, dict[str, Any]]:
    if not isinstance(so, dict):
        raise InvalidConstraint("structured_outputs must be an object", param="structured_outputs")
    unknown = sorted(set(so) - set(_SO_KINDS) - _SO_OPTIONS)
    if unknown:
        raise InvalidConstraint(f"unknown structured_outputs key(s): {', '.join(unknown)}", param="structured_outputs")
    kinds = [key for key in _SO_KINDS if so.get(key) is not None and so.get(key) is not False]
    if len(kinds) != 1:
        raise InvalidConstraint(
            f"structured_outputs needs exactly one of {', '.join(_SO_KINDS)}, got {len(kinds)}",
            param="structured_outputs",
        )
    options = {k: so[k] for k in sorted(_SO_OPTIONS) if so.get(k) is not None}
    return _checked(_SO_KINDS[kinds[0]], so[kinds[0]], "structured_outputs"), options


def _checked(kind: ConstraintKind, value: Any, param: str) -> Constraint:
    """A request-side Constraint of `kind` after checking `value`; InvalidConstraint names `param` and the reason."""
    if kind == "json_schema":
        schema = _schema_object(value, param)
        compile_schema(schema, param)
        return Constraint(kind, schema, "request")
    if kind == "json_object":
        if value is not True:
            raise InvalidConstraint("json_object must be true", param=param)
        return Constraint(kind, None, "request")
    if kind == "regex":
        problem = regex_error(value)
    elif kind == "choice":
        problem = choice_error(value)
        value = tuple(value) if problem is None else value
    elif kind == "grammar":
        problem = None if isinstance(value, str) and value.strip() else "grammar must be a non-empty string"
    else:
        problem = None
    if problem:
        raise InvalidConstraint(f"{param}: {problem}", param=param)
    return Constraint(kind, value, "request")


def _schema_object(value: Any, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidConstraint(f"{param}: schema is not valid JSON: {exc}", param=param) from exc
    if not isinstance(value, dict):
        raise InvalidConstraint(f"{param}: schema must be a JSON object", param=param)
    return value


def compile_schema(schema: Mapping[str, Any], param: str = "response_format") -> CompiledSchema:
    """The schema's validator, from the cache when the same schema (by canonical JSON) was seen before."""
    compiled = _compile(canonical_json(schema))
    if isinstance(compiled, str):
        raise InvalidConstraint(f"{param}: {compiled}", param=param)
    return compiled


@functools.lru_cache(maxsize=512)
def _compile(canonical: str) -> CompiledSchema | str:
    """Compile one canonical schema; a refusal (its reason) is cached too, so a bad schema costs one compile."""
    schema = json.loads(canonical)
    problem = schema_error(schema)
    if problem:
        return problem
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return CompiledSchema(hashlib.sha256(canonical.encode()).hexdigest(), cls(schema))


def schema_cache_info() -> functools._CacheInfo:
    return _compile.cache_info()


def check_output(response: Mapping[str, Any], constraint: Constraint | None) -> bool | None:
    """Whether every choice of a non-streamed chat or completions answer keeps to `constraint`.

    None when nothing was constrained or the constraint cannot be checked here (grammar, structural tag).
    """
    if constraint is None:
        return None
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    verdicts = [check_text(_choice_text(choice), constraint) for choice in choices]
    if any(v is None for v in verdicts):
        return None
    return all(verdicts)


def _choice_text(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else None


def check_text(text: str | None, constraint: Constraint) -> bool | None:
    """Whether one answer text keeps to `constraint`; None when this kind cannot be checked."""
    if constraint.kind in ("grammar", "structural_tag"):
        return None
    if text is None:
        return False
    if constraint.kind == "choice":
        return text in constraint.value
    if constraint.kind == "regex":
        try:  # the pattern is the client's: bound its backtracking, this runs on the event loop
            return regex.fullmatch(constraint.value, text, timeout=REGEX_CHECK_TIMEOUT_S) is not None
        except TimeoutError:
            logger.warning("output check against regex %.80r timed out; answer left unchecked", constraint.value)
            return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return False
    if constraint.kind == "json_object":
        return isinstance(parsed, dict)
    return bool(compile_schema(constraint.value).validator.is_valid(parsed))


def constraint_of(call: Call) -> Constraint | None:
    """The constraint `StructuredOutputs.prepare` put in force for the call (None: none)."""
    constraint: Constraint | None = call.notes.get(_CONSTRAINT_NOTE)
    return constraint


def should_retry(valid: bool | None, constraint: Constraint | None, attempt: int) -> bool:
    """Retry (attempt counts from 0) only an answer that broke the adapter's contract, up to its contract_retry."""
    return (
        valid is False and constraint is not None and constraint.source == "contract" and attempt < constraint.retries
    )


class StructuredOutputs:
    """The completion hook (gateway.hooks.CompletionHook): applies constraints and contracts, judges answers.

    When an answer breaks the adapter's contract and its `contract_retry` allows it, `finish`'s verdict asks the
    proxy to send the request once more.
    """

    def prepare(self, call: Call, body: dict[str, Any]) -> dict[str, Any]:
        if call.route not in ("chat", "completions"):  # Responses: `text.format` is the engine's to apply, as sent
            call.notes[_CONSTRAINT_NOTE] = None
            return body
        contract = call.manifest.contract if call.manifest is not None else None
        if contract is None and not any(name in body for name in CONSTRAINT_FIELDS):
            call.notes[_CONSTRAINT_NOTE] = None  # nothing to apply or check: skip the rewrite
            return body
        prepared = prepare_request(body, contract)
        call.notes[_CONSTRAINT_NOTE] = prepared.constraint
        return prepared.body

    def wants_answer(self, call: Call) -> bool:
        return call.notes.get(_CONSTRAINT_NOTE) is not None  # nothing to check without a constraint

    def finish(self, call: Call, body: dict[str, Any], answer: dict[str, Any]) -> Verdict:
        constraint: Constraint | None = call.notes.get(_CONSTRAINT_NOTE)
        valid = None if body.get("echo") else check_output(answer, constraint)  # echoed text starts with the prompt
        attempt: int = call.notes.get(_ATTEMPT_NOTE, 0)
        if not call.stream and should_retry(valid, constraint, attempt):
            logger.info("%s: answer broke the adapter's output contract; retrying (%s)", call.request_id, attempt + 1)
            call.notes[_ATTEMPT_NOTE] = attempt + 1
            return Verdict(valid, retry=True)
        return Verdict(valid)
