"""Forwarding one completion call to an engine and its answer to the client, in ASGI messages.

The body goes out as the client sent it but for `model` (the engine's name for the version) and what the hooks
add; the answer comes back untouched but for a usage event the gateway asked for on its own. Streams are relayed
event block by event block as they arrive (gateway.sse says what is read on the way).

A request whose engine fails before any byte reached the client is retried once (`failure_verdict` says where).
Once bytes have reached the client nothing is retried: a stream the engine breaks, or that the gateway must end
(the drain deadline), ends with an SSE error event, which the OpenAI SDKs raise, and is recorded with a non-2xx
status and the tokens it had delivered. A client that hangs up closes the upstream connection, which makes vLLM
abort the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, NamedTuple

import aiohttp
from starlette.types import Message, Receive, Send

from gateway.adapters import AdapterManager, Lease
from gateway.call import Call, Observer
from gateway.errors import GatewayError, Unavailable, UpstreamError, UpstreamTimeout, send_error
from gateway.hooks import CompletionHook, Verdict
from gateway.sse import StreamScan, error_event, usage_counts, with_usage
from gateway.supervisor import EngineHealth
from gateway.upstream import DROPPED, READ_TIMEOUT, UNREACHABLE, Upstream

log = logging.getLogger(__name__)

USAGE_KEY = b'"usage":'
_decoder = json.JSONDecoder()


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


def vanished(error: UpstreamError, lora_name: str | None) -> bool:
    """The engine answered 404 for an adapter the ledger says it holds."""
    return error.status == 404 and lora_name is not None and f"`{lora_name}`".encode() in error.body


def usage_of(content: bytes) -> tuple[int | None, int | None]:
    """Token counts of a JSON answer, read at its top-level `"usage":` without parsing the rest of it.

    Inside JSON strings quotes are escaped, so the last `"usage":` in the bytes is a key, and the engine writes
    the top-level one after the choices.
    """
    at = content.rfind(USAGE_KEY)
    if at == -1:
        return None, None
    try:
        usage, _ = _decoder.raw_decode(content[at + len(USAGE_KEY) :].decode().lstrip())
    except (ValueError, UnicodeDecodeError):
        return None, None
    return usage_counts(usage)


class Opened(NamedTuple):
    response: aiohttp.ClientResponse
    lease: Lease
    first: bytes  # a stream's first chunk, or the whole body of an answer that is not streamed


class Proxy:
    def __init__(
        self,
        upstream: Upstream,
        supervisor: EngineHealth,
        adapters: AdapterManager,
        hooks: list[CompletionHook],
        observers: list[Observer],
        *,
        worker: int | None = None,
    ) -> None:
        self.upstream = upstream
        self.worker_header = [(b"x-loragate-worker", str(worker).encode())] if worker is not None else []
        self.supervisor = supervisor
        self.adapters = adapters
        self.hooks = hooks
        self.observers = observers
        self.cutting = False  # the drain deadline passed: streams still running end with an error event
        self._streams: set[asyncio.Task[Any]] = set()

    async def forward(self, call: Call, path: str, receive: Receive, send: Send) -> None:
        """Send the call to an engine and the answer to the client; the observers see the call when it ends."""
        try:
            await self._forward(call, path, receive, send)
        except GatewayError as exc:  # raised before anything was sent to the client
            call.fail(exc)
            if exc.status >= 500:
                log.warning("%s: %s %s", call.request_id, exc.status, exc.message)
            await send_error(send, exc, engine=call.engine)
        finally:
            self.finish(call)

    def finish(self, call: Call) -> None:
        call.ended = time.monotonic()
        for observer in self.observers:
            try:
                observer(call)
            except Exception:
                log.exception("%s: observer %r failed", call.request_id, observer)

    async def fetch(self, call: Call, path: str) -> dict[str, Any] | None:
        """A call no client waits for (a shadow copy), as a whole answer: placed, prepared by the hooks and judged
        like any other (`call.output_valid`), never retried for its contract and told to no observer (no request
        metrics, usage event or quota); its parsed answer. GatewayError when the engine refused or failed."""
        body = {**call.body, "model": call.lora_name}
        for hook in self.hooks:
            body = hook.prepare(call, body)
        opened = await self._open(call, path, json.dumps(body).encode())
        call.status = opened.response.status
        self._judge(call, body, opened.first)
        call.ended = time.monotonic()
        return _parsed(opened.first)

    async def _forward(self, call: Call, path: str, receive: Receive, send: Send) -> None:
        body = {**call.body, "model": call.lora_name}
        for hook in self.hooks:
            body = hook.prepare(call, body)
        strip = False
        if call.stream and call.route != "responses":  # Responses streams always end with their usage
            body, strip = with_usage(body)
        payload = json.dumps(body).encode()
        while True:
            opened = await self._open(call, path, payload)
            if call.stream:
                collect = call.keep_answer or any(h.wants_answer(call) for h in self.hooks)
                scan = StreamScan(strip_usage=strip, collect_text=collect)
                await self._relay(call, opened, scan, body, receive, send)
                return
            if self._judge(call, body, opened.first).retry:
                continue
            if call.keep_answer and opened.response.status == 200:
                call.answer = _parsed(opened.first)
            await self._send_whole(call, opened, send)
            return

    # -- placement and the one retry -----------------------------------------------------------------------------

    async def _open(self, call: Call, path: str, payload: bytes) -> Opened:
        """Place the call and send it; a stream's first chunk, or a whole answer, has arrived when this returns.

        A whole answer's connection and lease are already given back; a stream's are the relay's to give back."""
        excluded: set[str] = set()
        headers = {"content-type": "application/json", "x-request-id": call.request_id}
        for attempt in range(2):
            queued = time.monotonic()
            lease = await self.adapters.acquire(call.manifest, call.request_id, excluded)
            call.queue_s = time.monotonic() - queued
            call.engine = lease.engine.id
            if self.upstream.full:  # the gateway's own connection limit, not the engine's fault: no retry
                lease.release()
                raise Unavailable(
                    f"the gateway has {self.upstream.settings.max_connections} requests in flight to its engines; "
                    "retry shortly",
                    retry_after_s=1,
                    code="engines_busy",
                )
            self.upstream.inflight += 1
            response: aiohttp.ClientResponse | None = None
            try:
                response = await self.upstream.open(f"{lease.engine.url}{path}", payload, headers)
                if response.status >= 400:
                    error = UpstreamError(response.status, await response.read())
                    self._done(response, lease)
                    if attempt == 0 and call.manifest is not None and vanished(error, call.lora_name):
                        # The engine lost the adapter behind our back (restarted between health checks, or unloaded
                        # directly): forget it there and place the request again, which re-loads it.
                        log.warning("%s: %s no longer has %s; re-placing", call.request_id, call.engine, call.lora_name)
                        self.adapters.ledger.record_unloaded(lease.engine.id, call.lora_name or "")
                        continue
                    raise error
                if call.stream:
                    first = await response.content.readany()
                    call.ttft_s = time.monotonic() - call.started
                    return Opened(response, lease, first)
                content = await response.read()
                self._done(response, lease)
                return Opened(response, lease, content)
            except (*UNREACHABLE, *DROPPED) as exc:
                self._done(response, lease, abort=True)
                self._failed_before_answer(call, lease, exc, excluded)
                if attempt == 1:
                    raise Unavailable("the engine failed while answering and the retry failed too") from exc
            except READ_TIMEOUT as exc:
                self._done(response, lease, abort=True)
                limit = self.upstream.settings.read_timeout_s
                raise UpstreamTimeout(f"engine {lease.engine.id} sent nothing for {limit:.0f}s") from exc
            except GatewayError:
                raise
            except BaseException:
                self._done(response, lease, abort=True)
                raise
        raise AssertionError("unreachable")

    def _done(self, response: aiohttp.ClientResponse | None, lease: Lease, *, abort: bool = False) -> None:
        """Give back what one attempt held: its connection (dropped when `abort`), its engine lease, its slot."""
        if lease.released:
            return
        if response is not None:
            if abort:
                response.close()  # drops the connection: vLLM aborts a request whose client went away
            else:
                response.release()
        lease.release()
        self.upstream.inflight -= 1

    def _failed_before_answer(self, call: Call, lease: Lease, exc: Exception, excluded: set[str]) -> None:
        failed = lease.engine.id
        others = any(e.healthy and e.id not in excluded | {failed} for e in self.supervisor.engines.values())
        verdict = failure_verdict(exc, others)
        if verdict.mark_unhealthy:
            self.supervisor.report_failure(failed, f"{type(exc).__name__}: {exc}")
        elif verdict.probe_now:
            self.supervisor.probe_now(failed)
        if verdict.retry_elsewhere:
            excluded.add(failed)
        log.warning("%s: engine %s failed before answering (%s: %s)", call.request_id, failed, type(exc).__name__, exc)

    # -- whole answers ---------------------------------------------------------------------------------------------

    def _judge(self, call: Call, body: dict[str, Any], content: bytes) -> Verdict:
        """Token counts and the hooks' verdict of a whole answer (parsed only when some hook checks it)."""
        if not any(hook.wants_answer(call) for hook in self.hooks):
            call.prompt_tokens, call.completion_tokens = usage_of(content)
            return Verdict()
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            return Verdict()
        call.prompt_tokens, call.completion_tokens = usage_counts(answer.get("usage"))
        verdict = self._verdict(call, body, answer)
        call.output_valid = verdict.valid
        return verdict

    def _verdict(self, call: Call, body: dict[str, Any], answer: dict[str, Any]) -> Verdict:
        valid: bool | None = None
        retry = False
        for hook in self.hooks:
            try:
                result = hook.finish(call, body, answer)
            except Exception:
                log.exception("%s: completion hook %r failed", call.request_id, hook)
                continue
            if result.valid is not None:
                valid = result.valid if valid is None else valid and result.valid
            retry = retry or result.retry
        return Verdict(valid, retry)

    async def _send_whole(self, call: Call, opened: Opened, send: Send) -> None:
        response, content = opened.response, opened.first
        call.status = response.status
        headers = self._headers(response, call)
        if call.output_valid is not None:
            headers.append((b"x-loragate-output-valid", b"true" if call.output_valid else b"false"))
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    def _headers(self, response: aiohttp.ClientResponse, call: Call) -> list[tuple[bytes, bytes]]:
        content_type = response.headers.get("content-type", "application/json")
        engine = (call.engine or "").encode()
        return [(b"content-type", content_type.encode()), (b"x-loragate-engine", engine), *self.worker_header]

    # -- streams ---------------------------------------------------------------------------------------------------

    async def _relay(
        self, call: Call, opened: Opened, scan: StreamScan, body: dict[str, Any], receive: Receive, send: Send
    ) -> None:
        response, lease = opened.response, opened.lease
        task = asyncio.current_task()
        assert task is not None
        hung_up = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, hung_up, task))
        self._streams.add(task)
        finished = False
        try:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": self._headers(response, call)}
            )
            if block := scan.feed(opened.first):
                await send({"type": "http.response.body", "body": block, "more_body": True})
            read = response.content.readany
            while chunk := await read():
                if block := scan.feed(chunk):
                    await send({"type": "http.response.body", "body": block, "more_body": True})
            await send({"type": "http.response.body", "body": scan.rest(), "more_body": False})
            finished = True
        except OSError:  # the server found the client gone while writing to it, before it told us so
            hung_up.set()
        except (*DROPPED, *READ_TIMEOUT) as exc:  # bytes already reached the client: end the stream, no retry
            log.error("%s: engine %s failed mid-stream: %s: %s", call.request_id, call.engine, type(exc).__name__, exc)
            self.supervisor.report_failure(lease.engine.id, f"{type(exc).__name__}: {exc}")
            call.status, call.error_code = 502, "upstream_stream_failed"
            await self._end_with_error(send, "the engine failed while streaming the answer", "upstream_error", call)
        except asyncio.CancelledError:
            if hung_up.is_set():
                pass  # the watcher cancelled us: the client hung up
            elif self.cutting:
                call.status, call.error_code = 503, "drain_deadline"
                message = "the gateway is shutting down and its drain period ended before this answer did"
                await self._end_with_error(send, message, "service_unavailable", call)
            else:
                raise
        finally:
            self._streams.discard(task)
            watcher.cancel()
            self._done(response, lease, abort=not finished)
            self._close_stream(call, scan, body, disconnected=hung_up.is_set() and not scan.done)

    @staticmethod
    async def _end_with_error(send: Send, message: str, type_: str, call: Call) -> None:
        try:
            async with asyncio.timeout(2):
                await send({"type": "http.response.body", "body": error_event(message, type_, call.error_code or "")})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (OSError, TimeoutError):
            pass  # the client is gone too

    def _close_stream(self, call: Call, scan: StreamScan, body: dict[str, Any], *, disconnected: bool) -> None:
        # SDKs hang up as soon as they read `[DONE]`, sometimes before the upstream's own EOF reaches us: that is a
        # finished request, not a disconnect.
        if disconnected:
            log.info("%s: client disconnected; upstream request on %s closed", call.request_id, call.engine)
            call.status, call.error_code = 499, "client_disconnected"
        call.events = scan.events
        if scan.usage:
            call.prompt_tokens, call.completion_tokens = usage_counts(scan.usage)
        elif call.status != 200:  # what a stream cut short had delivered, about: one token an event
            call.completion_tokens = scan.events - (1 if scan.done else 0)
        if scan.collect_text and call.status == 200:
            answer = scan.answer(call.route)
            if any(hook.wants_answer(call) for hook in self.hooks):  # not merely kept for a shadow's comparison
                call.output_valid = self._verdict(call, body, answer).valid
            call.answer = answer if call.keep_answer else None

    def cut_streams(self) -> int:
        """The drain deadline: end every stream still running with an error event. Returns how many there were."""
        self.cutting = True
        for task in list(self._streams):
            task.cancel()
        return len(self._streams)


def _parsed(content: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(content)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


async def _watch_disconnect(receive: Receive, hung_up: asyncio.Event, relay: asyncio.Task[Any]) -> None:
    message: Message = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()
    hung_up.set()
    relay.cancel()
