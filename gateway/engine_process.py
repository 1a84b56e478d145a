"""One vLLM OpenAI server as a child process: command line, start, readiness handshake, stop.

Used by the gateway's supervisor (managed mode) and by the test harness. The child runs in its own process
group so that stopping it reaches vLLM's engine-core and worker processes too. `engine_spec()` turns the
`engines` settings into the command line, reading what it needs from the base model's own files: its context
length (config.json) and its chat template (which tool-call parser vLLM should use).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from gateway.settings import EngineSettings

log = logging.getLogger(__name__)


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
    max_model_len: int | None = 512  # None: no flag, vLLM takes the model's own
    dtype: str = "bfloat16"
    kv_cache_gib: int = 1
    # Without a named backend and no free whitespace, a weak model under a JSON schema pads whitespace forever.
    structured_outputs_config: str | None = '{"backend": "xgrammar", "disable_any_whitespace": true}'
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    chat_template: str | None = None
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
        "--dtype",
        spec.dtype,
        "--disable-uvicorn-access-log",
    ]
    if spec.max_model_len is not None:
        cmd += ["--max-model-len", str(spec.max_model_len)]
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
    if spec.tool_call_parser:
        cmd += ["--tool-call-parser", spec.tool_call_parser]
    if spec.enable_auto_tool_choice:
        cmd.append("--enable-auto-tool-choice")
    if spec.chat_template:
        cmd += ["--chat-template", spec.chat_template]
    return cmd + list(spec.extra_args)


# -- from settings and the base model's files ------------------------------------------------------------------------

# The config.json keys vLLM reads a model's context length from (it takes the smallest one present).
CONTEXT_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)

# Tool-call markup in a chat template -> the vLLM 0.32 parser that reads it back, most specific first.
TOOL_CALL_MARKUP = (
    ("<function=", "qwen3_coder"),  # Qwen3-Coder: <tool_call><function=name><parameter=...>
    ("<tool_call>", "hermes"),  # Hermes 2/3, Qwen2.5, Qwen3 and most ChatML fine-tunes
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),  # Llama 3.1 / 3.2 / 3.3
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_context_length(model: str) -> int | None:
    """The context length a model directory declares in config.json (its text config for multimodal models)."""
    config = _read_json(Path(model) / "config.json")
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        config = {**config, **text_config}
    lengths = [config[key] for key in CONTEXT_LENGTH_KEYS if isinstance(config.get(key), int) and config[key] > 0]
    return min(lengths) if lengths else None


def chat_template_of(model: str, override: str | None = None) -> str:
    """The chat template vLLM will use: `override` (a file or the template itself), else the model's own."""
    if override:
        path = Path(override)
        with contextlib.suppress(OSError):
            if path.is_file():
                return path.read_text()
        return override
    folder = Path(model)
    with contextlib.suppress(OSError):
        return (folder / "chat_template.jinja").read_text()
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        return "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else ""


def tool_call_parser_for(model: str, chat_template: str | None = None) -> str | None:
    """vLLM's tool-call parser for a model, from its files; None when nothing says how it writes tool calls.

    A tokenizer that declares a `response_template` is read by vLLM's own checkpoint-driven parser (`hf`);
    otherwise the chat template's tool-call markup names the parser (TOOL_CALL_MARKUP).
    """
    declared = _read_json(Path(model) / "tokenizer_config.json").get("response_template")
    if not chat_template and isinstance(declared, dict):
        return "hf"
    template = chat_template_of(model, chat_template)
    return next((parser for markup, parser in TOOL_CALL_MARKUP if markup in template), None)


def engine_spec(engines: EngineSettings, *, model: str, served_model_name: str, port: int) -> EngineSpec:
    """The managed engines' spec: `engines` settings, with the defaults that depend on the model resolved."""
    max_model_len = engines.max_model_len
    if max_model_len is None:
        own = model_context_length(model)
        if own is None:
            log.info("%s declares no context length: vLLM derives max_model_len itself", model)
        else:
            max_model_len = min(own, engines.max_model_len_cap)
            log.info("max_model_len %d (the model's own %d, cap %d)", max_model_len, own, engines.max_model_len_cap)
    parser: str | None = engines.tool_call_parser
    if parser == "auto":
        parser = tool_call_parser_for(model, engines.chat_template)
        if parser is None:
            log.info("no tool-call markup in the chat template of %s: engines start without a tool-call parser", model)
        else:
            log.info("tool-call parser %s (from the chat template of %s)", parser, model)
    elif parser == "none":
        parser = None
    auto_tool_choice = engines.enable_auto_tool_choice
    if auto_tool_choice is None:
        auto_tool_choice = parser is not None
    return EngineSpec(
        model=model,
        served_model_name=served_model_name,
        port=port,
        enable_lora=engines.enable_lora,
        max_loras=engines.max_loras,
        max_cpu_loras=engines.max_cpu_loras,
        max_lora_rank=engines.max_lora_rank,
        max_model_len=max_model_len,
        dtype=engines.dtype,
        kv_cache_gib=engines.kv_cache_gib,
        tool_call_parser=parser,
        enable_auto_tool_choice=auto_tool_choice,
        chat_template=engines.chat_template,
        extra_args=tuple(engines.extra_args),
        extra_env=dict(engines.extra_env),
    )


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


def cpu_binding(index: int, count: int, cpus: list[int] | None = None) -> str | None:
    """The cores engine `index` of `count` on one CPU host binds its OpenMP threads to (vLLM's CPU build reads
    them from VLLM_CPU_OMP_THREADS_BIND), or None for one engine, which vLLM binds itself.

    vLLM's own "auto" binding gives every instance the same cores: on a host of 2 cores, two engines both computed
    on core 0 and left core 1 to the rest. Each engine gets a contiguous share of the host's cores instead, all but
    the last of it when the share has 2 or more (the one left runs that engine's scheduler and API server, as
    vLLM's auto binding leaves one); with fewer cores than engines, engines share a core in turn.
    """
    if count <= 1:
        return None
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if len(cpus) < count:
        return str(cpus[index % len(cpus)])
    share = len(cpus) // count
    mine = cpus[index * share : (index + 1) * share]
    if len(mine) >= 2:
        mine = mine[:-1]
    return ",".join(str(cpu) for cpu in mine)


def with_cpu_binding(env: Mapping[str, str], index: int, count: int) -> dict[str, str]:
    """`env` with engine `index`'s share of the host's cores (cpu_binding), unless `env` or this process's
    environment already says how vLLM should bind."""
    merged = dict(env)
    binding = cpu_binding(index, count)
    if (
        binding is not None
        and "VLLM_CPU_OMP_THREADS_BIND" not in merged
        and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    ):
        merged["VLLM_CPU_OMP_THREADS_BIND"] = binding
    return merged


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
