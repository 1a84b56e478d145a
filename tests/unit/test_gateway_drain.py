"""Shutdown drains: in-flight streams get the grace period, nothing new is taken, and a stream still open at the
deadline ends with an SSE error event (which the SDK raises), recorded as a 503 with the tokens it had delivered.

The engine is a `tests.fakes.FakeEngine` that streams slowly (a real engine would need a test of its own to stop)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from adapters_registry.registry import open_registry
from gateway.app import create_app
from gateway.engine_process import free_port
from gateway.server import GatewayServer, gateway_server
from gateway.settings import load_settings
from tests.fakes import FakeEngine, content_event, stream
from tests.harness import wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@contextmanager
def draining_gateway(
    engine: FakeEngine, registry_dir: Path, grace_s: float
) -> Iterator[tuple[str, Any, GatewayServer]]:
    port = free_port()
    settings = load_settings(
        mode="external", base_name="tiny", port=port, external={"urls": [engine.url]}, drain_grace_s=grace_s
    )
    app = create_app(settings, registry=open_registry(registry_dir))
    server = gateway_server(app, host="127.0.0.1", port=port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200

    wait_until(ready, 30, "the gateway ready", interval_s=0.05, ignoring=(httpx.HTTPError,))
    try:
        yield url, app, server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_shutdown_lets_the_stream_finish(tmp_path: Path) -> None:
    with FakeEngine() as engine, draining_gateway(engine, tmp_path / "registry", grace_s=10) as (url, app, server):
        engine.script.append(stream(events=6, gap_s=0.2))
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30) as response:
            chunks = response.iter_raw()
            received = [next(chunks)]
            server.should_exit = True  # what SIGTERM does
            received += list(chunks)
    body = b"".join(received)
    assert body.count(b"data: ") == 7 and body.endswith(b"data: [DONE]\n\n")
    assert all(content_event(i) in body for i in range(6))
    assert app.state.gateway.draining is True and app.state.gateway.inflight() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_a_stream_still_open_at_the_drain_deadline_ends_with_an_error_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with FakeEngine() as engine, draining_gateway(engine, tmp_path / "registry", grace_s=1) as (url, app, server):
        engine.script.append(stream(events=100, gap_s=0.1))  # 10 s: far past the 1 s grace
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        received: list[str | None] = []
        # The gateway's drain deadline ends the stream with this event; uvicorn's backstop would only cut it off.
        with pytest.raises(openai.APIError, match="drain period ended before this answer did"):
            for chunk in client.chat.completions.create(**CHAT, stream=True):  # type: ignore[call-overload]
                received.append(chunk.choices[0].delta.content)
                if len(received) == 1:
                    server.should_exit = True
        assert 5 <= len(received) <= 20
        metrics = app.state.gateway.metrics.render()[0].decode()
    assert 'error_code="drain_deadline",route="chat",status_class="5xx"' in metrics
    usage = [r.getMessage() for r in caplog.records if r.name == "gateway.usage"]
    assert len(usage) == 1 and '"status":503' in usage[0] and '"error_code":"drain_deadline"' in usage[0]
    assert f'"completion_tokens":{len(received)}' in usage[0]
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
