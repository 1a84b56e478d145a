"""Shutdown drains: an in-flight stream finishes before the lifespan stops the engines, and nothing new is taken.

The upstream is an httpx.MockTransport that streams slowly (a real engine would need a test of its own to stop)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

import gateway.app as gateway_app
from adapters_registry.registry import open_registry
from gateway.engine_process import free_port
from gateway.settings import Settings, load_settings

CHUNKS = [f'data: {{"choices":[{{"index":0,"text":"{i}"}}]}}\n\n'.encode() for i in range(6)]


def slow_engine(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": []})
    if request.url.path != "/v1/completions":
        return httpx.Response(200, text="")

    async def body() -> AsyncIterator[bytes]:
        for chunk in CHUNKS:
            await asyncio.sleep(0.2)
            yield chunk

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


def test_shutdown_lets_the_stream_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        gateway_app, "upstream_client", lambda s: httpx.AsyncClient(transport=httpx.MockTransport(slow_engine))
    )
    port = free_port()
    settings: Settings = load_settings(
        mode="external", base_name="tiny", port=port, external={"urls": ["http://engine:8000"]}, drain_grace_s=10
    )
    app = gateway_app.create_app(settings, registry=open_registry(tmp_path / "registry"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "gateway never became ready"
        time.sleep(0.05)

    body = {"model": "tiny", "prompt": "x", "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
        chunks = response.iter_raw()
        received = [next(chunks)]
        server.should_exit = True  # what SIGTERM does
        received += list(chunks)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert b"".join(received) == b"".join(CHUNKS)
    assert app.state.gateway.draining is True and app.state.gateway.inflight() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)
