"""`push --check-effect`: refuse an adapter that leaves the base model's logits unchanged (a silent no-op).

Loads the base and base+adapter with transformers + PEFT on the CPU in float32 and compares the logits on a few
probe prompts. Heavy (it loads the whole base), hence opt-in.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adapters_registry.errors import ValidationError

log = logging.getLogger(__name__)

PROBES = ("Hello, how are you today?", "The capital of France is", "def main():\n    return", "1, 2, 3, 4,")
TOLERANCE = 1e-6


def logit_change(base_dir: Path, adapter_dir: Path) -> float:
    """The largest absolute logit difference between base+adapter and the base over the probe prompts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        batches = [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROBES]
    except (OSError, ValueError):  # no tokenizer shipped: fixed token ids still exercise every layer
        batches = [torch.arange(1, 17).remainder(model.config.vocab_size).unsqueeze(0)]
    with torch.no_grad():
        before = [model(ids).logits for ids in batches]
        adapted = PeftModel.from_pretrained(model, str(adapter_dir))
        adapted.eval()
        after = [adapted(ids).logits for ids in batches]
    return max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))


def check_effect(base_dir: Path, adapter_dir: Path) -> float:
    change = logit_change(base_dir, adapter_dir)
    log.info("%s: largest logit change over %d probes: %.3g", adapter_dir, len(PROBES), change)
    if change <= TOLERANCE:
        raise ValidationError(
            f"the adapter does not change the base model's logits on {len(PROBES)} probe prompts "
            f"(largest difference {change:.3g}): it would be a silent no-op (were lora_B weights ever trained?)",
            path=str(adapter_dir),
        )
    return change
