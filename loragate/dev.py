"""`loragate dev ...`: developer tools: the tiny local model, and random-weight stand-ins for real base models.

`loragate dev random-model --like llama-3-8b OUT` writes a folder that loads like the real checkpoint, for machines
that cannot reach a model hub: the architecture's config with the published shapes, a tokenizer of the real
vocabulary size (a byte-level BPE trained on local text, padded with unreachable filler tokens to the exact size,
with the family's special tokens at their ids), the family's chat template (with `{% generation %}` markers so
assistant-only losses work), a generation config, and random bf16 safetensors in shards with an index.
`--config-only` writes everything but the weights: enough to plan a run (`loragate train --plan`). Weights are
normal(0, initializer_range) for matrices and ones for norms, drawn per tensor from a generator seeded by (seed,
tensor name), on a GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.tiny_model import DEFAULT_CORPUS_DIR, corpus_files

log = logging.getLogger(__name__)

# What `loragate dev` prints as one line (`error: ...`, exit status 2): an output folder that is in the way.
USER_ERRORS = (FileExistsError, NotADirectoryError)


def register(sub: Any) -> None:
    dev = sub.add_parser("dev", help="developer tools").add_subparsers(dest="dev_command", required=True)
    tiny = dev.add_parser("tiny-model", help="build the tiny local Llama checkpoint (deterministic)")
    tiny.add_argument("out", type=Path, nargs="?", help="output folder (default: print the cached build)")
    tiny.set_defaults(handler=_tiny_model)
    rand = dev.add_parser("random-model", help="a random-weight folder with a real model's shapes and tokenizer size")
    rand.add_argument("--like", required=True, choices=sorted(FAMILIES), help="the model whose shapes to copy")
    rand.add_argument("out", type=Path, help="output folder (created; must be empty)")
    rand.add_argument("--config-only", action="store_true", help="everything but the weights (for planning)")
    rand.add_argument("--seed", type=int, default=0)
    rand.set_defaults(handler=_random_model)


def _tiny_model(args: argparse.Namespace) -> int:
    from training.tiny_model import build_tiny_model, cached_tiny_model

    print(cached_tiny_model() if args.out is None else build_tiny_model(args.out))
    return 0


def _random_model(args: argparse.Namespace) -> int:
    print(build_random_model(args.like, args.out, config_only=args.config_only, seed=args.seed))
    return 0


SHARD_BYTES = 4 * 1024**3
TRAINED_VOCAB = 8192  # BPE merges learned from the local corpus; the rest of the vocabulary is filler

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '[SYSTEM_PROMPT] ' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)

LLAMA3_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}


@dataclass(frozen=True)
class Family:
    """One `--like` choice: the published config's shapes and the tokenizer's layout."""

    architecture: str
    config: dict[str, Any]
    vocab: int
    specials_first: list[str]  # special tokens at ids 0.. (Mistral/SentencePiece layout)
    specials_last: int  # number of special tokens at the end of the vocabulary (Llama 3 layout: 256)
    special_names: Callable[[int], str]  # name of the i-th trailing special token
    bos: str
    eos: str
    pad: str
    chat_template: str
    generation_eos: list[str]


def _llama3_special(i: int) -> str:
    return LLAMA3_SPECIALS.get(i, f"<|reserved_special_token_{i}|>")


def _llama3(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": hidden // heads,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    }


FAMILIES: dict[str, Family] = {
    "llama-3-8b": Family(
        "LlamaForCausalLM",
        _llama3(4096, 14336, 32, 32),
        128256,
        [],
        256,
        _llama3_special,
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        LLAMA3_TEMPLATE,
        ["<|end_of_text|>", "<|eot_id|>"],
    ),
    "llama-3-70b": Family(
        "LlamaForCausalLM",
        _llama3(8192, 28672, 80, 64),
        128256,
        [],
        256,
        _llama3_special,
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        LLAMA3_TEMPLATE,
        ["<|end_of_text|>", "<|eot_id|>"],
    ),
    "mistral-7b": Family(  # Mistral-7B-Instruct-v0.3
        "MistralForCausalLM",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
        },
        32768,
        ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
        0,
        lambda i: f"[control_{i}]",
        "<s>",
        "</s>",
        "<unk>",
        MISTRAL_TEMPLATE,
        ["</s>"],
    ),
}


def corpus_texts(corpus_dir: Path = DEFAULT_CORPUS_DIR, limit: int = 4_000_000) -> list[str]:
    """Local text to train the BPE on: the licence texts, or (on an image without them) Python's own sources."""
    if corpus_dir.is_dir() and any(corpus_dir.iterdir()):
        return [p.read_text(errors="replace") for p in corpus_files(corpus_dir)]
    import sysconfig

    texts: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(errors="replace"))
        if sum(map(len, texts)) > limit:
            break
    return texts


def build_tokenizer(family: Family, out: Path, corpus_dir: Path = DEFAULT_CORPUS_DIR) -> Any:
    """A byte-level BPE of exactly `family.vocab` tokens with the family's special tokens, saved into `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    regular = family.vocab - family.specials_last
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(TRAINED_VOCAB, regular),
        special_tokens=family.specials_first,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_texts(corpus_dir), trainer=trainer)
    spec = json.loads(bpe.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    # Filler entries no merge produces: they take ids up to the real size and never come out of encoding.
    for i in range(len(vocab), regular):
        vocab[f"<filler_{i}>"] = i
    assert len(vocab) == regular
    specials = [family.special_names(i) for i in range(family.specials_last)]
    spec["added_tokens"] = [
        *spec["added_tokens"],
        *(
            {
                "id": regular + i,
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, name in enumerate(specials)
        ),
    ]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=None,
    )
    tokenizer.chat_template = family.chat_template
    tokenizer.model_max_length = int(family.config["max_position_embeddings"])
    if len(tokenizer) != family.vocab:
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens, wanted {family.vocab}")
    tokenizer.save_pretrained(out)
    return tokenizer


def make_config(family: Family, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    model_type = "mistral" if family.architecture.startswith("Mistral") else "llama"
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (family.bos, family.eos, family.pad)}
    return AutoConfig.for_model(
        model_type,
        architectures=[family.architecture],
        vocab_size=family.vocab,
        bos_token_id=ids[family.bos],
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in family.generation_eos],
        pad_token_id=ids[family.pad],
        dtype="bfloat16",
        **family.config,
    )


def build_random_model(like: str, out: Path, *, config_only: bool = False, seed: int = 0) -> Path:
    """Write the `like` stand-in into `out` (created; must be empty) and return it."""
    from transformers import GenerationConfig

    family = FAMILIES[like]
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty")
    tokenizer = build_tokenizer(family, out)
    config = make_config(family, tokenizer)
    config.save_pretrained(out)
    eos = config.eos_token_id
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    (out / "random_model.json").write_text(
        json.dumps({"like": like, "seed": seed, "config_only": config_only, "made_by": "loragate dev random-model"})
        + "\n"
    )
    if not config_only:
        write_random_weights(config, out, seed)
    log.info("random %s written to %s%s", like, out, " (config only)" if config_only else "")
    return out


def write_random_weights(config: Any, out: Path, seed: int) -> None:
    """Sharded random bf16 safetensors with the architecture's tensor names and an index."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    std = float(getattr(config, "initializer_range", 0.02))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, shape in shapes.items():
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if name.endswith("norm.weight") or len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=generator)
            tensor = tensor.cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
