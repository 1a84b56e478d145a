"""The harness itself: a real vLLM (CPU) engine answers base and adapter requests; nothing outlives a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from gateway.engine_process import EngineProcess, group_alive
from tests.harness import wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_base_and_runtime_adapter_answer_differently(vllm_engine: EngineProcess, adapter_dirs: list[Path]) -> None:
    load = httpx.post(
        f"{vllm_engine.url}/v1/load_lora_adapter",
        json={"lora_name": "harness-a0", "lora_path": str(adapter_dirs[0])},
        timeout=60,
    )
    assert load.status_code == 200, load.text
    client = openai.OpenAI(base_url=f"{vllm_engine.url}/v1", api_key="unused")
    answers = {}
    for model in ("tiny", "harness-a0"):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0
        )
        answers[model] = reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert answers["tiny"] != answers["harness-a0"]
    listed = {m.id: m for m in client.models.list().data}
    assert listed["harness-a0"].model_extra is not None
    assert listed["harness-a0"].model_extra["parent"] == "tiny"


INNER_TEST = """
import os, time
from pathlib import Path
from training.tiny_model import cached_tiny_model
from tests.harness import running_engine

def test_hold(tmp_path):
    with running_engine(cached_tiny_model(), "tiny", tmp_path, enable_lora=True) as engine:
        Path(os.environ["PIDFILE"]).write_text(str(engine.pid))
        time.sleep(600)
"""


INNER_RUN = (
    "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main())"
)


def test_ctrl_c_leaves_no_engine_running(tmp_path: Path) -> None:
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER_TEST)
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        # A terminal's foreground pytest takes Ctrl-C as KeyboardInterrupt; a pytest started in the background by a
        # non-interactive shell inherits SIGINT ignored, so restore Python's handler before the inner run starts.
        [sys.executable, "-c", INNER_RUN, "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(inner)],
        cwd=REPO,
        env={**os.environ, "PIDFILE": str(pidfile), "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def inner_engine_ready() -> bool:
        if pidfile.exists():
            return True
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        return False

    try:
        wait_until(inner_engine_ready, 300, "the inner engine ready", interval_s=0.5)
        pgid = int(pidfile.read_text())
        assert group_alive(pgid)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground pytest
        try:
            proc.wait(timeout=120)  # the engine's stop takes up to 20 s; a loaded 2-core box can take far longer
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0].decode(errors="replace")
            pytest.fail(f"pytest did not exit within 120 s of SIGINT; its output:\n{output[-4000:]}")
        assert not group_alive(pgid, settle_s=10), "vLLM's process group survived Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
