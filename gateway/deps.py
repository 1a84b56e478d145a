"""The running gateway's parts, as one object on `app.state`, and the FastAPI dependency that hands it out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

import httpx
from fastapi import Depends, Request

from adapters_registry import Registry
from gateway.adapters import AdapterManager
from gateway.metrics import GatewayMetrics, RequestOutcome
from gateway.proxy import Proxy
from gateway.settings import Settings
from gateway.supervisor import Supervisor
from gateway.usage import UsageEmitter


@dataclass
class Gateway:
    settings: Settings
    base_name: str
    registry: Registry
    client: httpx.AsyncClient
    supervisor: Supervisor
    adapters: AdapterManager
    proxy: Proxy
    metrics: GatewayMetrics
    usage: UsageEmitter
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def observe(self, outcome: RequestOutcome) -> None:
        self.metrics.observe_request(outcome)
        self.usage.emit(outcome)

    def inflight(self) -> int:
        return sum(engine.inflight for engine in self.supervisor.engines.values())


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
