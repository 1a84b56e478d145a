"""A random-weight model of Llama-3.2-1B (or 3B) shapes (bf16, built on the GPU) and N rank-16 all-linear adapters.

    python3 benchmarks/gpu/make_small.py MODEL_DIR TOKENIZER_DIR LORA_ROOT N_LORAS [1b|3b]

1B: for the `--workers` measurement (short requests, where the gateway rather than the GPU sets the pace), adapters
small0..; 3B: for placement over several engines (bench_placement.py), adapters p000..; the same layout as the
kit's make_model.py (../shared/gpu/device), with the kit's 32,000-token tokenizer.
"""

import json
import os
import shutil
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

model_dir, tok_dir, lora_root, n_loras = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
SHAPE = sys.argv[5] if len(sys.argv) > 5 else "1b"
H, FFN, L, NH, NKV = {"1b": (2048, 8192, 16, 32, 8), "3b": (3072, 8192, 28, 24, 8)}[SHAPE]
V, R = 32000, 16
t0 = time.time()
cfg = LlamaConfig(
    hidden_size=H,
    intermediate_size=FFN,
    num_hidden_layers=L,
    num_attention_heads=NH,
    num_key_value_heads=NKV,
    vocab_size=V,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    hidden_act="silu",
    initializer_range=0.02,
)
cfg.dtype = "bfloat16"
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(model_dir, safe_serialization=True)
for f in os.listdir(tok_dir):
    shutil.copy(os.path.join(tok_dir, f), model_dir)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets}
print(f"model {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params in {time.time() - t0:.1f}s", flush=True)
del model
for a in range(n_loras):
    g = torch.Generator(device="cuda").manual_seed(2000 + a)
    tensors = {}
    for name, (fin, fout) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = (
            torch.randn(R, fin, generator=g, device="cuda") * 0.02
        ).bfloat16()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (
            torch.randn(fout, R, generator=g, device="cuda") * 0.05
        ).bfloat16()
    d = os.path.join(lora_root, f"small{a}" if SHAPE == "1b" else f"p{a:03d}")
    os.makedirs(d, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, os.path.join(d, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": R,
        "lora_alpha": 2 * R,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "base_model_name_or_path": model_dir,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    with open(os.path.join(d, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
print(f"SMALL_DONE {n_loras} adapters in {time.time() - t0:.1f}s", flush=True)
