"""Test harness: real vLLM (CPU build) engines on loopback, and tiny adapters made with PEFT.

Every engine started here is also registered for an `atexit` sweep, so an interrupted run (Ctrl-C) still kills
the whole process group even if a fixture finaliser never ran.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.engine_process import EngineProcess, EngineSpec, free_port
from training.tiny_model import build_random_adapter

_LIVE: list[EngineProcess] = []


def _sweep() -> None:
    for engine in _LIVE:
        engine.kill()


atexit.register(_sweep)


def start_engine(
    model: Path,
    name: str,
    log_dir: Path,
    *,
    max_loras: int = 4,
    max_cpu_loras: int | None = None,
    **kw: object,
) -> EngineProcess:
    spec = EngineSpec(
        model=str(model),
        served_model_name=name,
        port=free_port(),
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        **kw,  # type: ignore[arg-type]
    )
    engine = EngineProcess(spec, log_dir / f"vllm-{spec.port}.log")
    _LIVE.append(engine)
    engine.start()
    try:
        engine.wait_ready(timeout_s=float(os.environ.get("LORAGATE_TEST_ENGINE_DEADLINE", "300")))
    except BaseException:
        engine.kill()
        raise
    return engine


@contextmanager
def running_engine(model: Path, name: str, log_dir: Path, **kw: object) -> Iterator[EngineProcess]:
    engine = start_engine(model, name, log_dir, **kw)  # type: ignore[arg-type]
    try:
        yield engine
    finally:
        engine.stop()


make_lora_adapter = build_random_adapter
