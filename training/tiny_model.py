"""A tiny, real Llama checkpoint built locally, for machines without a GPU or a model hub.

`build_tiny_model(out)` trains a byte-level BPE tokenizer on local text, wraps it with a chat template, and saves
a randomly initialised `LlamaForCausalLM`; transformers, PEFT and vLLM all load the result. The build is
deterministic, so `cached_tiny_model()` keys its cache on the inputs and builds once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

BUILDER_VERSION = "1"
DEFAULT_CORPUS_DIR = Path("/usr/share/common-licenses")

PAD, BOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"

# ChatML-style; `{% generation %}` marks assistant tokens so trainers can mask everything else out of the loss.
# The end-of-turn token sits inside the generation block: the model must learn to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0


def corpus_files(corpus_dir: Path) -> list[Path]:
    files = sorted(p for p in corpus_dir.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        raise FileNotFoundError(f"{corpus_dir}: no text files to train the tokenizer on")
    return files


def cache_key(spec: TinyModelSpec, corpus_dir: Path = DEFAULT_CORPUS_DIR) -> str:
    digest = hashlib.sha256(f"{BUILDER_VERSION}|{json.dumps(asdict(spec), sort_keys=True)}|".encode())
    digest.update(CHAT_TEMPLATE.encode())
    for path in corpus_files(corpus_dir):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_tiny_model(out: Path, spec: TinyModelSpec = TinyModelSpec(), corpus_dir: Path = DEFAULT_CORPUS_DIR) -> Path:
    """Build the checkpoint into `out` (created; must not exist or be empty) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[PAD, BOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [p.read_text(errors="replace") for p in corpus_files(corpus_dir)]
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=IM_END, pad_token=PAD, unk_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = spec.max_position_embeddings
    tokenizer.save_pretrained(out)

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (PAD, BOS, IM_END)}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[IM_END],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[IM_END], pad_token_id=ids[PAD])
    model.save_pretrained(out, safe_serialization=True)
    return out


def tiny_cache_dir() -> Path:
    root = os.environ.get("LORAGATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loragate")
    return Path(root) / "tiny-model"


def cached_tiny_model(
    spec: TinyModelSpec = TinyModelSpec(),
    cache_dir: Path | None = None,
    corpus_dir: Path = DEFAULT_CORPUS_DIR,
) -> Path:
    """Return the checkpoint for `spec`, building it once per content key (atomic: temp dir, then rename)."""
    root = cache_dir or tiny_cache_dir()
    final = root / cache_key(spec, corpus_dir)
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build_tiny_model(tmp, spec, corpus_dir)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; its build is identical
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_random_adapter(base: Path, out: Path, *, seed: int = 0, r: int = 8, **lora_kw: object) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B on `base`, so it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    lora_kw.setdefault("target_modules", "all-linear")
    config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **lora_kw)  # type: ignore[arg-type]
    get_peft_model(model, config).save_pretrained(out)
    return out
