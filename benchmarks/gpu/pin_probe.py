"""What an adapter load's host-side steps cost in a process sharing the GPU (issue 17: why loads slow to seconds
with four engines on one H200). Not a test; benchmarks/bench_placement.py --probe runs it once per condition.

    python3 benchmarks/gpu/pin_probe.py ADAPTER_DIR

vLLM 0.26 loads an adapter inside its engine loop: it reads the safetensors to CPU, pins every A and B tensor
separately (`pin_memory()`, one pinned host allocation each: 392 for a 3B all-linear rank-16 adapter), then copies
each into its GPU slot. This does the same steps, in a fresh process with its own CUDA context, and prints one JSON
line: the seconds of each phase and the median and worst single `pin_memory()`, copy and `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> int:
    folder = Path(sys.argv[1])
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the context exists before anything is timed
    torch.cuda.synchronize()
    started = time.perf_counter()
    tensors = [t.to(torch.bfloat16) for t in load_file(str(folder / "adapter_model.safetensors")).values()]
    read_s = time.perf_counter() - started
    pins = []
    pinned = []
    for tensor in tensors:
        t0 = time.perf_counter()
        pinned.append(tensor.pin_memory())
        pins.append(time.perf_counter() - t0)
    copies = []
    slots = [torch.empty_like(t, device="cuda") for t in pinned]
    torch.cuda.synchronize()
    t_copy = time.perf_counter()
    for slot, tensor in zip(slots, pinned, strict=True):
        t0 = time.perf_counter()
        slot.copy_(tensor, non_blocking=True)
        copies.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    copy_s = time.perf_counter() - t_copy
    syncs = []
    for _ in range(50):
        torch.ones(1, device="cuda").add_(1)  # a kernel of its own to wait for
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        syncs.append(time.perf_counter() - t0)

    def ms(values: list[float]) -> dict[str, float]:
        return {"median_ms": round(statistics.median(values) * 1e3, 3), "max_ms": round(max(values) * 1e3, 3)}

    print(
        json.dumps(
            {
                "tensors": len(tensors),
                "mib": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1),
                "read_s": round(read_s, 4),
                "pin_s": round(sum(pins), 4),
                "pin": ms(pins),
                "copy_s": round(copy_s, 4),
                "copy_call": ms(copies),
                "sync": ms(syncs),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
