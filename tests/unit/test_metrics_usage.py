"""Usage events: the JSON log line, webhook delivery to a real loopback HTTP server, and every drop path."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry

from gateway.call import Call
from gateway.engine_process import free_port
from gateway.metrics import GatewayMetrics
from gateway.usage import UsageEmitter, usage_event


def outcome(request_id: str = "req-1", **kw: object) -> Call:
    fields: dict[str, object] = {
        "route": "chat",
        "adapter": "acme",
        "version": "3",
        "engine": "e0",
        "status": 200,
        "error_code": None,
        "prompt_tokens": 11,
        "completion_tokens": 5,
        "latency_s": 0.25,
        "ttft_s": 0.05,
        "queue_s": 0.01,
        "output_valid": True,
        "stream": True,
        "request_id": request_id,
        "key_id": "k1",
    }
    fields.update(kw)
    latency = fields.pop("latency_s")
    return Call(started=0.0, ended=latency, **fields)  # type: ignore[arg-type]


@dataclass
class Receiver:
    url: str
    status: int = 200
    bodies: list[dict[str, object]] = field(default_factory=list)
    got_request: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def events(self) -> list[str]:
        return [str(e["request_id"]) for b in self.bodies for e in b["events"]]  # type: ignore[attr-defined]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    port = free_port()
    state = Receiver(url=f"http://127.0.0.1:{port}/usage")
    state.release.set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            state.got_request.set()
            state.release.wait(30)
            state.bodies.append(body)
            self.send_response(state.status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


def dropped(m: GatewayMetrics, reason: str) -> float | None:
    return m.registry.get_sample_value("loragate_usage_events_dropped_total", {"reason": reason})


def posts(m: GatewayMetrics, result: str) -> float | None:
    return m.registry.get_sample_value("loragate_usage_webhook_posts_total", {"result": result})


def test_usage_event_fields() -> None:
    event = usage_event(outcome(), timestamp=0.0)
    assert event == {
        "event": "request",
        "time": "1970-01-01T00:00:00.000+00:00",
        "request_id": "req-1",
        "model": "acme@3",
        "adapter": "acme",
        "version": "3",
        "key_id": "k1",
        "route": "chat",
        "stream": True,
        "engine": "e0",
        "status": 200,
        "error_code": None,
        "prompt_tokens": 11,
        "completion_tokens": 5,
        "total_tokens": 16,
        "latency_s": 0.25,
        "ttft_s": 0.05,
        "output_valid": True,
    }


@pytest.mark.parametrize(
    ("kw", "model", "total"),
    [
        ({"adapter": None, "version": None}, None, 16),
        ({"version": None}, "acme", 16),
        ({"prompt_tokens": None, "completion_tokens": None, "status": 503}, "acme@3", None),
        ({"completion_tokens": None}, "acme@3", 11),
    ],
)
def test_usage_event_model_and_totals(kw: dict[str, object], model: str | None, total: int | None) -> None:
    event = usage_event(outcome(**kw), timestamp=0.0)  # type: ignore[arg-type]
    assert (event["model"], event["total_tokens"]) == (model, total)


def test_emit_writes_one_json_line(caplog: pytest.LogCaptureFixture) -> None:
    emitter = UsageEmitter(None)
    with caplog.at_level(logging.INFO, logger="gateway.usage"):
        returned = emitter.emit(outcome("req-9"))
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.usage"]
    assert len(lines) == 1
    assert "\n" not in lines[0]
    assert json.loads(lines[0]) == returned
    assert returned["request_id"] == "req-9"


def test_webhook_receives_every_event(receiver: Receiver) -> None:
    m = GatewayMetrics(registry=CollectorRegistry())

    async def run() -> None:
        emitter = UsageEmitter(receiver.url, metrics=m)
        await emitter.start()
        for i in range(3):
            emitter.emit(outcome(f"r{i}"))
        await emitter.aclose()

    asyncio.run(run())
    assert receiver.events() == ["r0", "r1", "r2"]
    assert len(receiver.bodies) == 1  # queued before the worker ran: one batch
    assert posts(m, "ok") == 1
    assert dropped(m, "webhook_error") is None


def test_batches_are_capped(receiver: Receiver) -> None:
    m = GatewayMetrics(registry=CollectorRegistry())

    async def run() -> None:
        emitter = UsageEmitter(receiver.url, metrics=m, batch_size=2)
        await emitter.start()
        for i in range(5):
            emitter.emit(outcome(f"r{i}"))
        await emitter.aclose()

    asyncio.run(run())
    assert [len(b["events"]) for b in receiver.bodies] == [2, 2, 1]  # type: ignore[arg-type]
    assert posts(m, "ok") == 3


def test_full_queue_drops_and_counts(receiver: Receiver) -> None:
    m = GatewayMetrics(registry=CollectorRegistry())

    async def run() -> None:
        emitter = UsageEmitter(receiver.url, metrics=m, queue_size=2)
        for i in range(3):  # the worker has not started: the third does not fit
            emitter.emit(outcome(f"r{i}"))
        await emitter.start()
        await emitter.aclose()

    asyncio.run(run())
    assert dropped(m, "queue_full") == 1
    assert receiver.events() == ["r0", "r1"]


def test_webhook_error_status_drops_the_batch(receiver: Receiver) -> None:
    receiver.status = 500
    m = GatewayMetrics(registry=CollectorRegistry())

    async def run() -> None:
        emitter = UsageEmitter(receiver.url, metrics=m)
        await emitter.start()
        emitter.emit(outcome("r0"))
        emitter.emit(outcome("r1"))
        await emitter.aclose()

    asyncio.run(run())
    assert receiver.events() == ["r0", "r1"]
    assert posts(m, "error") == 1
    assert dropped(m, "webhook_error") == 2


def test_unreachable_webhook_drops_and_counts() -> None:
    m = GatewayMetrics(registry=CollectorRegistry())

    async def run() -> None:
        emitter = UsageEmitter(f"http://127.0.0.1:{free_port()}/usage", metrics=m)
        await emitter.start()
        emitter.emit(outcome())
        await emitter.aclose()

    asyncio.run(run())
    assert posts(m, "error") == 1
    assert dropped(m, "webhook_error") == 1


def test_shutdown_counts_in_flight_and_queued_events(receiver: Receiver) -> None:
    receiver.release.clear()  # the receiver holds the first POST until the test ends
    m = GatewayMetrics(registry=CollectorRegistry())

    async def run() -> None:
        emitter = UsageEmitter(receiver.url, metrics=m)
        await emitter.start()
        emitter.emit(outcome("r0"))
        assert await asyncio.to_thread(receiver.got_request.wait, 30)
        emitter.emit(outcome("r1"))
        emitter.emit(outcome("r2"))
        await emitter.aclose(flush_timeout_s=0.05)
        emitter.emit(outcome("r3"))

    asyncio.run(run())
    assert dropped(m, "shutdown") == 3
    assert dropped(m, "closed") == 1


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="queue_size and batch_size must be >= 1, got 0 and 64"):
        UsageEmitter("http://127.0.0.1:1/", queue_size=0)
