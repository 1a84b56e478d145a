"""Push-time checks of an adapter directory against the base it will be bound to.

`inspect_adapter(dir, base)` either returns what the manifest needs or raises `ValidationError` naming the file and
the reason. Nothing here writes anything. Adapters vLLM cannot hot-load but that can still be merged (DoRA,
modules_to_save, trainable tokens, trained biases) pass with `serving="merge-only"` and a reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_registry.errors import ValidationError
from adapters_registry.manifest import BaseManifest, Serving
from adapters_registry.safetensors_file import DTYPE_NAMES, SafetensorsError, non_finite_tensors, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_RANK = 512  # vLLM's largest --max-lora-rank
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".js", ".ipynb", ".exe"})
DOC_SUFFIXES = frozenset({".json", ".md", ".txt", ".jinja", ".model", ".yaml", ".yml"})
UNCONVERTED_INITS = ("pissa", "olora", "corda")
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)")
_EMBED_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)")
_DORA_KEY = re.compile(r".+\.lora_magnitude_vector(\.weight)?")
_TOKENS_KEY = re.compile(r".+\.trainable_tokens_delta(\.weight)?")


@dataclass(frozen=True)
class AdapterFacts:
    files: list[str]
    config: dict[str, Any]
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    dtype: str
    serving: Serving
    serving_reason: str | None
    modules: dict[str, int] = field(default_factory=dict)  # full module path -> rank


def classify_files(adapter_dir: Path) -> list[str]:
    """The files to store (relative names); refuses pickles, code, links and sub-directories."""
    if not adapter_dir.is_dir():
        raise ValidationError("not a directory", path=str(adapter_dir))
    files: list[str] = []
    for entry in sorted(adapter_dir.iterdir()):
        where = str(entry)
        if entry.name.startswith("."):
            continue  # editor and VCS droppings are not part of the adapter and are not stored
        suffix = entry.suffix.lower()
        if entry.is_symlink():
            raise ValidationError("symbolic links are refused (the registry stores file contents only)", path=where)
        if entry.is_dir():
            raise ValidationError("sub-directories are refused: push the adapter directory itself", path=where)
        if suffix in PICKLE_SUFFIXES:
            raise ValidationError(
                f"pickle-based {suffix} files are refused (they can run code when loaded); save with safetensors",
                path=where,
            )
        if suffix in CODE_SUFFIXES:
            raise ValidationError("code files are refused in an adapter", path=where)
        if suffix == ".safetensors" and entry.name != WEIGHTS_FILE:
            raise ValidationError(f"unexpected weights file; an adapter has exactly one {WEIGHTS_FILE}", path=where)
        if suffix not in DOC_SUFFIXES and suffix != ".safetensors":
            raise ValidationError(f"unsupported file type {suffix or '(none)'!r}", path=where)
        files.append(entry.name)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in files:
            raise ValidationError("missing (required in every adapter)", path=str(adapter_dir / required))
    return files


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"not valid JSON: {exc}", path=str(path)) from exc
    if not isinstance(config, dict):
        raise ValidationError("not a JSON object", path=str(path))
    return config


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


def _check_config(config: dict[str, Any], where: str) -> tuple[int, float]:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValidationError(f"peft_type is {peft_type!r}; only LORA adapters are accepted", path=where)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(UNCONVERTED_INITS):
        raise ValidationError(
            f"init_lora_weights={init!r} was not converted: this adapter only works with the base weights that its "
            "initialisation modified; save it with path_initial_model_for_weight_conversion to get a plain LoRA",
            path=where,
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValidationError(f"r must be a positive integer, got {r!r}", path=where)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ValidationError(f"lora_alpha must be a number, got {alpha!r}", path=where)
    return r, float(alpha)


def _check_target_modules(config: dict[str, Any], base: BaseManifest, where: str) -> None:
    targets = config.get("target_modules")
    known = list(base.linear_shapes) + list(base.embedding_shapes)
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, m) for m in known):
            return
        raise ValidationError(f"target_modules {targets!r} matches no module of base {base.name!r}", path=where)
    for target in targets or []:
        if not any(m == target or m.endswith(f".{target}") for m in known):
            raise ValidationError(f"target module {target!r} does not exist on base {base.name!r}", path=where)


def inspect_adapter(adapter_dir: Path, base: BaseManifest) -> AdapterFacts:
    files = classify_files(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    config = read_config(config_path)
    r, alpha = _check_config(config, str(config_path))
    _check_target_modules(config, base, str(config_path))
    where = str(weights_path)
    try:
        tensors = read_header(weights_path)
    except SafetensorsError as exc:
        raise ValidationError(str(exc), path=where) from exc
    if not tensors:
        raise ValidationError("holds no tensors", path=where)

    reasons: list[str] = []
    if config.get("use_dora"):
        reasons.append("DoRA (use_dora=true)")
    if config.get("modules_to_save"):
        reasons.append(f"modules_to_save={config['modules_to_save']} carries full module weights")
    if config.get("trainable_token_indices"):
        reasons.append("trainable token deltas (trainable_token_indices)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        reasons.append(f"trained biases (bias={config.get('bias')!r}, lora_bias={bool(config.get('lora_bias'))})")

    ranks: dict[str, int] = {}
    parts: dict[str, set[str]] = {}
    rank_pattern: dict[str, Any] = config.get("rank_pattern") or {}
    dtypes: Counter[str] = Counter()
    full_weights: list[str] = []
    for t in tensors:
        if t.dtype not in DTYPE_NAMES:
            raise ValidationError(f"tensor {t.name} has dtype {t.dtype}; only F32, BF16 and F16 are accepted", where)
        dtypes[t.dtype] += 1
        key = t.name.removeprefix(PREFIX)
        if _DORA_KEY.fullmatch(key):
            if not any(r_.startswith("DoRA") for r_ in reasons):
                reasons.append("DoRA magnitude vectors")
            continue
        if _TOKENS_KEY.fullmatch(key):
            if not any(r_.startswith("trainable token") for r_ in reasons):
                reasons.append("trainable token deltas")
            continue
        lora, embed = _LORA_KEY.fullmatch(key), _EMBED_KEY.fullmatch(key)
        if lora and lora["param"] == "bias":
            if not any(r_.startswith("trained biases") for r_ in reasons):
                reasons.append("trained biases (lora_B.bias)")
            continue
        if lora or embed:
            match = lora or embed
            assert match is not None
            module, part = match["module"], match["part"]
            shapes = base.linear_shapes if lora else base.embedding_shapes
            if module not in shapes:
                raise ValidationError(f"tensor {t.name}: module {module} does not exist on base {base.name!r}", where)
            expected_rank = int(_pattern_value(rank_pattern, module, r))
            if len(t.shape) != 2:
                raise ValidationError(f"tensor {t.name} has shape {list(t.shape)}; expected a matrix", where)
            first, second = shapes[module]  # linear: (out, in); embedding: (num, dim)
            if lora:
                expected = (expected_rank, second) if part == "lora_A" else (first, expected_rank)
            else:
                expected = (expected_rank, first) if part == "lora_embedding_A" else (second, expected_rank)
            if t.shape != expected:
                raise ValidationError(
                    f"tensor {t.name} has shape {list(t.shape)} but base {base.name!r} with rank {expected_rank} "
                    f"needs {list(expected)}",
                    where,
                )
            ranks[module] = expected_rank
            parts.setdefault(module, set()).add(part.replace("embedding_", ""))
            continue
        module = key.rsplit(".", 1)[0]
        if module.endswith(".modules_to_save.default"):
            module = module.removesuffix(".modules_to_save.default")
        if module in base.linear_shapes or module in base.embedding_shapes:
            full_weights.append(module)
            continue
        raise ValidationError(f"unexpected tensor {t.name}: not a LoRA weight of a module on base {base.name!r}", where)
    if full_weights and not any("modules_to_save" in r_ or "biases" in r_ for r_ in reasons):
        reasons.append(f"full weights of {sorted(set(full_weights))} (modules_to_save)")
    if not ranks:
        raise ValidationError("holds no LoRA weights (lora_A / lora_B)", where)
    for module, seen in sorted(parts.items()):
        if seen != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in seen else "lora_A"
            raise ValidationError(f"module {module} has no {missing} weight", where)
    if (top := max(ranks.values())) > MAX_RANK:
        raise ValidationError(f"rank {top} exceeds {MAX_RANK}, the largest --max-lora-rank vLLM supports", where)
    if bad := non_finite_tensors(weights_path, tensors):
        raise ValidationError(f"tensor {bad[0]} holds NaN or infinite values ({len(bad)} tensors affected)", where)

    return AdapterFacts(
        files=files,
        config=config,
        peft_type="LORA",
        r=max(ranks.values()),
        lora_alpha=alpha,
        use_rslora=bool(config.get("use_rslora")),
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        dtype=DTYPE_NAMES[dtypes.most_common(1)[0][0]] if len(dtypes) == 1 else "mixed",
        serving="merge-only" if reasons else "lora",
        serving_reason="; ".join(reasons) if reasons else None,
        modules=ranks,
    )
