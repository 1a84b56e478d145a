"""The gateway's /readyz over real vLLM engines and a registry on a real S3-protocol server that the test hangs
(SIGSTOP): a registry blip leaves every probe ready and answered at once, probes do not each list the registry,
and only an outage longer than the grace period makes the gateway unready, until the registry answers again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters_registry.registry import Registry
from tests.fixtures.gateway import GatewayUnderTest
from tests.fixtures.registry import MotoServer, s3_registry_at
from tests.harness import wait_until

pytestmark = pytest.mark.integration

LIST = "list-type=2"


@pytest.fixture
def on_s3(
    gateway: GatewayUnderTest, private_moto: MotoServer, registry_template: Path, tmp_path: Path
) -> Iterator[Registry]:
    """The running gateway's registry swapped for one on the test's own S3 server (put back afterwards)."""
    reg = s3_registry_at(private_moto.url, registry_template, tmp_path / "cache")
    state = gateway.app.state
    saved_registry, saved_readiness = gateway.state.registry, getattr(state, "registry_readiness", None)
    gateway.state.registry = reg
    try:
        yield reg
    finally:
        private_moto.resume()
        gateway.state.registry = saved_registry
        if saved_readiness is None:
            if hasattr(state, "registry_readiness"):
                del state.registry_readiness
        else:
            state.registry_readiness = saved_readiness


def ready(gateway: GatewayUnderTest) -> tuple[int, list[str]]:
    response = httpx.get(f"{gateway.url}/readyz", timeout=30)
    return response.status_code, response.json()["problems"]


def test_a_registry_blip_leaves_the_gateway_ready(
    gateway: GatewayUnderTest, on_s3: Registry, private_moto: MotoServer
) -> None:
    assert ready(gateway) == (200, [])  # the first probe after the swap checks the new registry

    private_moto.pause()  # the registry hangs: connections are accepted, nothing answers
    try:
        for _ in range(10):
            assert ready(gateway) == (200, [])
    finally:
        private_moto.resume()

    from gateway.readiness import CHECK_INTERVAL_S

    before, started = private_moto.requests(LIST), time.monotonic()
    for _ in range(30):
        assert ready(gateway) == (200, [])
    checks_allowed = 1 + int((time.monotonic() - started) // CHECK_INTERVAL_S)
    assert private_moto.requests(LIST) - before <= checks_allowed < 30  # not one LIST per probe


def test_an_outage_past_the_grace_period_makes_it_unready_until_the_registry_answers(
    gateway: GatewayUnderTest, on_s3: Registry, private_moto: MotoServer
) -> None:
    from gateway.readiness import RegistryReadiness

    gateway.app.state.registry_readiness = RegistryReadiness(interval_s=0, timeout_s=0.5, grace_s=0)
    assert ready(gateway) == (200, [])

    def unready() -> tuple[int, list[str]] | None:
        answer = ready(gateway)
        return answer if answer[0] != 200 else None

    private_moto.pause()
    try:
        answer = wait_until(unready, 60, "unready with the registry down past its grace period", interval_s=0.2)
        assert answer is not None
        status, problems = answer
        assert status == 503 and len(problems) == 1
        assert problems[0].startswith("registry unreachable for ")
        assert problems[0].endswith("s (grace 0s after the last success): no answer within 0.5s")
    finally:
        private_moto.resume()
    # recovers on its own once the registry answers
    wait_until(lambda: ready(gateway) == (200, []), 60, lambda: f"ready again (now {ready(gateway)})", interval_s=0.2)
