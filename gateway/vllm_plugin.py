"""A vLLM general plugin: in every vLLM process started from an environment where loragate is installed (managed
engines, the test engines), ask Linux for the AMX tile state on x86 CPUs that have AMX.

vLLM 0.32's CPU attention runs AMX tile instructions (its "amx" kernels, chosen whenever the CPU reports AMX) but
never asks for the permission Linux requires before a process may use AMX (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); it
works only once a oneDNN matrix product has asked for it, which happens for a long enough prompt. An engine whose
first request has a short prompt dies of SIGILL on its first step (seen on this project's CPU machines: 5 engines of
5). Asking at start-up is what oneDNN itself does, and harmless on CPUs without AMX (nothing is asked there).
Registered in pyproject.toml under the `vllm.general_plugins` entry points; vLLM calls it once per process.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def request_amx() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - vLLM always has torch
        return
    cpu = getattr(torch, "cpu", None)
    if cpu is None or not hasattr(cpu, "_is_amx_tile_supported") or not cpu._is_amx_tile_supported():
        return
    if not cpu._init_amx():
        log.warning("this CPU reports AMX but the kernel refused AMX state to this process")
