"""One worker process of `loragate serve --workers N` (gateway.workers says how they share the work).

    python -m gateway.worker     # started by the primary, with LORAGATE_WORKER_* in its environment

It serves the completion routes on the public port itself and forwards every other request to the primary.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from starlette.types import Receive, Scope, Send

from adapters_registry import open_registry
from gateway.api.completions import ROUTES, CompletionRoute
from gateway.app import drain, settle_quota
from gateway.call import Observer
from gateway.cli import freeze_heap, lean_log_records
from gateway.deps import Gateway, Live
from gateway.errors import MethodNotAllowed, Unavailable, send_error
from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestHeaders, SecurityMiddleware, read_body
from gateway.proxy import Proxy
from gateway.rollouts import RolloutWatch, gateway_actor, retired
from gateway.security import build_security
from gateway.server import GatewayServer
from gateway.settings import Settings
from gateway.shadow import Shadows
from gateway.structured import StructuredOutputs
from gateway.upstream import Upstream
from gateway.usage import UsageEmitter
from gateway.workers import PrimaryLink, WorkerAdapters, WorkerEngines, reuse_port_socket

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"host", b"upgrade", b"te", b"trailer"})


@asynccontextmanager
async def build_worker(settings: Settings, index: int, control: Path, base: str, bound: str) -> AsyncIterator[Gateway]:
    async with AsyncExitStack() as stack:
        registry = await asyncio.to_thread(open_registry, settings.registry)
        upstream = await stack.enter_async_context(Upstream(settings.upstream))
        metrics = GatewayMetrics(registry=CollectorRegistry(), max_adapter_labels=settings.metrics_max_adapter_labels)
        security = build_security(settings.security, registry.store, metrics, base_name=base, replicas=settings.workers)
        usage = UsageEmitter(settings.usage_webhook_url, metrics=metrics)
        await usage.start()
        stack.push_async_callback(usage.aclose)
        engines = WorkerEngines()
        routing = settings.routing
        adapters = WorkerAdapters(
            registry,
            upstream,
            engines.engines,
            base_name=base,
            bound_base=bound,
            policy=routing.policy(),
            load_timeout_s=settings.adapters.load_timeout_s,
            metrics=metrics,
            materialize=False,
            resolve_ttl_s=settings.adapters.resolve_ttl_s,
        )
        metrics.watch_dispatcher(adapters.dispatcher)
        link = PrimaryLink(control, index, engines, adapters)
        link.metrics_text = lambda: metrics.render()[0].decode()
        await link.connect()
        stack.push_async_callback(link.aclose)
        registry.audit = security.audit.registry_hook("gateway")  # a rollout this worker stops is audited
        watch = RolloutWatch(
            lambda: registry,
            gateway_actor(),
            on_stopped=functools.partial(retired, adapters, unload=False),  # the primary owns the engines' adapters
            on_rollback=metrics.rollout_stopped,
        )
        stack.push_async_callback(watch.aclose)
        observers: list[Observer] = [metrics.observe_request, usage.emit, settle_quota, watch]
        proxy = Proxy(upstream, engines, adapters, [StructuredOutputs()], observers, worker=index)
        shadows = Shadows(proxy, metrics)
        stack.push_async_callback(shadows.aclose)
        yield Gateway(
            settings, base, registry, upstream, engines, adapters, proxy, metrics, usage, security, shadows, watch
        )


class Forwarder:
    """Every request but a completion, sent to the primary's HTTP server on its Unix socket, answer passed back."""

    def __init__(self, primary: Path, max_body_bytes: int) -> None:
        self.primary = primary
        self.max_body_bytes = max_body_bytes
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.primary)), auto_decompress=False
            )
        try:
            body, _ = await read_body(receive, self.max_body_bytes + 1)  # past the limit: the primary says so
        except Exception:
            body = b"x" * (self.max_body_bytes + 1)
        headers = CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in HOP_BY_HOP
        )
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"http://primary{scope['path']}" + (f"?{query}" if query else "")
        try:
            async with self._session.request(scope["method"], url, headers=headers, data=body) as response:
                content = await response.read()
                raw = [(k, v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP | {b"content-length"}]
        except aiohttp.ClientError as exc:
            await send_error(send, Unavailable(f"the gateway's primary process did not answer: {exc}", code="starting"))
            return
        raw.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": raw})
        await send({"type": "http.response.body", "body": content})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class WorkerApp:
    def __init__(self, settings: Settings, index: int, control: Path, primary: Path, base: str, bound: str) -> None:
        self.settings = settings
        self.live = Live()
        self._worker = (index, control, base, bound)
        routes = {path: CompletionRoute(self.live, path) for path in ROUTES}

        async def completion(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["method"] != "POST":
                await send_error(send, MethodNotAllowed("Method Not Allowed"))
                return
            await routes[scope["path"]](scope, receive, send)

        self.fast_lane = RequestHeaders(SecurityMiddleware(completion, self.live))
        self.forward = Forwarder(primary, settings.security.limits.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http" and scope["path"] in ROUTES:
            await self.fast_lane(scope, receive, send)
        elif scope["type"] == "http":
            await self.forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            async with build_worker(self.settings, *self._worker) as gateway:
                self.live.gateway = gateway
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
                await drain(gateway, self.settings.drain_grace_s)
                await self.forward.aclose()
        except Exception as exc:
            log.exception("worker start-up failed")
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lean_log_records()
    env = os.environ
    settings = Settings.model_validate(json.loads(env["LORAGATE_WORKER_SETTINGS"]))
    index = int(env["LORAGATE_WORKER_INDEX"])
    app = WorkerApp(
        settings,
        index,
        Path(env["LORAGATE_WORKER_CONTROL"]),
        Path(env["LORAGATE_WORKER_PRIMARY"]),
        env["LORAGATE_WORKER_BASE"],
        env["LORAGATE_WORKER_BOUND_BASE"],
    )
    sock = reuse_port_socket(settings.host, settings.port)
    grace = settings.drain_grace_s
    config = uvicorn.Config(
        app,
        timeout_graceful_shutdown=int(grace + 5),
        timeout_keep_alive=settings.keep_alive_s,
        log_level="warning",
        access_log=False,
    )
    freeze_heap()
    GatewayServer(config, app.live, grace).run(sockets=[sock])


if __name__ == "__main__":
    main()
