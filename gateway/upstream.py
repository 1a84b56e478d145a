"""The gateway's HTTP client for its engines: aiohttp, one session for the data plane and one for control calls.

Chosen by measurement (benchmarks/bench_dataplane.py and the README's data-plane section): against the instant
upstream at 32 concurrent requests, httpx 0.29 spent 1.28 ms of CPU per plain request and 3.2 ms per 32-event
stream, aiohttp 3.14 0.075 ms and 0.30 ms; most of httpx's time went to httpcore's pool bookkeeping, which walks
every pooled connection on every request.

The data plane and control calls (health, metrics, adapter loads) use separate connection pools, so a full data
plane never starves a health check into marking an engine down. The data plane's connection limit is enforced
here, before a request is sent (`full`): a request past it is refused at once (503 `engines_busy`), never queued
behind the pool. Idle connections are closed after `keepalive_s`, below vLLM's own keep-alive (5 s), so a request
is never written on a connection the engine is closing.

Failures are sorted for the proxy: `UNREACHABLE` (nothing listens there: the engine is gone), `DROPPED` (a
connection broke before the answer, most often a keep-alive race: retry on a fresh one), `READ_TIMEOUT`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.settings import UpstreamSettings

UNREACHABLE: tuple[type[Exception], ...] = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
DROPPED: tuple[type[Exception], ...] = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientConnectionResetError,
    aiohttp.ClientOSError,
    aiohttp.ClientPayloadError,
)
READ_TIMEOUT: tuple[type[Exception], ...] = (aiohttp.SocketTimeoutError,)
ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError, TimeoutError)
CONTROL_CONNECTIONS = 64


@dataclass(frozen=True)
class Reply:
    """A control call's answer, read whole."""

    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class Upstream:
    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.inflight = 0  # data-plane requests holding a connection
        self._data: aiohttp.ClientSession | None = None
        self._control: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Upstream:
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s)
        self._data = self._session(s.max_connections, timeout)
        self._control = self._session(CONTROL_CONNECTIONS, aiohttp.ClientTimeout(total=30, sock_connect=5))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _session(self, limit: int, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=self.settings.keepalive_s)
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def aclose(self) -> None:
        for session in (self._data, self._control):
            if session is not None:
                await session.close()
        self._data = self._control = None

    @property
    def full(self) -> bool:
        return self.inflight >= self.settings.max_connections

    async def open(self, url: str, payload: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """POST `payload` and return the response once its headers arrived (the caller reads and releases it)."""
        assert self._data is not None, "Upstream used outside its `async with`"
        response: aiohttp.ClientResponse = await self._data.post(url, data=payload, headers=headers)
        return response

    async def get(self, url: str, timeout_s: float = 5.0) -> Reply:
        return await self._call("GET", url, None, timeout_s)

    async def post_json(self, url: str, body: dict[str, Any], timeout_s: float = 30.0) -> Reply:
        return await self._call("POST", url, body, timeout_s)

    async def _call(self, method: str, url: str, body: dict[str, Any] | None, timeout_s: float) -> Reply:
        assert self._control is not None, "Upstream used outside its `async with`"
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 5.0))
        async with self._control.request(method, url, json=body, timeout=timeout) as response:
            return Reply(response.status, await response.read())
