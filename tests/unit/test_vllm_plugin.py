"""The vLLM plugin that asks for AMX state (gateway/vllm_plugin.py): registered, and in a fresh process it is what
turns the permission on."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

PROBE = """
import ctypes
def perm():
    mask = ctypes.c_ulong()
    assert ctypes.CDLL(None, use_errno=True).syscall(158, 0x1022, ctypes.byref(mask)) == 0  # ARCH_GET_XCOMP_PERM
    return bool(mask.value & (1 << 18))  # XFEATURE_XTILEDATA
import torch
if not torch.cpu._is_amx_tile_supported():
    print("no-amx")
else:
    before = perm()
    from vllm.plugins import load_general_plugins
    load_general_plugins()  # what each vLLM process does at start-up
    print(before, perm())
"""


def test_the_plugin_is_registered_for_vllm() -> None:
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins["loragate_amx"] == "gateway.vllm_plugin:request_amx"


def test_a_vllm_process_gets_amx_state_once_its_plugins_load() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
    result = out.stdout.strip().splitlines()[-1]
    if result == "no-amx":
        pytest.skip("this CPU has no AMX")
    assert result == "False True"
