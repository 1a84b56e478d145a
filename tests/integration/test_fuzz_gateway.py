"""Schemathesis over the gateway's OpenAPI schema, against a running keyed gateway on the real vLLM (CPU) engine.

Every operation gets positive and negative cases (derandomized, so a run is repeatable), sent with an admin key so
the whole surface is reachable; completion cases mostly name a served model, with max_tokens and n clamped under the
gateway's limits, so that they reach the engine.
Bounded: `MAX_EXAMPLES` per operation and mode, `BUDGET_S` for the whole run (the remaining operations are skipped
once it is spent and the count says so), `CALL_TIMEOUT_S` per call (a hang fails).
No answer may be a 5xx or carry a Python traceback.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from tests.fixtures.security import MAX_TOKENS, KeyedGateway

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

MAX_EXAMPLES = 15
BUDGET_S = 90.0
CALL_TIMEOUT_S = 30.0
# A random model name is a 404; these make most completion cases reach the real engine.
MODELS = (None, "tiny", "acme-support", "globex@1")
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
LEAKS = ("Traceback (most recent call last)", 'File "/', "site-packages")


def test_openapi_fuzz_no_5xx_no_hang_no_traceback(keyed_gateway: KeyedGateway) -> None:
    schema = schemathesis.openapi.from_url(f"{keyed_gateway.url}/openapi.json")
    headers = keyed_gateway.headers("admin")
    counts: Counter[str] = Counter()
    failures: list[str] = []
    started = time.monotonic()

    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"invalid operation in the gateway's schema: {result.err()}"
        operations.append(result.ok())
    assert operations, "the schema lists no operations"
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() - started > BUDGET_S:
                counts["skipped (time budget)"] += 1
                continue

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode), model=st.sampled_from(MODELS))
            def run(case: schemathesis.Case[Any], model: str | None) -> None:
                if time.monotonic() - started > BUDGET_S:
                    return
                if model and case.operation.path in COMPLETION_PATHS and isinstance(case.body, dict):
                    # Reach the engine, not only the unknown-model 404 and the max_tokens/n limits (tested elsewhere).
                    case.body["model"] = model
                    for field, cap in (("max_tokens", MAX_TOKENS), ("n", 2)):
                        value = case.body.get(field)
                        if isinstance(value, int):
                            case.body[field] = min(value, cap)
                try:
                    response = case.call(base_url=keyed_gateway.url, headers=headers, timeout=CALL_TIMEOUT_S)
                except requests.Timeout:
                    failures.append(f"{case.operation.label}: no answer within {CALL_TIMEOUT_S:.0f}s")
                    return
                counts["cases"] += 1
                counts[f"{response.status_code // 100}xx"] += 1
                if case.operation.path in COMPLETION_PATHS:
                    counts[f"completions {response.status_code}"] += 1
                if response.status_code >= 500:
                    failures.append(f"{case.operation.label} -> {response.status_code}: {response.text[:300]}")
                if any(leak in response.text for leak in LEAKS):
                    failures.append(f"{case.operation.label} -> traceback leaked: {response.text[:300]}")

            try:
                run()
            except Unsatisfiable:  # e.g. no way to make an operation without parameters invalid
                counts[f"no {mode.value} cases"] += 1
    log.info("schemathesis: %s in %.0fs over %d operations", dict(counts), time.monotonic() - started, len(operations))
    assert failures == []
    assert counts["cases"] >= len(operations)
