"""One vLLM OpenAI server as a child process: command line, start, readiness handshake, stop.

Used by the gateway's supervisor (managed mode) and by the test harness. The child runs in its own process
group so that stopping it reaches vLLM's engine-core and worker processes too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx


class EngineStartError(RuntimeError):
    """The engine exited or missed its readiness deadline; the message carries its log tail."""


@dataclass(frozen=True)
class EngineSpec:
    model: str
    served_model_name: str
    port: int
    host: str = "127.0.0.1"
    enable_lora: bool = True
    max_loras: int = 4
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    max_model_len: int = 512
    dtype: str = "bfloat16"
    kv_cache_gib: int = 1
    # Without a named backend and no free whitespace, a weak model under a JSON schema pads whitespace forever.
    structured_outputs_config: str | None = '{"backend": "xgrammar", "disable_any_whitespace": true}'
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def engine_command(spec: EngineSpec) -> list[str]:
    cmd = [
        spec.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        spec.model,
        "--served-model-name",
        spec.served_model_name,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--max-model-len",
        str(spec.max_model_len),
        "--dtype",
        spec.dtype,
        "--disable-uvicorn-access-log",
    ]
    if spec.enable_lora:
        cmd += [
            "--enable-lora",
            "--max-loras",
            str(spec.max_loras),
            "--max-lora-rank",
            str(spec.max_lora_rank),
        ]
        cmd += ["--max-cpu-loras", str(spec.max_cpu_loras or spec.max_loras)]
    if spec.structured_outputs_config:
        cmd += ["--structured-outputs-config", spec.structured_outputs_config]
    return cmd + list(spec.extra_args)


def engine_env(spec: EngineSpec, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_gib))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    # Runtime LoRA loading is enabled for this child only, never for the gateway's own environment.
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True" if spec.enable_lora else "False"
    env.update(spec.extra_env)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the parent dies, so a killed gateway or test run leaves no engine."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EngineProcess:
    def __init__(self, spec: EngineSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> None:
        # Call from a long-lived thread (the event loop's or the main one): PR_SET_PDEATHSIG fires when the
        # *thread* that forked exits, so starting from a short-lived worker thread would kill the engine.
        if self.running():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                engine_command(self.spec),
                env=engine_env(self.spec, os.environ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 240.0, poll_s: float = 0.5) -> None:
        """Block until GET /health answers 200; fail fast, with the log tail, if the process exits."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=httpx.Timeout(2.0)) as client:
            while True:
                code = self.returncode()
                if code is not None:
                    raise EngineStartError(
                        f"vLLM on port {self.spec.port} exited with status {code}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise EngineStartError(
                        f"vLLM on port {self.spec.port} not healthy after {timeout_s:.0f}s:\n{self.log_tail()}"
                    )
                time.sleep(poll_s)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM the process group, wait up to `grace_s`, then SIGKILL it. Returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session=True: the child leads its own group
        _signal_group(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        # Always sweep the group: vLLM's engine-core and workers can outlive the API server.
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        return proc.returncode

    def kill(self) -> None:
        """Hard-kill the whole group at once (crash simulation and last-resort cleanup)."""
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command name: state, ppid, pgrp, ...
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat_file.parent.name))
    return members


def group_alive(pgid: int, settle_s: float = 2.0) -> bool:
    """Whether any live process remains in the group, allowing `settle_s` for signals to land."""
    deadline = time.monotonic() + settle_s
    while group_members(pgid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)
    return False
