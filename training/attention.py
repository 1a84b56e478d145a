"""Per-document attention for packed rows: a varlen flash kernel where there is one, sdpa's block mask elsewhere.

TRL's padding-free packing (`packing: true`, strategy bfd) flattens a micro-batch into one row and passes the
document boundaries as `cu_seq_lens_q/k` and `max_length_q/k`, with position ids restarting at 0 per document.
Flash-attention's varlen kernels read those directly; without the flash-attn package, transformers' sdpa rebuilds a
block-diagonal mask from the position ids, which is correct but dense (every query scores the whole row).

`loragate_varlen` (registered here as a transformers attention implementation) calls PyTorch's own varlen flash
kernel (`torch.nn.attention.varlen.varlen_attn`, CUDA) when the boundaries are given, and falls back to sdpa with
the usual mask otherwise (padded batches, generation with a KV cache, the CPU). Either way a token attends only to
earlier tokens of its own document.
"""

from __future__ import annotations

import inspect
import logging
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

VARLEN = "loragate_varlen"


@cache
def _varlen() -> tuple[Any, dict[str, Any], bool] | None:
    """PyTorch's varlen entry point, the keyword that makes it causal, and whether it takes GQA natively."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def varlen_available() -> bool:
    import torch

    return torch.cuda.is_available() and _varlen() is not None


def varlen_native_gqa() -> bool:
    """Whether torch's varlen entry point takes fewer key/value heads (torch 2.11's does not: k/v are repeated)."""
    entry = _varlen()
    return entry is not None and entry[2]


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention interface: query [B, H, N, D], key/value [B, Hkv, N, D] -> ([B, N, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q, max_q = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    entry = _varlen()
    if cu_q is None or max_q is None or entry is None or not query.is_cuda or query.shape[0] != 1 or dropout:
        if cu_q is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
            attention_mask = document_mask(cu_q, query.shape[2], query.device)  # boundaries, even with a cache
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)  # type: ignore[no-any-return]
    varlen_attn, causal, native_gqa = entry
    q = query[0].transpose(0, 1)  # [N, H, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    extra: dict[str, Any] = {}
    if k.shape[1] != q.shape[1]:
        if native_gqa:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    cu_k = kwargs.get("cu_seq_lens_k", cu_q)
    max_k = kwargs.get("max_length_k", max_q)
    cu_q = cu_q.to(device=q.device, dtype=_int32())
    cu_k = cu_k.to(device=q.device, dtype=_int32())
    out = varlen_attn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scale=scaling, **causal, **extra)
    return out.unsqueeze(0), None  # [1, N, H, D]


def document_mask(cu_seq_lens: Any, length: int, device: Any) -> Any:
    """A [1, 1, N, N] bool mask: causal within each document of a packed row, nothing across documents."""
    import torch

    lengths = cu_seq_lens.diff().to(device)
    documents = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)[:length]
    positions = torch.arange(length, device=device)
    same = documents[:, None] == documents[None, :]
    causal = positions[:, None] >= positions[None, :]
    return (same & causal)[None, None]


def _int32() -> Any:
    import torch

    return torch.int32


def register() -> str:
    """Register `loragate_varlen` with transformers (idempotent); return its name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    # sdpa's masks, so that the fallback (padding, KV cache, packed rows on the CPU) gets what sdpa expects.
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)
    return VARLEN


def implementation(choice: str, packed: bool, gpu: bool) -> str:
    """The `attn_implementation` to load a model with, for the recipe's `runtime.attention`.

    `varlen` is always honoured (its forward falls back to sdpa call by call); `auto` picks it for packed rows on a
    GPU that has the kernel, and sdpa otherwise.
    """
    if choice == "varlen":
        if not varlen_available():
            log.info("runtime.attention varlen: no varlen kernel here (CUDA, torch>=2.9); sdpa runs each call")
        return register()
    if choice == "auto":
        return register() if packed and gpu and varlen_available() else "sdpa"
    return choice
