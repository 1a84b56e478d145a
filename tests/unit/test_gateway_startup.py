"""A gateway start that fails half-way (gateway.app.build_gateway on one AsyncExitStack) closes what it opened: no
task left running, no HTTP session left open, the engines' supervisor stopped. External mode over a FakeEngine."""

from __future__ import annotations

import asyncio
import gc
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters_registry.registry import open_registry
from gateway.app import build_gateway
from gateway.metrics_server import MetricsPortError
from gateway.settings import load_settings
from tests.fakes import FakeEngine


def open_sessions() -> list[aiohttp.ClientSession]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, aiohttp.ClientSession) and not o.closed]


async def failed_start(
    settings: Any, registry_dir: Path, worker_dir: Path | None
) -> tuple[BaseException, set[Any], list[asyncio.Task[Any]]]:
    before = asyncio.all_tasks()
    created: list[asyncio.Task[Any]] = []
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kw)
        created.append(task)
        return task

    loop.set_task_factory(factory)
    with pytest.raises((MetricsPortError, OSError)) as failure:
        async with build_gateway(settings, open_registry(registry_dir), worker_dir=worker_dir) as gateway:
            # reached only when the start succeeded; the workers case must never get here
            raise AssertionError(f"the start did not fail: {gateway.supervisor.engines}")
    await asyncio.sleep(0.05)  # let cancelled tasks finish
    return failure.value, asyncio.all_tasks() - before - {asyncio.current_task()}, created


@pytest.mark.parametrize("where", ["metrics port taken", "workers cannot start"])
def test_a_start_that_fails_half_way_closes_what_it_opened(tmp_path: Path, where: str) -> None:
    sessions_before = len(open_sessions())
    with FakeEngine() as engine, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        overrides: dict[str, Any] = {"metrics_port": taken.getsockname()[1]} if where == "metrics port taken" else {}
        settings = load_settings(
            mode="external",
            base_name="tiny",
            registry=str(tmp_path / "r"),
            external={"urls": [engine.url]},
            health_interval_s=0.1,
            workers=2,
            **overrides,
        )
        # A file where the control socket's folder should be: the workers fail after the engines are supervised
        (tmp_path / "not-a-dir").write_text("")
        worker_dir = tmp_path / "not-a-dir" if where == "workers cannot start" else None
        error, leftover, created = asyncio.run(failed_start(settings, tmp_path / "r", worker_dir))
    assert isinstance(error, MetricsPortError if where == "metrics port taken" else OSError)
    assert leftover == set()
    assert len(open_sessions()) == sessions_before
    if where == "workers cannot start":  # the supervisor was running (its tasks) before the failure stopped it
        supervising = [t for t in created if "Supervisor" in getattr(t.get_coro(), "__qualname__", "")]
        assert supervising and all(t.done() for t in supervising)
