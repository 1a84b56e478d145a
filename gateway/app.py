"""The gateway application: `create_app(settings)` builds the FastAPI app; its lifespan owns every resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_registry import Registry, open_registry
from adapters_registry.errors import NotFoundError
from gateway.adapters import AdapterManager
from gateway.api import admin, openai
from gateway.auth import SecurityMiddleware, build_security
from gateway.deps import Gateway
from gateway.errors import GatewayError, error_envelope
from gateway.hooks import CompletionHook
from gateway.metrics import EngineSnapshot, GatewayMetrics, RequestOutcome, ResidentAdapter, residency_tier
from gateway.metrics_server import metrics_server
from gateway.proxy import CallRecord, Proxy
from gateway.routing import Policy
from gateway.settings import Settings
from gateway.structured import StructuredOutputs
from gateway.supervisor import Engine, Supervisor
from gateway.usage import UsageEmitter

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class BaseModelError(Exception):
    """`base` names neither a directory nor a registry base."""


def resolve_base(settings: Settings, registry: Registry) -> tuple[str | None, str]:
    """(model path for managed engines, served base name)."""
    if settings.mode == "external":
        return None, settings.base_name or str(settings.base)
    assert settings.base is not None
    path = Path(settings.base).expanduser()
    if path.is_dir():
        return str(path.resolve()), settings.base_name or path.name
    try:
        registry.get_base(settings.base)
    except NotFoundError as exc:
        raise BaseModelError(f"base '{settings.base}' is neither a directory nor a registered base") from exc
    return str(registry.base_dir(settings.base)), settings.base_name or settings.base


def bound_base_name(settings: Settings, served_name: str) -> str:
    """The registry base that adapters must be bound to: `base` when it names a registry base, else the served name."""
    if settings.base and not Path(settings.base).expanduser().is_dir():
        return settings.base
    return served_name


def upstream_client(settings: Settings) -> httpx.AsyncClient:
    up = settings.upstream
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=up.connect_timeout_s, read=up.read_timeout_s, write=up.write_timeout_s, pool=up.pool_timeout_s
        ),
        limits=httpx.Limits(
            max_connections=up.max_connections,
            max_keepalive_connections=up.max_connections,
            keepalive_expiry=up.keepalive_s,
        ),
    )


class RequestHeaders:
    """Gives every response `x-request-id` and `x-loragate-adapter`; turns an unexpected exception into a 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["adapter"] = "none"
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                headers["x-loragate-adapter"] = state["adapter"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("%s: unhandled error", request_id)
            if not started:
                envelope = error_envelope(
                    f"internal error (request {request_id})", "internal_error", None, "internal_error"
                )
                await JSONResponse(envelope, status_code=500)(scope, receive, send_with_headers)


def register_error_handlers(app: FastAPI) -> None:
    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        if exc.status >= 500:
            log.warning("%s: %s %s", request.state.request_id, exc.status, exc.message)
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers())

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request body')}"
        return JSONResponse(
            error_envelope(message, "invalid_request_error", ".".join(loc) or None, "invalid_request"), status_code=400
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return JSONResponse(
            error_envelope(str(exc.detail), "invalid_request_error", None, code or exc.status_code),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)


def engine_snapshots(gateway: Gateway) -> list[EngineSnapshot]:
    snapshots = []
    ledger = gateway.adapters.ledger
    for engine_id in ledger.engines():
        engine = gateway.supervisor.engines.get(engine_id)
        running = engine.gpu_adapters if engine else None
        resident = []
        for key in ledger.resident(engine_id):
            manifest = gateway.adapters.manifests.get(key)
            if manifest is not None:
                resident.append(ResidentAdapter(manifest.name, str(manifest.version), residency_tier(key, running)))
        waiting, inflight = (engine.waiting, engine.inflight) if engine else (0, 0)
        snapshots.append(EngineSnapshot(engine_id, ledger.slots(engine_id), resident, waiting, inflight))
    return snapshots


def create_app(
    settings: Settings, *, registry: Registry | None = None, hooks: list[CompletionHook] | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg: Registry = registry if registry is not None else await asyncio.to_thread(open_registry, settings.registry)
        model_path, base_name = await asyncio.to_thread(resolve_base, settings, reg)
        client = upstream_client(settings)
        metrics = GatewayMetrics(registry=CollectorRegistry(), max_adapter_labels=settings.metrics_max_adapter_labels)
        security = build_security(settings.security, reg.store, metrics, base_name=base_name)
        app.state.security = security
        reg.audit = security.audit.registry_hook("gateway")  # registry writes through the admin API are audited
        usage = UsageEmitter(settings.usage_webhook_url, metrics=metrics)
        engines: dict[str, Engine] = {}
        policy = Policy(settings.routing.overload_threshold, settings.routing.max_queue, settings.routing.load_bucket)
        adapters = AdapterManager(
            reg,
            client,
            engines,
            base_name=base_name,
            bound_base=bound_base_name(settings, base_name),
            policy=policy,
            load_timeout_s=settings.adapters.load_timeout_s,
            metrics=metrics,
            materialize=settings.adapters.materialize,
        )

        async def on_ready(engine: Engine) -> None:
            await adapters.on_engine_ready(engine)
            metrics.engine_up(engine.id, True)
            if engine.restarts:
                metrics.engine_restarted(engine.id, "exited")

        async def on_down(engine: Engine) -> None:
            metrics.engine_up(engine.id, False)
            await adapters.on_engine_down(engine)

        supervisor = Supervisor(
            settings,
            client,
            model_path=model_path,
            served_name=base_name,
            on_ready=on_ready,
            on_down=on_down,
            on_tick=adapters.reconcile,
        )
        supervisor.engines = engines
        supervisor.on_added = lambda engine: adapters.ledger.add_engine(engine.id, engine.slots)
        supervisor.on_removed = lambda engine: adapters.ledger.remove_engine(engine.id)

        def observe(record: CallRecord) -> None:
            manifest = record.target.manifest
            gateway.observe(
                RequestOutcome(
                    route=record.route,
                    adapter=manifest.name if manifest else None,
                    version=str(manifest.version) if manifest else None,
                    engine=record.engine,
                    status=record.status,
                    error_code=record.error_code,
                    prompt_tokens=record.prompt_tokens,
                    completion_tokens=record.completion_tokens,
                    latency_s=time.monotonic() - record.started,
                    ttft_s=record.ttft_s if record.stream else None,
                    queue_s=record.queue_s,
                    output_valid=record.output_valid,
                    stream=record.stream,
                    request_id=record.request_id,
                    key_id=security.observed(record.request_id, record.prompt_tokens, record.completion_tokens),
                )
            )

        proxy = Proxy(client, supervisor, adapters, [*(hooks or []), StructuredOutputs()], observe)
        gateway = Gateway(settings, base_name, reg, client, supervisor, adapters, proxy, metrics, usage)
        app.state.gateway = gateway
        app.state.metrics = metrics
        metrics.add_state_collector(lambda: engine_snapshots(gateway))
        for ref in settings.adapters.pinned:  # before the engines start, so each one loads them when it is ready
            target = await adapters.resolve(ref)
            assert target.key is not None
            adapters.ledger.pin(target.key)
            adapters.pinned_refs[target.key] = ref
        # /metrics on its own port, when set: up first and stopped last, so a scrape sees the start-up and the drain
        scrape_port = (
            metrics_server(settings.host, settings.metrics_port, metrics.render)
            if settings.metrics_port is not None
            else contextlib.nullcontext()
        )
        async with scrape_port:
            await usage.start()
            await supervisor.start()
            log.info("gateway serving base '%s' with %s engine(s)", base_name, len(engines) or "discovered")
            try:
                yield
            finally:
                gateway.draining = True  # new completions get 503 + Retry-After
                deadline = time.monotonic() + settings.drain_grace_s  # in-flight streams get up to the grace period
                while gateway.inflight() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                if gateway.inflight():
                    log.warning(
                        "drain: %s request(s) still in flight after %.0fs", gateway.inflight(), settings.drain_grace_s
                    )
                await supervisor.stop()  # SIGTERM, grace, SIGKILL to each engine's process group
                await usage.aclose()
                await client.aclose()

    app = FastAPI(title="loragate gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    register_error_handlers(app)
    app.add_middleware(SecurityMiddleware)  # inside RequestHeaders: its refusals carry x-request-id too
    app.add_middleware(RequestHeaders)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(admin.probes)

    if settings.metrics_port is None:

        @app.get("/metrics", include_in_schema=False)
        async def prometheus(request: Request) -> Response:
            body, content_type = request.app.state.metrics.render()
            return Response(body, media_type=content_type)

    return app
