"""Test harness: real vLLM (CPU build) engines on loopback, tiny adapters made with PEFT, and `wait_until`.

Every engine started here is also registered for an `atexit` sweep, so an interrupted run (Ctrl-C) still kills
the whole process group even if a fixture finaliser never ran.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from gateway.engine_process import EngineProcess, EngineSpec, free_port
from training.tiny_model import build_random_adapter

T = TypeVar("T")
_LIVE: list[EngineProcess] = []


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str | Callable[[], str],
    *,
    interval_s: float = 0.1,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """Call `predicate` every `interval_s` until it returns a true value, and return that value.

    After `timeout_s` raise TimeoutError with `what`, the awaited condition (a callable is asked then, so the message
    can carry the state of that moment, a log's tail). An exception in `ignoring` means "not yet"; any other one
    raised by `predicate` ends the wait at once (a process that exited, an answer that must never come).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if value := predicate():
                return value
        except ignoring:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not within {timeout_s:g} s: {what() if callable(what) else what}")
        time.sleep(interval_s)


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
