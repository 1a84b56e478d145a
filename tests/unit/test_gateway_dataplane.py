"""The request path against engines that fail: a real gateway over `tests.fakes.FakeEngine`s on loopback.

What is checked here needs an engine that refuses, drops, stalls or breaks off on demand, which a real vLLM cannot
do; the same paths with the real engine are in tests/integration/test_gateway.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.routing import rendezvous_score
from tests.fakes import FakeEngine, drop, drop_after, fake_gateway, hang, stream
from tests.harness import wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def request_id_first_on(engine: FakeEngine, other: FakeEngine) -> str:
    """A request id whose rendezvous order puts `engine` first (base-model requests spread by request id)."""
    for i in range(1000):
        rid = f"r{i}"
        if rendezvous_score(engine.url, rid) > rendezvous_score(other.url, rid):
            return rid
    raise AssertionError("no such request id")


def exposition(app: Any) -> str:
    body, _ = app.state.gateway.metrics.render()
    return str(body.decode())


def test_an_engine_that_refuses_connections_is_dropped_and_the_request_retried_elsewhere(tmp_path: Path) -> None:
    with FakeEngine() as works:
        gone = FakeEngine()
        with gone, fake_gateway([gone, works], tmp_path / "r", health_interval_s=30) as (url, app):
            rid = request_id_first_on(gone, works)
            gone.__exit__()  # stops listening between two health checks
            reply = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"x-request-id": rid}, timeout=10)
            engines = app.state.gateway.supervisor.engines
            assert reply.status_code == 200 and reply.headers["x-loragate-engine"] == works.url
            assert (engines[gone.url].healthy, engines[works.url].healthy) == (False, True)
            assert [path for path, _ in works.seen] == ["/v1/chat/completions"]


def test_a_connection_dropped_before_the_answer_is_retried_without_condemning_the_engine(tmp_path: Path) -> None:
    # Two engines: the retry goes to the other one; the first stays in rotation.
    with FakeEngine() as dies, FakeEngine() as works, fake_gateway([dies, works], tmp_path / "r2") as (url, app):
        dies.script.append(drop())
        rid = request_id_first_on(dies, works)
        reply = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"x-request-id": rid}, timeout=10)
        assert reply.status_code == 200 and reply.headers["x-loragate-engine"] == works.url
        assert app.state.gateway.supervisor.engines[dies.url].healthy and len(dies.seen) == 1

    # One engine whose connection was closed under the gateway (the keep-alive race): a fresh connection to the
    # same engine answers, instead of a 503 until the next health check.
    with FakeEngine() as only, fake_gateway([only], tmp_path / "r1") as (url, app):
        only.script.append(drop())
        reply = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
        assert reply.status_code == 200 and len(only.seen) == 2
        # Both attempts dropped: a 503 naming the retry, the engine still in rotation.
        only.script.extend([drop(), drop()])
        failed = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
        assert failed.status_code == 503
        assert failed.json()["error"]["message"] == "the engine failed while answering and the retry failed too"
        assert app.state.gateway.supervisor.engines[only.url].healthy
        assert 'loragate_requests_total{adapter="",error_code="engines_unavailable"' in exposition(app)


def test_the_gateways_own_connection_limit_is_a_busy_503_and_a_silent_engine_a_504(tmp_path: Path) -> None:
    upstream = {"max_connections": 1, "read_timeout_s": 1.5}
    with FakeEngine() as engine, fake_gateway([engine], tmp_path / "r", upstream=upstream) as (url, app):
        engine.script.append(hang())
        replies: list[httpx.Response] = []
        first = threading.Thread(
            target=lambda: replies.append(httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10))
        )
        first.start()
        # The first request holds the only connection once the engine has it.
        wait_until(lambda: engine.seen, 5, "the first request at the engine", interval_s=0.01)
        busy = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
        first_answered = bool(replies)  # the first waits 1.5 s for the silent engine
        first.join(10)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "engines_busy" and not first_answered  # at once, not queued behind it
        assert len(engine.seen) == 1  # not sent, not retried: the limit is the gateway's own
        assert replies[0].status_code == 504
        assert replies[0].json()["error"] == {
            "message": f"engine {engine.url} sent nothing for 2s",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_timeout",
        }
        assert app.state.gateway.supervisor.engines[engine.url].healthy


def test_a_stream_the_engine_breaks_off_ends_with_an_error_event_the_sdk_raises(tmp_path: Path) -> None:
    with FakeEngine() as engine, fake_gateway([engine], tmp_path / "r") as (url, app):
        engine.script.append(drop_after(3))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        received = []
        with pytest.raises(openai.APIError, match="the engine failed while streaming the answer"):
            for chunk in client.chat.completions.create(**CHAT, stream=True):  # type: ignore[call-overload]
                received.append(chunk.choices[0].delta.content)
        assert received == ["t0 ", "t1 ", "t2 "]
        text = exposition(app)
        assert 'error_code="upstream_stream_failed",route="chat",status_class="5xx"' in text
        assert 'loragate_completion_tokens_total{adapter="",version=""} 3.0' in text  # events delivered, about


def test_a_client_hang_up_closes_the_upstream_connection(tmp_path: Path) -> None:
    with FakeEngine() as engine, fake_gateway([engine], tmp_path / "r") as (url, app):
        engine.script.append(stream(events=200, gap_s=0.02))
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10) as reply:
            next(reply.iter_raw())  # then hang up, 4 s before the engine would finish
        wait_until(lambda: engine.broken, 5, "the engine's connection closed", interval_s=0.02)
        counted = 'error_code="client_disconnected"'
        wait_until(lambda: counted in exposition(app), 5, "the hang-up counted as a 499", interval_s=0.02)
        assert app.state.gateway.inflight() == 0
