"""The running gateway's parts as one object, where the app finds it, and the FastAPI dependencies that hand it out.

`Live` is created with the app and filled in by its lifespan: the middleware, the completion routes and the
dependencies read the running `Gateway` from it (None before start-up finished).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from adapters_registry import Registry
from gateway.errors import Unavailable
from gateway.security import Principal, Security
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.adapters import AdapterManager
    from gateway.metrics import GatewayMetrics
    from gateway.proxy import Proxy
    from gateway.rollouts import RolloutWatch
    from gateway.shadow import Shadows
    from gateway.supervisor import EngineHealth
    from gateway.upstream import Upstream
    from gateway.usage import UsageEmitter
    from gateway.workers import WorkerHub


@dataclass
class Gateway:
    settings: Settings
    base_name: str
    registry: Registry
    upstream: Upstream
    supervisor: EngineHealth
    adapters: AdapterManager
    proxy: Proxy
    metrics: GatewayMetrics
    usage: UsageEmitter
    security: Security
    shadows: Shadows
    rollout_watch: RolloutWatch
    draining: bool = False
    workers: WorkerHub | None = None  # `--workers N`: the processes that serve the completion routes

    def inflight(self) -> int:
        return sum(engine.inflight for engine in self.supervisor.engines.values())


class Live:
    gateway: Gateway | None = None


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway | None = request.app.state.live.gateway
    if gateway is None:
        raise Unavailable("the gateway is starting", retry_after_s=1, code="starting")
    return gateway


async def get_principal(request: Request) -> Principal:
    """The principal the security middleware authenticated."""
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        principal = await get_gateway(request).security.authenticate(request.headers.get("authorization"))
        request.state.principal = principal
    return principal


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
