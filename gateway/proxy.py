"""Forwarding one OpenAI call to an engine: body untouched apart from `model`, streams passed chunk by chunk.

A request whose engine fails before any byte reached the client is retried once on another engine. A client that
disconnects mid-stream closes the upstream connection, which makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.adapters import AdapterManager, Lease, Target
from gateway.errors import Unavailable, UpstreamError
from gateway.hooks import CallContext, CompletionHook
from gateway.supervisor import Supervisor

log = logging.getLogger(__name__)

# Failures before any answer byte reached the client, so the request can be retried once.
UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)  # nothing listens there: the engine is gone
DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)  # a connection broke before the answer
RETRYABLE = (*UNREACHABLE, *DROPPED)
PASSED_HEADERS = ("content-type",)


class FailureVerdict(NamedTuple):
    mark_unhealthy: bool  # stop routing to the engine until its health check passes again
    probe_now: bool  # run the engine's health check at once instead of at the next interval
    retry_elsewhere: bool  # exclude the engine from the retry


def failure_verdict(exc: Exception, another_engine_ready: bool) -> FailureVerdict:
    """What a failure before any answer byte says about the engine, and where the one retry goes.

    A refused connection means the engine is gone. A broken one is most often an idle keep-alive connection the
    engine closed just as the gateway reused it, so the engine stays in rotation and is probed at once; the retry
    goes to another ready engine, else to a fresh connection on the same one.
    """
    if isinstance(exc, UNREACHABLE):
        return FailureVerdict(mark_unhealthy=True, probe_now=False, retry_elsewhere=True)
    return FailureVerdict(mark_unhealthy=False, probe_now=True, retry_elsewhere=another_engine_ready)


@dataclass
class CallRecord:
    """What happened to one call, for metrics and usage events."""

    route: str
    target: Target
    request_id: str
    stream: bool
    started: float = field(default_factory=time.monotonic)
    engine: str | None = None
    status: int = 200
    error_code: str | None = None
    ttft_s: float | None = None
    queue_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    output_valid: bool | None = None
    strip_usage: bool = False  # usage was requested upstream for metrics only: keep it from the client


def with_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Ask the engine for a final usage chunk (token accounting); True when the client did not ask for it."""
    options = body.get("stream_options")
    options = options if isinstance(options, dict) else {}
    if options.get("include_usage"):
        return body, False
    return {**body, "stream_options": {**options, "include_usage": True}}, True


class UsageStripper:
    """Drops the usage-only SSE event (`"choices":[]`) that was requested for metrics, not by the client."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        kept = []
        while (end := self._buffer.find(b"\n\n")) != -1:
            event, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
            if not (b'"usage"' in event and (b'"choices":[]' in event or b'"choices": []' in event)):
                kept.append(event)
        return b"".join(kept)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest


class AdapterVanished(Exception):
    """The engine answered 404 for an adapter the ledger says it holds."""


def vanished(error: UpstreamError, target: Target) -> bool:
    return error.status == 404 and target.key is not None and f"`{target.key}`".encode() in error.body


class SSEAccumulator:
    """Reads an SSE stream on the side: usage, and (when hooks want it) the assembled answer."""

    def __init__(self, collect_text: bool) -> None:
        self.collect_text = collect_text
        self._buffer = b""
        self.usage: dict[str, Any] | None = None
        self.texts: dict[int, list[str]] = {}
        self.finish_reasons: dict[int, str | None] = {}
        self.done = False  # the `[DONE]` sentinel passed: the answer is complete

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip() == b"data: [DONE]":
                self.done = True
                continue
            if not line.startswith(b"data: "):
                continue
            if not self.collect_text and b'"usage":{' not in line and b'"usage": {' not in line:
                continue
            try:
                event = json.loads(line[6:])
            except ValueError:
                continue
            if isinstance(event.get("usage"), dict):
                self.usage = event["usage"]
            for choice in event.get("choices") or []:
                index = int(choice.get("index", 0))
                piece = choice.get("text")
                if piece is None:
                    piece = (choice.get("delta") or {}).get("content")
                if piece:
                    self.texts.setdefault(index, []).append(piece)
                if choice.get("finish_reason") is not None:
                    self.finish_reasons[index] = choice["finish_reason"]

    def answer(self, route: str) -> dict[str, Any]:
        choices = []
        for index in sorted(self.texts.keys() | self.finish_reasons.keys()):
            text = "".join(self.texts.get(index, []))
            content = {"message": {"role": "assistant", "content": text}} if route == "chat" else {"text": text}
            choices.append({"index": index, "finish_reason": self.finish_reasons.get(index), **content})
        return {"choices": choices, "usage": self.usage}


class UpstreamStreamResponse(StreamingResponse):
    """Streams upstream chunks as they arrive; on client disconnect cancels the pump and closes the upstream."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        status_code: int,
        headers: dict[str, str],
        on_close: Callable[[bool], Awaitable[None]],
    ) -> None:
        super().__init__(chunks, status_code=status_code, headers=headers)
        self.chunks = chunks
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False

        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pump_task = asyncio.create_task(pump())
        watch_task = asyncio.create_task(watch())
        try:
            done, _ = await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if pump_task in done:
                try:
                    pump_task.result()
                except OSError:  # the server found the client gone while writing to it, before we heard so
                    disconnected = True
            else:
                disconnected = True
        finally:
            for task in (pump_task, watch_task):
                task.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)
            await self.on_close(disconnected)


