"""The gateway application: `create_app(settings)` builds the ASGI app; `build_gateway` assembles what it runs on.

`build_gateway` opens every resource on one `AsyncExitStack`, so a start that fails half-way (an engine that
never comes up, a registry that cannot be read) closes what it had opened, in reverse order. The lifespan serves
inside it and drains on the way out (`drain`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from adapters_registry import Registry, open_registry
from gateway.adapters import AdapterManager
from gateway.api import admin, openai
from gateway.api.completions import ROUTES, CompletionRoute, openapi_paths
from gateway.base_model import bound_base_name, resolve_served_base
from gateway.call import Call
from gateway.deps import Gateway, Live
from gateway.engine_collector import engine_snapshots
from gateway.errors import MethodNotAllowed, install_error_handlers, send_error
from gateway.hooks import CompletionHook
from gateway.metrics import GatewayMetrics
from gateway.metrics_server import metrics_server
from gateway.middleware import RequestHeaders, SecurityMiddleware
from gateway.proxy import Proxy
from gateway.rollouts import RolloutWatch, gateway_actor, retired
from gateway.security import build_security, settle
from gateway.settings import Settings
from gateway.shadow import Shadows
from gateway.structured import StructuredOutputs
from gateway.supervisor import Engine, Supervisor
from gateway.upstream import Upstream
from gateway.usage import UsageEmitter
from gateway.workers import WorkerHub, WorkerPool, merge_expositions

log = logging.getLogger(__name__)


def settle_quota(call: Call) -> None:
    settle(call.quota, call.prompt_tokens, call.completion_tokens, call.events)


@asynccontextmanager
async def build_gateway(
    settings: Settings,
    registry: Registry | None = None,
    hooks: list[CompletionHook] | None = None,
    *,
    worker_dir: Path | None = None,
) -> AsyncIterator[Gateway]:
    """The running gateway: engines started (not yet ready), every resource closed when the block ends.

    With `worker_dir` (`--workers N`), this is the primary: it starts the workers, which serve the completions."""
    async with AsyncExitStack() as stack:
        reg = registry if registry is not None else await asyncio.to_thread(open_registry, settings.registry)
        model_path, base_name = await asyncio.to_thread(resolve_served_base, settings, reg)
        upstream = await stack.enter_async_context(Upstream(settings.upstream))
        metrics = GatewayMetrics(registry=CollectorRegistry(), max_adapter_labels=settings.metrics_max_adapter_labels)
        security = build_security(settings.security, reg.store, metrics, base_name=base_name)
        reg.audit = security.audit.registry_hook("gateway")  # registry writes through the admin API are audited
        usage = UsageEmitter(settings.usage_webhook_url, metrics=metrics)
        await usage.start()
        stack.push_async_callback(usage.aclose)

        async def on_ready(engine: Engine) -> None:
            await adapters.on_engine_ready(engine)
            metrics.engine_up(engine.id, True)
            if engine.restarts:
                metrics.engine_restarted(engine.id, "exited")

        async def on_down(engine: Engine) -> None:
            metrics.engine_up(engine.id, False)
            await adapters.on_engine_down(engine)

        async def on_tick(engine: Engine) -> None:
            await adapters.reconcile(engine)

        supervisor = Supervisor(
            settings,
            upstream,
            model_path=model_path,
            served_name=base_name,
            on_ready=on_ready,
            on_down=on_down,
            on_tick=on_tick,
            on_added=lambda engine: adapters.ledger.add_engine(engine.id, engine.slots),
            on_removed=lambda engine: adapters.ledger.remove_engine(engine.id),
        )
        routing = settings.routing
        adapters = AdapterManager(
            reg,
            upstream,
            supervisor.engines,
            base_name=base_name,
            bound_base=bound_base_name(settings, base_name),
            policy=routing.policy(),
            load_timeout_s=settings.adapters.load_timeout_s,
            metrics=metrics,
            materialize=settings.adapters.materialize,
            pinned=settings.adapters.pinned,
            resolve_ttl_s=settings.adapters.resolve_ttl_s,
            prewarm=settings.adapters.prewarm,
            prewarm_timeout_s=settings.adapters.prewarm_timeout_s,
        )
        watch = RolloutWatch(
            lambda: gateway.registry,
            gateway_actor(),
            on_stopped=functools.partial(retired, adapters),
            on_rollback=metrics.rollout_stopped,
        )
        stack.push_async_callback(watch.aclose)
        adapters.resolver.on_dropped = adapters.retire_soon  # a move made elsewhere (CLI, another replica) unloads too
        proxy = Proxy(
            upstream,
            supervisor,
            adapters,
            [*(hooks or []), StructuredOutputs()],
            [metrics.observe_request, usage.emit, settle_quota, watch],
        )
        shadows = Shadows(proxy, metrics)
        stack.push_async_callback(shadows.aclose)
        gateway = Gateway(
            settings, base_name, reg, upstream, supervisor, adapters, proxy, metrics, usage, security, shadows, watch
        )
        metrics.add_state_collector(lambda: engine_snapshots(adapters.ledger, supervisor.engines, adapters.manifests))
        metrics.watch_dispatcher(adapters.dispatcher)
        if settings.metrics_port is not None:  # up before the engines and stopped after them: scrapes see both
            render = functools.partial(render_metrics, gateway)
            await stack.enter_async_context(metrics_server(settings.host, settings.metrics_port, render))
        stack.push_async_callback(supervisor.stop)  # SIGTERM, grace, SIGKILL to each engine's process group
        await supervisor.start()
        if worker_dir is not None:
            await start_workers(stack, gateway, worker_dir, bound_base_name(settings, base_name))
        log.info("gateway serving base '%s' with %s engine(s)", base_name, len(supervisor.engines) or "discovered")
        yield gateway


async def start_workers(stack: AsyncExitStack, gateway: Gateway, worker_dir: Path, bound_base: str) -> None:
    """The control channel, then the worker processes; at shutdown they stop before the engines do."""
    settings = gateway.settings
    hub = WorkerHub(gateway, worker_dir / "control.sock")
    await hub.start()
    stack.push_async_callback(hub.aclose)
    pool = WorkerPool(
        settings.workers,
        {
            "LORAGATE_WORKER_SETTINGS": settings.model_dump_json(),
            "LORAGATE_WORKER_CONTROL": str(hub.path),
            "LORAGATE_WORKER_PRIMARY": str(worker_dir / "primary.sock"),
            "LORAGATE_WORKER_BASE": gateway.base_name,
            "LORAGATE_WORKER_BOUND_BASE": bound_base,
        },
    )
    pool.start()
    stack.push_async_callback(pool.stop, settings.drain_grace_s + 10)  # each worker drains its own calls
    gateway.workers = hub


async def render_metrics(gateway: Gateway) -> tuple[bytes, str]:
    """This process's metrics, with the workers' added when there are workers."""
    body, content_type = gateway.metrics.render()
    if gateway.workers is None:
        return body, content_type
    return merge_expositions([body.decode(), *await gateway.workers.metrics_texts()]), content_type


async def drain(gateway: Gateway, grace_s: float) -> None:
    """Shutting down: refuse new completions, give the running ones `grace_s`, then end the streams still open."""
    gateway.draining = True  # new completions get 503 + Retry-After; /readyz fails
    deadline = time.monotonic() + grace_s
    while gateway.inflight() and time.monotonic() < deadline:  # in-flight calls get the grace period
        await asyncio.sleep(0.05)
    if gateway.inflight():  # streams still open end with an SSE error event, recorded as 503 drain_deadline
        cut = gateway.proxy.cut_streams()
        log.warning(
            "drain: %s call(s) still in flight after %.0fs; %s stream(s) ended", gateway.inflight(), grace_s, cut
        )
        while gateway.inflight() and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.05)


class GatewayApp(FastAPI):
    """FastAPI, with a fast lane for the completion routes: the same two middlewares in front of them, without the
    router and Starlette's error and exception layers (their work is done by RequestHeaders and the route itself),
    about 20 us less per request."""

    def __init__(self, live: Live, **kw: Any) -> None:
        super().__init__(**kw)
        self.state.live = live
        routes = {path: CompletionRoute(live, path) for path in ROUTES}

        async def completion(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["method"] != "POST":
                await send_error(send, MethodNotAllowed("Method Not Allowed"))
                return
            await routes[scope["path"]](scope, receive, send)

        self.fast_lane = RequestHeaders(SecurityMiddleware(completion, live))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in ROUTES:
            scope["app"] = self
            await self.fast_lane(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    registry: Registry | None = None,
    hooks: list[CompletionHook] | None = None,
    worker_dir: Path | None = None,
) -> FastAPI:
    live = Live()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with build_gateway(settings, registry, hooks, worker_dir=worker_dir) as gateway:
            live.gateway = app.state.gateway = gateway
            try:
                yield
            finally:
                await drain(gateway, settings.drain_grace_s)

    app = GatewayApp(live, title="loragate gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(SecurityMiddleware, live=live)  # inside RequestHeaders: its refusals carry x-request-id too
    app.add_middleware(RequestHeaders)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(admin.probes)

    if settings.metrics_port is None:

        @app.get("/metrics", include_in_schema=False)
        async def prometheus(request: Request) -> Response:
            body, content_type = await render_metrics(request.app.state.gateway)
            return Response(body, media_type=content_type)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema["paths"] = {**openapi_paths(), **schema.get("paths", {})}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
