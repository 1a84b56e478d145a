"""The base model a recipe trains on: a local directory, or the tiny local Llama built (and optionally given a short
language-model training of its own on local text) and cached by content key.

A randomly initialised base has near-uniform output logits (QLoRA on it learned nothing); `pretrain_steps` gives it
some next-token training on the tokenizer's corpus so that it behaves like a (very small) language model. The
result is cached under `$LORAGATE_CACHE/pretrained-base/<key>` (default ~/.cache/loragate/pretrained-base).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from training.recipe import BaseSpec, TinyBase
from training.tiny_model import DEFAULT_CORPUS_DIR, TinyModelSpec, cached_tiny_model, corpus_files, tiny_cache_dir

log = logging.getLogger(__name__)

PRETRAIN_VERSION = "1"


HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt")


def resolve_base(spec: BaseSpec) -> Path:
    if spec.path is not None:
        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base.path {path}: not a model directory (no config.json)")
        return path
    if spec.hub is not None:
        return hub_base(spec.hub, spec.revision)
    assert spec.tiny is not None
    return tiny_base(spec.tiny)


def hub_base(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of a hub model: from the Hugging Face cache, or downloaded when HF_HUB_OFFLINE=0."""
    import os

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "1").lower() not in ("0", "false", "no", "")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES), local_files_only=offline)
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(
            f"base.hub {repo_id}: not in the local Hugging Face cache and the hub is off (HF_HUB_OFFLINE=1); "
            "download it (HF_HUB_OFFLINE=0) or point --set base.path=DIR at a local folder"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise FileNotFoundError(f"base.hub {repo_id}: {str(exc).splitlines()[0]}") from exc
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base.hub {repo_id}: the snapshot {path} has no config.json")
    return path


def _tiny_spec(tiny: TinyBase) -> TinyModelSpec:
    return TinyModelSpec(
        vocab_size=tiny.vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        seed=tiny.seed,
    )


def tiny_base(tiny: TinyBase, cache_dir: Path | None = None) -> Path:
    raw = cached_tiny_model(_tiny_spec(tiny))
    if tiny.pretrain_steps == 0:
        return raw
    key = hashlib.sha256(f"{PRETRAIN_VERSION}|{raw.name}|{tiny.model_dump_json()}".encode()).hexdigest()[:16]
    root = cache_dir or tiny_cache_dir().parent / "pretrained-base"
    final = root / key
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        pretrain(raw, tmp, tiny)
        try:
            tmp.rename(final)
        except OSError:  # another process built the same key first
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def pretrain(raw: Path, out: Path, tiny: TinyBase) -> None:
    """Full-parameter next-token training on the local corpus (deterministic on one machine)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("pretraining the tiny base for %s steps (cached once per machine)", tiny.pretrain_steps)
    tokenizer = AutoTokenizer.from_pretrained(raw)
    text = "\n".join(p.read_text(errors="replace") for p in corpus_files(DEFAULT_CORPUS_DIR))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    chunks = ids[: len(ids) // tiny.pretrain_seq_len * tiny.pretrain_seq_len].view(-1, tiny.pretrain_seq_len)
    torch.manual_seed(tiny.seed)
    model = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=tiny.pretrain_lr, total_steps=tiny.pretrain_steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(tiny.seed)
    for step in range(tiny.pretrain_steps):
        batch = chunks[torch.randint(0, len(chunks), (tiny.pretrain_batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == tiny.pretrain_steps - 1:
            log.info("pretrain step %s/%s loss %.3f", step + 1, tiny.pretrain_steps, loss.item())
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"from": str(raw), **tiny.model_dump()}, indent=2))