class Proxy:
    def __init__(
        self,
        client: httpx.AsyncClient,
        supervisor: Supervisor,
        adapters: AdapterManager,
        hooks: list[CompletionHook],
        observe: Callable[[CallRecord], None],
    ) -> None:
        self.client = client
        self.client_limit = supervisor.settings.upstream.max_connections
        self.supervisor = supervisor
        self.adapters = adapters
        self.hooks = hooks
        self.observe = observe

    async def forward(self, path: str, route: str, body: dict[str, Any], target: Target, request_id: str) -> Response:
        stream = bool(body.get("stream"))
        record = CallRecord(route, target, request_id, stream)
        call = CallContext(route, target.model, target.manifest, request_id, stream)
        try:
            body = {**body, "model": target.upstream_name}
            for hook in self.hooks:
                body = hook.prepare(call, body)
            if stream:
                body, record.strip_usage = with_usage(body)
            payload = json.dumps(body).encode()
            response = await self._send(path, payload, target, record, call, body)
            while call.notes.pop("retry", False):  # a hook judged the answer broke the adapter's contract
                response = await self._send(path, payload, target, record, call, body)
        except Exception as exc:
            record.status = getattr(exc, "status", 500)
            record.error_code = str(getattr(exc, "code", "internal_error"))
            self.observe(record)
            raise
        return response

    async def _send(
        self,
        path: str,
        payload: bytes,
        target: Target,
        record: CallRecord,
        call: CallContext,
        body: dict[str, Any],
    ) -> Response:
        excluded: set[str] = set()
        for attempt in range(2):
            queued = time.monotonic()
            lease = await self.adapters.acquire(target, record.request_id, excluded)
            record.queue_s = time.monotonic() - queued
            record.engine = lease.engine.id
            request = self.client.build_request(
                "POST",
                f"{lease.engine.url}{path}",
                content=payload,
                headers={"content-type": "application/json", "x-request-id": record.request_id},
            )
            upstream: httpx.Response | None = None
            handed_off = False
            try:
                upstream = await self.client.send(request, stream=True)
                if upstream.status_code >= 400:
                    error = UpstreamError(upstream.status_code, await upstream.aread())
                    if attempt == 0 and vanished(error, target):
                        raise AdapterVanished(lease.engine.id)
                    raise error
                chunks = upstream.aiter_raw()
                first = await anext(chunks, b"")
                record.ttft_s = time.monotonic() - record.started
                if not call.stream:
                    rest = [first] + [chunk async for chunk in chunks]
                    return self._complete(upstream, b"".join(rest), record, call, body)
                handed_off = True
                return self._stream(upstream, first, chunks, lease, record, call, body)
            except AdapterVanished:
                # The engine lost the adapter behind our back (restarted between health checks, or unloaded
                # directly): forget it there and place the request again, which re-loads it.
                log.warning(
                    "%s: engine %s no longer has %s; re-placing", record.request_id, lease.engine.id, target.key
                )
                self.adapters.ledger.record_unloaded(lease.engine.id, target.key or "")
            except httpx.PoolTimeout as exc:  # the gateway's own connection limit, not the engine's fault
                raise Unavailable(
                    f"the gateway has {self.client_limit} requests in flight to its engines; retry shortly",
                    retry_after_s=1,
                    code="engines_busy",
                ) from exc
            except RETRYABLE as exc:
                failed = lease.engine.id
                others = any(e.healthy and e.id not in excluded | {failed} for e in self.supervisor.engines.values())
                verdict = failure_verdict(exc, others)
                if verdict.mark_unhealthy:
                    self.supervisor.report_failure(failed, f"{type(exc).__name__}: {exc}")
                elif verdict.probe_now:
                    self.supervisor.probe_now(failed)
                if verdict.retry_elsewhere:
                    excluded.add(failed)
                log.warning(
                    "%s: engine %s failed before answering (%s: %s)", record.request_id, failed, type(exc).__name__, exc
                )
                if attempt == 1:
                    raise Unavailable("the engine failed while answering and the retry failed too") from exc
            finally:
                if not handed_off:
                    if upstream is not None:
                        await upstream.aclose()
                    lease.release()
        raise AssertionError("unreachable")

    def _headers(self, upstream: httpx.Response, record: CallRecord) -> dict[str, str]:
        headers = {name: upstream.headers[name] for name in PASSED_HEADERS if name in upstream.headers}
        headers["x-loragate-engine"] = record.engine or ""
        return headers

    def _complete(
        self, upstream: httpx.Response, content: bytes, record: CallRecord, call: CallContext, body: dict[str, Any]
    ) -> Response:
        record.status = upstream.status_code
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            usage = answer.get("usage") or {}
            record.prompt_tokens = usage.get("prompt_tokens")
            record.completion_tokens = usage.get("completion_tokens")
            record.output_valid = self._finish(call, body, answer)
        if not call.notes.get("retry"):
            self.observe(record)
        headers = self._headers(upstream, record)
        if record.output_valid is not None:
            headers["x-loragate-output-valid"] = "true" if record.output_valid else "false"
        return Response(content, status_code=upstream.status_code, headers=headers)

    def _finish(self, call: CallContext, body: dict[str, Any], answer: dict[str, Any]) -> bool | None:
        verdict: bool | None = None
        for hook in self.hooks:
            try:
                result = hook.finish(call, body, answer)
            except Exception:
                log.exception("%s: completion hook %r failed", call.request_id, hook)
                continue
            if result is not None:
                verdict = result if verdict is None else verdict and result
        return verdict

    def _stream(
        self,
        upstream: httpx.Response,
        first: bytes,
        chunks: AsyncIterator[bytes],
        lease: Lease,
        record: CallRecord,
        call: CallContext,
        body: dict[str, Any],
    ) -> Response:
        side = SSEAccumulator(collect_text=any(hook.wants_answer(call) for hook in self.hooks))

        stripper = UsageStripper() if record.strip_usage else None

        async def relay() -> AsyncIterator[bytes]:
            side.feed(first)
            yield stripper.feed(first) if stripper else first
            try:
                async for chunk in chunks:
                    side.feed(chunk)
                    if stripper is None:
                        yield chunk
                    elif relayed := stripper.feed(chunk):
                        yield relayed
                if stripper is not None and (rest := stripper.flush()):
                    yield rest
            except httpx.HTTPError as exc:  # bytes already reached the client: end the stream, no retry
                log.error("%s: engine %s failed mid-stream: %s", record.request_id, lease.engine.id, exc)
                self.supervisor.report_failure(lease.engine.id, f"{type(exc).__name__}: {exc}")
                record.error_code = "upstream_stream_failed"

        async def close(disconnected: bool) -> None:
            await upstream.aclose()
            lease.release()
            # SDKs hang up as soon as they read `[DONE]`, sometimes before the upstream's own EOF reaches us:
            # that is a finished request, not a disconnect.
            disconnected = disconnected and not side.done
            if disconnected:
                log.info("%s: client disconnected; upstream request on %s closed", record.request_id, lease.engine.id)
                record.status, record.error_code = 499, "client_disconnected"
            if side.usage:
                record.prompt_tokens = side.usage.get("prompt_tokens")
                record.completion_tokens = side.usage.get("completion_tokens")
            if side.collect_text and not disconnected:
                record.output_valid = self._finish(call, body, side.answer(call.route))
            self.observe(record)

        return UpstreamStreamResponse(
            relay(), status_code=upstream.status_code, headers=self._headers(upstream, record), on_close=close
        )
