"""Readiness's registry check against a real S3-protocol server (moto) that the test stops or hangs (SIGSTOP), on a
clock the test moves: one check per interval whatever the probe rate, no probe waits on a hung registry, and a
registry down for longer than the grace period (never before) makes the gateway unready."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters_registry.errors import StorageError
from adapters_registry.registry import Registry
from gateway.engine_process import free_port
from gateway.readiness import GRACE_S, RegistryReadiness
from tests.fixtures.registry import MotoServer, s3_registry_at

LIST = "list-type=2"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_check_per_interval_and_a_grace_period(
    private_moto: MotoServer, registry_template: Path, tmp_path: Path
) -> None:
    reg = s3_registry_at(private_moto.url, registry_template, tmp_path / "cache")
    clock = Clock()
    ready = RegistryReadiness(interval_s=10, timeout_s=5, grace_s=300, clock=clock)
    lists = private_moto.requests(LIST)

    async def scenario() -> None:
        assert await ready.problem(reg) is None  # the first probe waits for the first answer
        for _ in range(100):
            assert await ready.problem(reg) is None
        assert (ready.checks, private_moto.requests(LIST) - lists) == (1, 1)
        clock.now += 10
        assert await ready.problem(reg) is None
        await ready.settled()
        assert (ready.checks, private_moto.requests(LIST) - lists) == (2, 2)  # last success at 1010

        private_moto.stop()
        clock.now += 10  # 1020: the third check fails
        assert await ready.problem(reg) is None
        await ready.settled()
        assert ready.checks == 3
        clock.now = 1010 + 300  # exactly the grace period since the last success: still ready
        assert await ready.problem(reg) is None
        await ready.settled()
        clock.now += 1
        problem = await ready.problem(reg)
        assert problem is not None
        assert problem.startswith("registry unreachable for 301s (grace 300s after the last success): StorageError: ")
        assert "Could not connect to the endpoint URL" in problem

    asyncio.run(scenario())


def test_a_hung_registry_never_holds_a_probe(private_moto: MotoServer, registry_template: Path, tmp_path: Path) -> None:
    reg = s3_registry_at(private_moto.url, registry_template, tmp_path / "cache")
    clock = Clock()
    ready = RegistryReadiness(interval_s=10, timeout_s=0.2, grace_s=300, clock=clock)

    async def scenario() -> None:
        assert await ready.problem(reg) is None
        private_moto.pause()  # connections are accepted by the kernel, then nothing answers
        try:
            for _ in range(3):
                clock.now += 10
                assert await ready.problem(reg) is None  # answered from what is known, at once
                await asyncio.sleep(0.3)  # past the check's timeout: the check is counted as failed
            assert ready.checks == 2  # no second check while the hung one still holds its thread
            assert ready._last_error == "no answer within 0.2s"
        finally:
            private_moto.resume()
        await ready.settled()  # the hung request completes once the server runs again
        assert ready._last_error is None and await ready.problem(reg) is None

    asyncio.run(scenario())


def test_a_registry_never_reached_is_not_ready(registry_template: Path, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    from adapters_registry.s3 import S3Store

    reg = Registry(S3Store("bucket", "loragate", endpoint_url=dead), tmp_path / "cache")
    ready = RegistryReadiness()

    async def scenario() -> str | None:
        return await ready.problem(reg)

    problem = asyncio.run(scenario())
    assert problem is not None and problem.startswith(
        f"registry unreachable: StorageError: s3://bucket/loragate/: Could not connect to the endpoint URL: "
        f'"{dead}/bucket?list-type=2'
    )
    assert GRACE_S == 300.0


def test_resolve_answers_from_the_last_known_version_while_the_registry_is_down(
    private_moto: MotoServer, registry_template: Path, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    reg = s3_registry_at(private_moto.url, registry_template, tmp_path / "cache")
    one = reg.push(adapter_dirs[0], "support", "tiny")
    reg.promote("support@1", "prod")
    assert reg.resolve("support:prod") == one
    assert reg.resolve("support") == one
    sent: list[str] = []
    reg.store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    reg.retry_unreachable_s = 3600.0  # no second try within the test
    private_moto.stop()
    assert reg.resolve("support:prod") == one  # the store failed: the answer of moments ago stands in
    tries = len(sent)
    assert tries >= 1
    for _ in range(20):
        assert reg.resolve("support:prod") == one
        assert reg.resolve("support") == one
    assert len(sent) == tries  # known references did not wait on the store again
    reg.retry_unreachable_s = 0.0
    assert reg.resolve("support") == one
    assert len(sent) > tries  # past the retry interval one caller tries the store again
    with pytest.raises(StorageError) as info:
        reg.resolve(f"support@sha256:{one.digest_hex[:8]}")  # never resolved before: nothing to stand in
    assert "Could not connect to the endpoint URL" in str(info.value)
    reg.stale_resolve_s = 0  # past the stale window
    with pytest.raises(StorageError):
        reg.resolve("support:prod")
