"""uvicorn's server with the gateway's drain, started before uvicorn waits for open connections.

uvicorn's own shutdown stops listening, waits for the open connections, cancels what is left at
`timeout_graceful_shutdown` and only then runs the app's lifespan shutdown. Left at that, a stream still open at the
deadline would be cut as a bare connection drop. Here the drain (gateway.app.drain) starts with the shutdown: new
completions get 503 `draining` at once, the running ones get `drain_grace_s`, and streams still open then end with
an SSE error event. uvicorn's timeout is set a few seconds later, as a backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from gateway.app import drain
from gateway.deps import Live
from gateway.settings import Settings

BACKSTOP_S = 5.0


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, live: Live, drain_grace_s: float) -> None:
        super().__init__(config)
        self.live = live
        self.drain_grace_s = drain_grace_s
        self._drain: asyncio.Task[None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        gateway = self.live.gateway
        if gateway is not None and self._drain is None:
            self._drain = asyncio.create_task(drain(gateway, self.drain_grace_s))
        await super().shutdown(sockets)
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain


def gateway_server(app: FastAPI, **config: Any) -> GatewayServer:
    """The server for an app of `gateway.app.create_app`; `config` is passed to `uvicorn.Config` (host, port, ...)."""
    settings: Settings = app.state.settings
    grace = settings.drain_grace_s
    uvicorn_config = uvicorn.Config(app, timeout_graceful_shutdown=int(grace + BACKSTOP_S), **config)
    return GatewayServer(uvicorn_config, app.state.live, grace)
