"""`/metrics` on a port of its own (`metrics_port`): a scrape port that is never exposed with the API.

It runs as a second uvicorn server in the gateway's event loop, so it reads the same live state as the API does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import StartupError

Render = Callable[[], Awaitable[tuple[bytes, str]]]


class MetricsPortError(StartupError):
    """The metrics port cannot be bound."""


class _SecondServer(uvicorn.Server):
    """Leaves SIGTERM and SIGINT to the gateway's own server, which owns the drain."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def metrics_app(render: Render) -> Starlette:
    async def metrics(request: Request) -> Response:
        body, content_type = await render()
        return Response(body, media_type=content_type)

    return Starlette(routes=[Route("/metrics", metrics)])


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MetricsPortError(f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


@contextlib.asynccontextmanager
async def metrics_server(host: str, port: int, render: Render) -> AsyncIterator[None]:
    """Serves `render()` at http://host:port/metrics for the block."""
    sock = bind(host, port)
    # log_config and log_level None: a Config otherwise re-levels uvicorn's loggers, the gateway server's too
    config = uvicorn.Config(metrics_app(render), log_config=None, log_level=None, access_log=False, lifespan="off")
    server = _SecondServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
            raise MetricsPortError(f"the /metrics server on {host}:{port} stopped at start-up")
        yield
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
