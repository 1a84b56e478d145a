"""A stand-in for vLLM's HTTP API, for faults a real engine cannot produce on demand.

`FakeEngine` answers `/health`, `/metrics`, `/v1/models` and the runtime LoRA endpoints like vLLM does, and each
completion request by the next `Behaviour` of its script (once the script is empty: a whole answer at once): a slow
SSE stream, a connection dropped before the answer or in the middle of a stream, an error status, or no answer at
all. It runs on loopback in a thread of its own, so the gateway under test talks to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.engine_process import free_port
from tests.harness import wait_until


@dataclass(frozen=True)
class Behaviour:
    kind: str  # "answer" | "stream" | "drop" | "drop_after" | "status" | "hang"
    events: int = 0  # stream, drop_after: content events sent
    gap_s: float = 0.0  # pause before each event
    status: int = 200
    body: bytes = b""


def answer() -> Behaviour:
    return Behaviour("answer")


def stream(events: int = 6, gap_s: float = 0.0) -> Behaviour:
    return Behaviour("stream", events=events, gap_s=gap_s)


def drop() -> Behaviour:
    return Behaviour("drop")


def drop_after(events: int, gap_s: float = 0.0) -> Behaviour:
    return Behaviour("drop_after", events=events, gap_s=gap_s)


def status(code: int, body: bytes) -> Behaviour:
    return Behaviour("status", status=code, body=body)


def hang() -> Behaviour:
    return Behaviour("hang")


def content_event(i: int) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


@dataclass
class FakeEngine:
    served_name: str = "tiny"
    script: deque[Behaviour] = field(default_factory=deque)
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (path, body) of completion requests
    loaded: set[str] = field(default_factory=set)
    port: int = field(default_factory=free_port)
    connections: int = 0  # TCP connections accepted
    broken: int = 0  # streams whose client (the gateway) hung up before the end
    log: list[tuple[float, str, str]] = field(default_factory=list)  # (monotonic time, what, model): loads, streams

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeEngine:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="fake-engine", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            started.set()
            async with server:
                await self._stop.wait()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:  # connections still open: end them with the engine
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self._loop.run_until_complete(main())
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *headers = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
                raw = await reader.readexactly(length) if length else b""
                if not await self._answer(method, path, raw, writer):
                    return
        writer.close()

    async def _answer(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection was dropped."""
        if path.endswith("/completions") or path == "/v1/responses":
            body = json.loads(raw)
            self.seen.append((path, body))
            behaviour = self.script.popleft() if self.script else answer()
            return await self._complete(behaviour, body, writer)
        if path == "/v1/models":
            cards = [{"id": self.served_name, "object": "model", "parent": None}]
            cards += [{"id": name, "object": "model", "parent": self.served_name} for name in sorted(self.loaded)]
            _reply(writer, 200, json.dumps({"object": "list", "data": cards}).encode())
        elif path == "/v1/load_lora_adapter":
            self.loaded.add(json.loads(raw)["lora_name"])
            self.log.append((time.monotonic(), "load", json.loads(raw)["lora_name"]))
            _reply(writer, 200, b"Success", b"text/plain")
        elif path == "/v1/unload_lora_adapter":
            self.loaded.discard(json.loads(raw)["lora_name"])
            self.log.append((time.monotonic(), "unload", json.loads(raw)["lora_name"]))
            _reply(writer, 200, b"Success", b"text/plain")
        elif path == "/metrics":
            _reply(writer, 200, b"vllm:num_requests_running 0.0\nvllm:num_requests_waiting 0.0\n", b"text/plain")
        else:
            _reply(writer, 200, b"")
        await writer.drain()
        return True

    async def _complete(self, behaviour: Behaviour, body: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        if behaviour.kind == "drop":
            writer.transport.abort()
            return False
        if behaviour.kind == "hang":
            await asyncio.sleep(3600)
        if behaviour.kind == "status":
            _reply(writer, behaviour.status, behaviour.body)
            await writer.drain()
            return True
        if behaviour.kind == "answer" and not body.get("stream"):
            message = {"role": "assistant", "content": "ok"}
            answer_body = {
                "id": "c",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": USAGE,
            }
            _reply(writer, 200, json.dumps(answer_body).encode())
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        events = behaviour.events if behaviour.kind != "answer" else 3
        self.log.append((time.monotonic(), "stream", str(body.get("model"))))
        try:
            for i in range(events):
                if behaviour.gap_s:
                    await asyncio.sleep(behaviour.gap_s)
                writer.write(_chunk(content_event(i)))
                await writer.drain()
                if writer.transport.is_closing() or reader_gone(writer):
                    raise ConnectionResetError
        except ConnectionError:
            self.broken += 1
            raise
        if behaviour.kind == "drop_after":
            writer.transport.abort()
            return False
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
            writer.write(_chunk(b"data: " + json.dumps(usage).encode() + b"\n\n"))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        self.log.append((time.monotonic(), "streamed", str(body.get("model"))))
        return True


def reader_gone(writer: asyncio.StreamWriter) -> bool:
    """Whether the other side closed its end (EOF seen on the connection)."""
    protocol = writer.transport.get_protocol()
    reader = getattr(protocol, "_stream_reader", None)
    return bool(reader is not None and reader.at_eof())


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _reply(writer: asyncio.StreamWriter, code: int, body: bytes, content_type: bytes = b"application/json") -> None:
    writer.write(
        b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (code, content_type, len(body), body)
    )


@contextlib.contextmanager
def fake_gateway(engines: list[FakeEngine], registry_dir: Path | Any, **settings: Any) -> Iterator[tuple[str, Any]]:
    """A real gateway (external mode) over `engines`, served on loopback; yields (url, app). `registry_dir` is a
    local registry's folder or a Registry (an S3 one, say)."""
    from adapters_registry.registry import Registry, open_registry
    from gateway.app import create_app
    from gateway.settings import load_settings
    from tests.fixtures.gateway import served

    port = free_port()
    config = load_settings(
        **{
            "mode": "external",
            "base_name": "tiny",
            "port": port,
            "registry": str(registry_dir.location if isinstance(registry_dir, Registry) else registry_dir),
            "external": {"urls": [engine.url for engine in engines]},
            "health_interval_s": 0.2,
            "drain_grace_s": 5.0,
            **settings,
        }
    )
    registry = registry_dir if isinstance(registry_dir, Registry) else open_registry(registry_dir)
    app = create_app(config, registry=registry)

    def healthy() -> bool:
        gateway = getattr(app.state, "gateway", None)
        return gateway is not None and all(e.healthy for e in gateway.supervisor.engines.values())

    with served(app, port) as url:
        wait_until(healthy, 30, "the fake engines healthy", interval_s=0.05)
        yield url, app
