"""Managed engines that cannot start: the gateway restarts them within its budget, then gives up and says so."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from adapters_registry.registry import Registry
from gateway.app import create_app
from gateway.engine_process import free_port
from gateway.settings import load_settings
from tests.fixtures.gateway import served
from tests.harness import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def broken_gateway(gateway_registry: Registry, engine_logs: Path) -> Iterator[str]:
    """A gateway whose only engine is started with a flag vLLM does not know: it exits at once, every time."""
    port = free_port()
    settings = load_settings(
        base="tiny",
        port=port,
        registry=str(gateway_registry.location),
        engines={
            "count": 1,
            "log_dir": engine_logs,
            "extra_args": ["--no-such-vllm-flag"],
            "max_restarts": 1,
            "restart_backoff_s": 0.1,
        },
        health_interval_s=0.5,
        drain_grace_s=1.0,
    )
    with served(create_app(settings), port, "broken-gateway") as url:
        yield url


def engine_state(url: str) -> dict[str, Any]:
    engines: list[dict[str, Any]] = httpx.get(f"{url}/admin/engines", timeout=10).json()["engines"]
    assert len(engines) == 1
    return engines[0]


def test_an_engine_that_cannot_start_spends_its_restart_budget_then_stays_down(broken_gateway: str) -> None:
    def given_up() -> dict[str, Any] | None:
        state = engine_state(broken_gateway)
        return state if state.get("gave_up") else None

    state = wait_until(
        given_up, 240, "the gateway giving up on the engine", interval_s=0.5, ignoring=(httpx.TransportError,)
    )  # a TransportError: the gateway is still starting
    assert state is not None
    assert (state["healthy"], state["restarts"]) == (False, 1)
    assert state["last_error"] == "vLLM exited with status 2"  # argparse's exit status: the bad flag

    # Alive but not ready, and saying why.
    assert httpx.get(f"{broken_gateway}/healthz", timeout=10).status_code == 200
    ready = httpx.get(f"{broken_gateway}/readyz", timeout=10)
    assert (ready.status_code, ready.json()["problems"]) == (
        503,
        ["no healthy engine", "engine-0: restart budget spent (vLLM exited with status 2)"],
    )

    # Clients get a 503 in OpenAI's envelope that says retrying soon will not help; not a hang or a stack trace.
    client = openai.OpenAI(base_url=f"{broken_gateway}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert raised.value.status_code == 503
    assert raised.value.response.headers["retry-after"] == "60"
    error = raised.value.response.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "engines_down")
    assert "engine-0: vLLM exited with status 2" in error["message"]

    # Given up means given up: no further restart attempts.
    time.sleep(2)
    assert engine_state(broken_gateway)["restarts"] == 1
