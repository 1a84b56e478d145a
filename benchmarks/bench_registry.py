"""Registry latency on the local backend: push/resolve of a 7B-shaped rank-16 adapter, and reads at 10,000 versions.

    .venv/bin/python benchmarks/bench_registry.py [--versions 10000] [--rounds 5] [--workdir DIR]

A fake Llama-2-7B base is registered from its config alone (module shapes come from the meta device); the adapter
(rank 16 on all seven linear projections of 32 layers, bf16, ~80 MB) is written directly with safetensors. The
10,000-version population is one real push plus records written the way push writes them (create-only version record,
digest index entry, head hint), which is what the read path sees. Each round runs the targets in a shuffled order;
"resolve alias" appears twice so the table shows its own noise. Prints a table of medians.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from adapters_registry.layout import version_key
from adapters_registry.registry import Registry, open_registry

LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def make_base(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(LLAMA_7B))
    return root


def make_adapter(out: Path, rank: int = 16, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    h, i = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"]
    assert isinstance(h, int) and isinstance(i, int)
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, h),
        "self_attn.v_proj": (h, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    tensors = {}
    for layer in range(int(str(LLAMA_7B["num_hidden_layers"]))):
        for module, (out_f, in_f) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f) * 0.01).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank) * 0.01).to(torch.bfloat16)
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "README.md").write_text("variant 0\n")
    return out


def populate(reg: Registry, name: str, versions: int) -> None:
    """Versions 2..N as push writes them, cloned from version 1's manifest with distinct digests."""
    first = reg.resolve(f"{name}@1")
    for v in range(2, versions + 1):
        digest = hashlib.sha256(str(v).encode()).hexdigest()
        record = first.model_copy(update={"version": v, "digest": f"sha256:{digest}"})
        assert reg.store.put_bytes(version_key(name, v), record.to_json(), if_absent=True)
        reg.store.put_bytes(f"adapters/{name}/digests/{digest[:2]}/{digest}/{v:09d}", b"", if_absent=True)
    reg.store.put_bytes(f"adapters/{name}/head.json", json.dumps({"version": versions}).encode())


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--versions", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=args.workdir))
    try:
        run(work, args.versions, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, versions: int, rounds: int) -> None:
    reg = open_registry(work / "registry")
    t_base = timed(lambda: reg.add_base(make_base(work / "llama-7b"), "llama-7b"))
    adapter = make_adapter(work / "adapter")
    size_mb = sum(p.stat().st_size for p in adapter.iterdir()) / 1e6

    counter = iter(range(1, 1_000_000))

    def push_new() -> None:  # distinct content every time: a new version is stored
        (adapter / "README.md").write_text(f"variant {next(counter)}\n")
        reg.push(adapter, "big", "llama-7b")

    def push_same() -> None:  # identical content: reported as the existing version
        reg.push(adapter, "big", "llama-7b")

    def materialize_cold() -> None:
        shutil.rmtree(reg.cache.root / "adapters", ignore_errors=True)
        reg.materialize(reg.resolve("big"))

    push_targets = {"push 80 MB (new version)": push_new, "push 80 MB (identical)": push_same,
                    "materialize (cold, hash-verified)": materialize_cold}  # fmt: skip
    push_times: dict[str, list[float]] = {k: [] for k in push_targets}
    push_new()  # warm-up, and a version for the other targets to find
    for _ in range(rounds):
        order = list(push_targets)
        random.shuffle(order)
        for key in order:
            push_times[key].append(timed(push_targets[key]))

    small = open_registry(work / "many")
    small.add_base(make_base(work / "llama-7b-2"), "llama-7b")
    small_adapter = work / "adapter"
    t_pop = time.perf_counter()
    small.push(small_adapter, "many", "llama-7b")
    populate(small, "many", versions)
    t_pop = time.perf_counter() - t_pop
    small.promote(f"many@{versions // 2}", "prod")
    digest_ref = f"many@sha256:{small.resolve(f'many@{versions - 7}').digest_hex[:12]}"

    read_targets: dict[str, Callable[[], object]] = {
        "resolve alias (name:prod)": lambda: small.resolve("many:prod"),
        "resolve alias (name:prod) again": lambda: small.resolve("many:prod"),
        "resolve version (name@N)": lambda: small.resolve(f"many@{versions // 3}"),
        "resolve latest (name)": lambda: small.resolve("many"),
        "resolve digest prefix": lambda: small.resolve(digest_ref),
    }
    read_times: dict[str, list[float]] = {k: [] for k in read_targets}
    list_times: list[float] = []
    for _ in range(rounds):
        order = list(read_targets)
        random.shuffle(order)
        for key in order:
            read_times[key].extend(timed(read_targets[key]) for _ in range(50))
        list_times.append(timed(lambda: small.list_adapters("many")))
    assert len(small.list_adapters("many")) == versions

    print(f"registry benchmark: adapter {size_mb:.1f} MB (rank 16, bf16, 7B shapes), {rounds} rounds, shuffled")
    print(
        f"base add (config only, meta-device shapes): {t_base * 1e3:.0f} ms; "
        f"populating {versions} versions: {t_pop:.1f} s"
    )
    print(f"{'operation':44} {'median':>10} {'p99':>10} {'min':>10} {'max':>10}  n")
    rows = [(k, v) for k, v in push_times.items()] + [(k + f" @{versions}", v) for k, v in read_times.items()]
    rows.append((f"list {versions} versions", list_times))
    for key, samples in rows:
        med, lo, hi = statistics.median(samples), min(samples), max(samples)
        p99 = statistics.quantiles(samples, n=100)[98] if len(samples) >= 100 else hi
        print(f"{key:44} {med * 1e3:8.2f}ms {p99 * 1e3:8.2f}ms {lo * 1e3:8.2f}ms {hi * 1e3:8.2f}ms  {len(samples)}")


if __name__ == "__main__":
    main()
