"""Usage events: one JSON log line per finished request, optionally POSTed in batches to a webhook.

`emit` never blocks the request path: the webhook gets events through a bounded queue drained by a background
task; when the queue is full, or a POST fails, events are dropped and counted in
`loragate_usage_events_dropped_total{reason}`. The log line is always written (logger "gateway.usage").
Webhook body: `{"events": [<event>, ...]}`; no retries (the log line is the durable record).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from gateway.call import Call
from gateway.metrics import GatewayMetrics

logger = logging.getLogger(__name__)
_line = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps with options builds an encoder per call

UsageEvent = dict[str, Any]


def usage_event(outcome: Call, timestamp: float) -> UsageEvent:
    """The event for one finished request (a pure function of the outcome and the time it finished)."""
    if outcome.adapter is None:
        model = None
    elif outcome.version is None:
        model = outcome.adapter
    else:
        model = f"{outcome.adapter}@{outcome.version}"
    total = None
    if outcome.prompt_tokens is not None or outcome.completion_tokens is not None:
        total = (outcome.prompt_tokens or 0) + (outcome.completion_tokens or 0)
    return {
        "event": "request",
        "time": datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds"),
        "request_id": outcome.request_id,
        "model": model,
        "adapter": outcome.adapter,
        "version": outcome.version,
        "key_id": outcome.key_id,
        "route": outcome.route,
        "stream": outcome.stream,
        "engine": outcome.engine,
        "status": outcome.status,
        "error_code": outcome.error_code,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": total,
        "latency_s": round(outcome.latency_s, 6),
        "ttft_s": None if outcome.ttft_s is None else round(outcome.ttft_s, 6),
        "output_valid": outcome.output_valid,
    }


class UsageEmitter:
    def __init__(
        self,
        webhook_url: str | None,
        *,
        metrics: GatewayMetrics | None = None,
        queue_size: int = 1024,
        batch_size: int = 64,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError(f"queue_size and batch_size must be >= 1, got {queue_size} and {batch_size}")
        self.webhook_url = webhook_url
        self._metrics = metrics
        self._batch_size = batch_size
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 2.0))
        self._transport = transport
        self._queue: asyncio.Queue[UsageEvent] | None = asyncio.Queue(queue_size) if webhook_url else None
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    async def start(self) -> None:
        if self._queue is None or self._task is not None:
            return
        self._client = httpx.AsyncClient(timeout=self._timeout, transport=self._transport)
        self._task = asyncio.create_task(self._deliver(self._queue, self._client), name="usage-webhook")

    def emit(self, outcome: Call) -> UsageEvent:
        event = usage_event(outcome, time.time())
        logger.info("%s", _line(event))
        if self._queue is None:
            return event
        if self._closed:
            self._dropped("closed", 1)
            return event
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped("queue_full", 1)
        return event

    async def aclose(self, flush_timeout_s: float = 5.0) -> None:
        self._closed = True
        if self._queue is None:
            return
        if self._task is not None:
            # let the worker drain what is queued, then stop it and count what is left
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), flush_timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = self._queue.qsize()
        if left:
            self._dropped("shutdown", left)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _deliver(self, queue: asyncio.Queue[UsageEvent], client: httpx.AsyncClient) -> None:
        assert self.webhook_url is not None
        while True:
            batch = [await queue.get()]
            while len(batch) < self._batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                ok = await self._post(client, batch)
            except asyncio.CancelledError:
                self._dropped("shutdown", len(batch))
                raise
            finally:
                for _ in batch:
                    queue.task_done()
            if self._metrics is not None:
                self._metrics.usage_webhook_posted(ok)
            if not ok:
                self._dropped("webhook_error", len(batch))

    async def _post(self, client: httpx.AsyncClient, batch: list[UsageEvent]) -> bool:
        assert self.webhook_url is not None
        try:
            response = await client.post(self.webhook_url, json={"events": batch})
        except httpx.HTTPError as exc:
            logger.warning("usage webhook %s failed: %s: %s", self.webhook_url, type(exc).__name__, exc)
            return False
        if response.is_success:
            return True
        logger.warning(
            "usage webhook %s answered %s; %s events dropped", self.webhook_url, response.status_code, len(batch)
        )
        return False

    def _dropped(self, reason: str, count: int) -> None:
        if self._metrics is not None:
            self._metrics.usage_event_dropped(reason, count)
        else:
            logger.warning("usage: %s events dropped (%s)", count, reason)
