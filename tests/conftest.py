"""Session fixtures: the tiny model (built once per content key) and one shared real vLLM engine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gateway.engine_process import EngineProcess
from tests.harness import make_lora_adapter, running_engine
from training.tiny_model import cached_tiny_model

BASE_NAME = "tiny"

# Shared fixtures of each area live in tests/fixtures/<area>.py; list each module here once it exists.
pytest_plugins: list[str] = [
    "tests.fixtures.registry",
    "tests.fixtures.gateway",
    "tests.fixtures.security",
    "tests.fixtures.training",
]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return cached_tiny_model()


@pytest.fixture(scope="session")
def engine_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-logs")


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two distinct random adapters on the tiny base."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(tiny_model, root / f"a{i}", seed=i + 1) for i in range(2)]


@pytest.fixture(scope="session")
def vllm_engine(tiny_model: Path, engine_logs: Path) -> Iterator[EngineProcess]:
    """One real vLLM (CPU) engine with LoRA and runtime adapter updating, shared by the whole session."""
    with running_engine(tiny_model, BASE_NAME, engine_logs, max_loras=2, max_cpu_loras=4) as engine:
        yield engine
