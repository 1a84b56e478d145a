"""`loragate serve --workers 2` over a `tests.fakes.FakeEngine`: one view of the engines for every worker.

The gateway runs as `loragate serve` does (a subprocess: the primary and its two workers); the engine is the fake,
so the test can see every load and unload it got, and hold a stream open as long as it needs to.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters_registry.registry import Registry
from gateway.engine_process import free_port
from tests.fakes import FakeEngine, stream
from tests.harness import wait_until

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@dataclass
class Workers:
    url: str
    process: subprocess.Popen[bytes]
    engine: FakeEngine
    log: Path


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def workers(
    registry_template: Path, adapter_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    import shutil

    from adapters_registry.registry import open_registry

    root = tmp_path_factory.mktemp("workers") / "registry"
    shutil.copytree(registry_template, root)
    registry: Registry = open_registry(root)
    registry.push(adapter_dirs[0], "a", "tiny")
    registry.push(adapter_dirs[1], "b", "tiny")
    port = free_port()
    log = root.parent / "gateway.log"
    with FakeEngine() as engine:
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "--engine-url",
            engine.url,
            "--base-name",
            "tiny",
            "--registry",
            str(root),
        ]
        argv += ["--port", str(port), "--max-loras", "1", "--workers", "2"]
        env = {**os.environ, "LORAGATE_HEALTH_INTERVAL_S": "0.5", "LORAGATE_DRAIN_GRACE_S": "5"}
        process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200

        wait_until(ready, 120, lambda: log.read_text()[-3000:], interval_s=0.2, ignoring=(httpx.HTTPError,))
        # /readyz answers once one worker listens; the other may bind its socket a moment later
        seen: set[str] = set()

        def both_workers_listen() -> bool:
            with httpx.Client(base_url=url, timeout=30) as client:  # a new connection: the kernel picks a worker
                seen.add(chat(client, "tiny").headers["x-loragate-worker"])
            return seen == {"0", "1"}

        wait_until(both_workers_listen, 60, lambda: f"only workers {sorted(seen)} answered", interval_s=0.05)
        try:
            yield Workers(url, process, engine, log)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)


def chat(client: httpx.Client, model: str, **extra: object) -> httpx.Response:
    reply = client.post("/v1/chat/completions", json={**CHAT, "model": model, **extra})
    assert reply.status_code == 200, reply.text
    return reply


def clients_on_each_worker(url: str) -> dict[str, httpx.Client]:
    """One keep-alive client (one connection) per worker: which worker a connection lands on is the kernel's pick."""
    found: dict[str, httpx.Client] = {}
    for _ in range(200):
        client = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1))
        worker = chat(client, "tiny").headers["x-loragate-worker"]
        if worker in found:
            client.close()
        else:
            found[worker] = client
        if len(found) == 2:
            return found
    raise AssertionError(f"200 connections all landed on workers {sorted(found)}")


def test_a_cold_adapter_asked_through_every_worker_at_once_is_loaded_once(workers: Workers) -> None:
    def one(_: int) -> str:
        with httpx.Client(base_url=workers.url, timeout=30) as client:
            return str(chat(client, "a").headers["x-loragate-worker"])

    with ThreadPoolExecutor(24) as pool:
        served_by = list(pool.map(one, range(24)))
    assert set(served_by) == {"0", "1"}
    loads = [name for _, what, name in workers.engine.log if what == "load"]
    assert len(loads) == 1 and loads[0].startswith("a@")
    metrics = httpx.get(f"{workers.url}/metrics", timeout=10).text  # the primary's, with both workers' added
    assert (
        'loragate_requests_total{adapter="a",error_code="",route="chat",status_class="2xx",version="1"} 24.0' in metrics
    )
    assert 'loragate_adapter_loads_total{adapter="a",engine="' in metrics
    engines = httpx.get(f"{workers.url}/admin/engines", timeout=10).json()["engines"]  # forwarded to the primary
    assert [r["ref"] for r in engines[0]["resident"]] == ["a@1"]


def test_no_worker_evicts_an_adapter_another_worker_is_streaming(workers: Workers) -> None:
    clients = clients_on_each_worker(workers.url)
    engine = workers.engine
    engine.script.append(stream(events=10, gap_s=0.1))  # a 1 s stream of `a` through worker 0
    with clients["0"].stream("POST", "/v1/chat/completions", json={**CHAT, "model": "a", "stream": True}) as held:
        chunks = held.iter_raw()
        first = next(chunks)
        other = chat(clients["1"], "b")  # one slot: `b` needs `a`'s, which worker 0 is using
        rest = b"".join(chunks)
    assert b"t0" in first and (first + rest).endswith(b"data: [DONE]\n\n")
    assert other.headers["x-loragate-worker"] == "1"
    events = [(what, name.split("@")[0]) for _, what, name in engine.log if what != "load" or name.startswith("b")]
    assert events[-4:] == [("stream", "a"), ("streamed", "a"), ("unload", "a"), ("load", "b")]
    for client in clients.values():
        client.close()


def test_sigterm_to_the_primary_stops_its_workers_and_engines_cleanly(workers: Workers) -> None:
    pids = children(workers.process.pid)
    assert len(pids) == 2
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(timeout=40) == -signal.SIGTERM  # uvicorn re-raises it once shut down
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    log = workers.log.read_text()
    assert "Application shutdown complete." in log and "Traceback" not in log
