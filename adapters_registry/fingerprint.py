"""The identity of a base model: sizes, hashes of config/tokenizer/chat template/weights, and module shapes.

`describe_base(dir)` reads only JSON and tokenizer files plus (when present) the weights for their hash; module shapes
come from instantiating the architecture on torch's `meta` device, so no weights are loaded and a config-only
directory works too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_registry.errors import ValidationError
from adapters_registry.store import Progress, sha256_file

VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json")
WEIGHT_SUFFIXES = (".safetensors",)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BaseFacts:
    fingerprint: str
    architecture: str
    model_type: str | None
    hidden_size: int
    intermediate_size: int | None
    num_hidden_layers: int
    vocab_size: int
    config_hash: str
    tokenizer_hash: str | None
    chat_template_hash: str | None
    weights_hash: str | None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ValidationError("missing (a base model directory needs its config.json)", path=str(path)) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"not valid JSON: {exc}", path=str(path)) from exc
    if not isinstance(data, dict):
        raise ValidationError("not a JSON object", path=str(path))
    return data


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model's sizes under text_config."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def describe_base(model_dir: Path, *, hash_weights: bool = True, progress: Progress | None = None) -> BaseFacts:
    config_path = model_dir / "config.json"
    config = _read_json(config_path)
    text = _text_config(config)
    try:
        architecture = str((config.get("architectures") or [config["model_type"]])[0])
        hidden, layers, vocab = int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValidationError(
            f"lacks {exc} (hidden_size, num_hidden_layers, vocab_size)", path=str(config_path)
        ) from exc
    intermediate = text.get("intermediate_size")
    config_hash = _sha(_canonical({k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}))

    tok_digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            found = True
            tok_digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes() + b"\0")
    tok_config: dict[str, Any] = {}
    if (model_dir / "tokenizer_config.json").is_file():
        found = True
        tok_config = _read_json(model_dir / "tokenizer_config.json")
        tok_digest.update(_canonical({k: v for k, v in tok_config.items() if k != "chat_template"}))
    tokenizer_hash = "sha256:" + tok_digest.hexdigest() if found else None

    template: Any = None
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    elif (model_dir / "chat_template.json").is_file():
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    else:
        template = tok_config.get("chat_template")
    chat_template_hash = None if template is None else _sha(_canonical(template))

    weights_hash = None
    weight_files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if hash_weights and weight_files:
        weights_hash = _sha(_canonical([[p.name, sha256_file(p, progress)] for p in weight_files]))

    identity = {
        "architecture": architecture,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "config_hash": config_hash,
        "tokenizer_hash": tokenizer_hash,
        "chat_template_hash": chat_template_hash,
        "weights_hash": weights_hash,
    }
    return BaseFacts(
        fingerprint=_sha(_canonical(identity)),
        architecture=architecture,
        model_type=config.get("model_type"),
        hidden_size=hidden,
        intermediate_size=int(intermediate) if intermediate is not None else None,
        num_hidden_layers=layers,
        vocab_size=vocab,
        config_hash=config_hash,
        tokenizer_hash=tokenizer_hash,
        chat_template_hash=chat_template_hash,
        weights_hash=weights_hash,
    )


def module_shapes(model_dir: Path) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """(linear, embedding) shapes of every module, from the config alone (the model is built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValidationError(
            f"transformers cannot build this architecture: {first_line}", path=str(model_dir)
        ) from exc
    linear: dict[str, tuple[int, int]] = {}
    embedding: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear[name] = (int(module.out_features), int(module.in_features))
        elif isinstance(module, Conv1D):
            linear[name] = (int(module.nf), int(module.weight.shape[0]))
        elif isinstance(module, torch.nn.Embedding):
            embedding[name] = (int(module.num_embeddings), int(module.embedding_dim))
    return linear, embedding
