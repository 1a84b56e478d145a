from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from gateway.engine_process import (
    EngineProcess,
    EngineSpec,
    EngineStartError,
    cpu_binding,
    engine_command,
    engine_env,
    with_cpu_binding,
)


def test_command_carries_lora_flags() -> None:
    spec = EngineSpec(model="/m", served_model_name="tiny", port=8001, max_loras=3, max_lora_rank=32)
    cmd = engine_command(spec)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    assert "--enable-lora --max-loras 3 --max-lora-rank 32 --max-cpu-loras 3" in joined
    assert "--host 127.0.0.1 --port 8001" in joined


def test_command_without_lora() -> None:
    cmd = engine_command(EngineSpec(model="/m", served_model_name="m", port=1, enable_lora=False))
    assert "--enable-lora" not in cmd and "--max-loras" not in cmd


def test_runtime_updating_only_in_child_env() -> None:
    env = engine_env(EngineSpec(model="/m", served_model_name="m", port=1), {"PATH": "/bin"})
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["PATH"] == "/bin"
    off = engine_env(EngineSpec(model="/m", served_model_name="m", port=1, enable_lora=False), {})
    assert off["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "False"


@pytest.mark.parametrize(
    ("index", "count", "cpus", "expected"),
    [
        (0, 1, [0, 1], None),  # one engine: vLLM's own binding
        (0, 2, [0, 1], "0"),  # the host of this project's CI: one core each (vLLM's auto gave both core 0)
        (1, 2, [0, 1], "1"),
        (0, 3, [0, 1], "0"),  # fewer cores than engines: in turn
        (1, 3, [0, 1], "1"),
        (2, 3, [0, 1], "0"),
        (0, 4, list(range(16)), "0,1,2"),  # a share of 4: the last one left to the engine's scheduler
        (3, 4, list(range(16)), "12,13,14"),
        (1, 3, list(range(8)), "2"),  # 8 // 3 = 2 each (one computes), cores 6 and 7 unused
        (1, 2, [4, 2, 7, 5], "5"),  # the affinity set, sorted, whatever its numbers
    ],
)
def test_cpu_binding_splits_the_hosts_cores(index: int, count: int, cpus: list[int], expected: str | None) -> None:
    assert cpu_binding(index, count, cpus) == expected


def test_with_cpu_binding_keeps_what_the_operator_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert with_cpu_binding({"A": "1"}, 1, 2) == {"A": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"}
    assert with_cpu_binding({}, 0, 1) == {}
    assert with_cpu_binding({"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, 1, 2) == {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    assert with_cpu_binding({}, 1, 2) == {}


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_wait_ready_fails_fast_with_log_tail_when_process_exits(tmp_path: Path) -> None:
    spec = EngineSpec(model="/m", served_model_name="m", port=1, python=_script(tmp_path, "echo boom-42; exit 3"))
    engine = EngineProcess(spec, tmp_path / "log")
    engine.start()
    with pytest.raises(EngineStartError, match="exited with status 3") as info:  # the exit, not the 60 s deadline
        engine.wait_ready(timeout_s=60)
    assert "boom-42" in str(info.value)


def test_wait_ready_deadline_stops_the_process(tmp_path: Path) -> None:
    spec = EngineSpec(model="/m", served_model_name="m", port=1, python=_script(tmp_path, "exec sleep 600"))
    engine = EngineProcess(spec, tmp_path / "log")
    engine.start()
    with pytest.raises(EngineStartError, match="not healthy after 1s"):
        engine.wait_ready(timeout_s=1, poll_s=0.1)
    assert not engine.running()


def test_stop_kills_the_whole_group(tmp_path: Path) -> None:
    from gateway.engine_process import group_alive, group_members

    # The child ignores SIGTERM and leaves a grandchild behind: stop must escalate and sweep the group.
    body = "trap '' TERM; sleep 600 & sleep 600"
    engine = EngineProcess(
        EngineSpec(model="/m", served_model_name="m", port=1, python=_script(tmp_path, body)),
        tmp_path / "log",
    )
    engine.start()
    time.sleep(0.3)
    pgid = engine.pid
    assert pgid is not None and len(group_members(pgid)) == 3  # sh and two sleeps
    engine.stop(grace_s=0.5)
    assert not group_alive(pgid)


def test_managed_engines_on_one_host_each_get_their_share_of_its_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor hands each managed engine its own cores (vLLM's own binding gave every engine the same ones)."""
    import asyncio

    from gateway import supervisor
    from gateway.settings import load_settings

    started: list[EngineSpec] = []

    class Recorded:
        def __init__(self, spec: EngineSpec, log_path: Path) -> None:
            self.spec, self.log_path, self.pid = spec, log_path, 0

        def start(self) -> None:
            started.append(self.spec)

        def stop(self) -> None:
            pass

    async def idle(self: supervisor.Supervisor, engine: object) -> None:
        await asyncio.Event().wait()

    async def hook(engine: object) -> None:
        pass

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(supervisor, "EngineProcess", Recorded)
    monkeypatch.setattr(supervisor.Supervisor, "_watch", idle)
    settings = load_settings(base="tiny", engines={"count": 2, "log_dir": tmp_path, "extra_env": {"A": "1"}})

    async def run() -> None:
        sup = supervisor.Supervisor(
            settings, None, model_path=str(tmp_path), served_name="tiny", on_ready=hook, on_down=hook, on_tick=hook
        )
        await sup.start()
        await sup.stop()

    asyncio.run(run())
    assert [dict(spec.extra_env) for spec in started] == [
        {"A": "1", "VLLM_CPU_OMP_THREADS_BIND": "0,1,2"},
        {"A": "1", "VLLM_CPU_OMP_THREADS_BIND": "4,5,6"},
    ]
