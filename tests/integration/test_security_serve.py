"""`loragate serve` in local mode (no API key in the registry): told to bind 0.0.0.0, it stays on loopback and warns;
so does its separate /metrics port, which stops with the gateway on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from gateway.engine_process import EngineProcess, free_port
from tests.harness import wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_local_mode_binds_loopback_and_warns(
    registry_template: Path, vllm_engine: EngineProcess, tmp_path: Path
) -> None:
    root = tmp_path / "registry"
    shutil.copytree(registry_template, root)
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-c", "from loragate.cli import main; raise SystemExit(main())", "serve",
        "--engine-url", vllm_engine.url, "--base-name", "tiny", "--registry", str(root),
        "--host", "0.0.0.0", "--port", str(port), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200

    try:
        wait_until(healthy, 120, log.read_text, interval_s=0.2, ignoring=(httpx.TransportError,))
        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.Process(proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {("127.0.0.1", port), ("127.0.0.1", metrics_port)}
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert scraped.status_code == 200 and "loragate_engine_up" in scraped.text
        assert (
            "no API keys configured: binding 127.0.0.1 instead of 0.0.0.0; create a key (`loragate keys create`) "
            "or set security.allow_open_bind=true"
        ) in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # uvicorn re-raises the SIGTERM once it has shut down cleanly; the log shows the drain ran to its end
    assert proc.returncode == -signal.SIGTERM and "Application shutdown complete." in log.read_text(), log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
