"""Merge-and-export: fold one adapter into its base model and prove the result answers like base + adapter.

    loragate merge support-bot@3 --out merged/support-bot          # via the registry (training/merge_cli.py)
    merge_adapter(base_dir, adapter_dir, out, MergeOptions())       # the core, on plain folders

Steps: build the *reference* (what was trained: the base as stored, or its 4-bit NF4 load for QLoRA, plus the
adapter through PEFT), run it greedily on a probe set; build the *merge base* (the base in float32, or for QLoRA
the same 4-bit load dequantised, which is what the adapter was trained against), apply the adapter,
`merge_and_unload`, cast to the export precision; score the merged weights against the reference on the
reference's greedy trajectories (max logit difference, mean token KL, greedy agreement, all computed in float32);
refuse below the agreement threshold unless forced. The export (safetensors, tokenizer, chat template, manifest)
is built in a temp folder next to `out` and renamed into place only when everything passed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from training.errors import TrainingError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Precision = Literal["bf16", "fp16", "fp32"]
QloraBase = Literal["dequantized", "original"]
MergeBase = Literal["original", "dequantized"]

MANIFEST_NAME = "loragate-merge.json"
MANIFEST_SCHEMA = 1
DEFAULT_MIN_AGREEMENT = 0.95
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

DEFAULT_PROBES = (
    "Hello! Who are you?",
    "Summarise the GNU General Public License in one sentence.",
    "Write a short JSON object describing a cat.",
    "What is 17 plus 25?",
    "Translate 'free software' into French.",
    "List three colours.",
    "Explain what a LoRA adapter is.",
    "Give me a title for a blog post about open source licences.",
)


class MergeError(TrainingError):
    """The merge cannot run on these inputs (bad adapter folder, existing output, unsupported adapter)."""


class MergeRefused(MergeError):
    """The merged model does not answer like base + adapter; nothing was written."""

    def __init__(self, message: str, report: EquivalenceReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class QloraQuant:
    """The 4-bit load a QLoRA adapter was trained on (defaults: training/recipe.py's QuantSpec)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass(frozen=True)
class MergeOptions:
    precision: Precision = "bf16"
    qlora_base: QloraBase = "dequantized"
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    force: bool = False
    probes: Sequence[str] = DEFAULT_PROBES
    probe_new_tokens: int = 16


@dataclass(frozen=True)
class EquivalenceReport:
    reference: str
    probes: int
    tokens: int
    max_logit_diff: float
    mean_token_kl: float
    greedy_agreement: float
    min_agreement: float
    passed: bool
    forced: bool = False

    def summary(self) -> str:
        verdict = "passed" if self.passed else ("FORCED below threshold" if self.forced else "FAILED")
        return (
            f"equivalence vs {self.reference}: greedy agreement {self.greedy_agreement:.2%} "
            f"(threshold {self.min_agreement:.0%}), mean token KL {self.mean_token_kl:.2e}, "
            f"max |logit diff| {self.max_logit_diff:.4f} over {self.tokens} tokens of {self.probes} probes: {verdict}"
        )


@dataclass(frozen=True)
class MergeResult:
    out: Path
    manifest: dict[str, Any]
    report: EquivalenceReport
    merge_base: MergeBase
    seconds: float = field(default=0.0)


# ---- pure decisions -------------------------------------------------------------------------------------------


def qlora_quant(training: Mapping[str, Any] | None) -> QloraQuant | None:
    """The 4-bit load to rebuild when the training metadata says QLoRA (`hyperparameters.qlora`), else None.

    The load is read from `hyperparameters.quantization` (the recipe's section: quant_type, double_quant,
    compute_dtype) or from flat `bnb_4bit_*` keys; what is missing takes the training defaults.
    """
    hyper = (training or {}).get("hyperparameters") or {}
    if not isinstance(hyper, Mapping) or hyper.get("qlora") is not True:
        return None
    section = hyper.get("quantization")
    quant = section if isinstance(section, Mapping) else {}
    default = QloraQuant()
    return QloraQuant(
        quant_type=str(quant.get("quant_type", hyper.get("bnb_4bit_quant_type", default.quant_type))),
        double_quant=bool(quant.get("double_quant", hyper.get("bnb_4bit_use_double_quant", default.double_quant))),
        compute_dtype=str(quant.get("compute_dtype", hyper.get("bnb_4bit_compute_dtype", default.compute_dtype))),
    )


def choose_merge_base(quant: QloraQuant | None, qlora_base: QloraBase) -> MergeBase:
    """QLoRA adapters merge into the dequantised 4-bit base by default (what they were trained against)."""
    if quant is None:
        return "original"
    return "dequantized" if qlora_base == "dequantized" else "original"


def judge(agreement: float, min_agreement: float, force: bool) -> tuple[bool, bool]:
    """(passed, forced): below the threshold a merge goes ahead only when forced."""
    passed = agreement >= min_agreement
    return passed, (not passed and force)


def torch_dtype_name(precision: Precision) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise MergeError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)") from exc
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise MergeError(f"{path}: no peft_type")
    if config["peft_type"] != "LORA":
        raise MergeError(f"{adapter_dir}: peft_type {config['peft_type']} cannot be merged (LoRA only)")
    return config


# ---- equivalence --------------------------------------------------------------------------------------------


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float, float, int]:
    """(max |diff|, mean KL(reference || candidate), argmax agreement, positions) over [positions, vocab] logits."""
    import torch

    ref = reference.float()
    cand = candidate.float()
    max_diff = float((ref - cand).abs().max())
    ref_logp = torch.log_softmax(ref, dim=-1)
    cand_logp = torch.log_softmax(cand, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(dim=-1)
    agreement = (ref.argmax(dim=-1) == cand.argmax(dim=-1)).float().mean()
    return max_diff, float(kl.mean()), float(agreement), int(ref.shape[0])


@dataclass(frozen=True)
class _Trajectory:
    ids: torch.Tensor  # [1, prompt + generated]
    start: int  # first position whose logits predict a generated token


def _probe_trajectories(model: Any, tokenizer: Any, probes: Sequence[str], new_tokens: int) -> list[_Trajectory]:
    import torch
    from tqdm import tqdm

    out = []
    for text in tqdm(probes, desc="merge reference", unit="probe", disable=None, leave=False):  # a terminal only
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt = enc["input_ids"]
        with torch.no_grad():
            ids = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        out.append(_Trajectory(ids=ids, start=prompt.shape[1] - 1))
    return out


def _trajectory_logits(model: Any, trajectories: Sequence[_Trajectory]) -> torch.Tensor:
    import torch

    parts = []
    with torch.no_grad():
        for t in trajectories:
            logits = model(input_ids=t.ids).logits[0].float()
            parts.append(logits[t.start : t.ids.shape[1] - 1])
    return torch.cat(parts)


# ---- model loading ------------------------------------------------------------------------------------------


def _bnb_config(quant: QloraQuant, compute_dtype: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def _load_base(base_dir: Path, quant: QloraQuant | None, *, dequantize: bool = False) -> Any:
    """The base in float32 compute: as stored (upcast), or its 4-bit load (optionally dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM

    if quant is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    else:
        # Quantise from the weights as stored (the same path training took), compute in float32 for the check.
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=_bnb_config(quant, "float32"), dtype=torch.float32
        )
        if dequantize:
            model = model.dequantize(dtype=torch.float32)  # also drops quantization_config from the config
    model.eval()
    return model


def _with_adapter(model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except Exception as exc:  # PEFT/safetensors raise many types for a file that does not fit the base
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MergeError(f"{adapter_dir}: cannot apply the adapter to this base ({first_line})") from exc
    peft_model.eval()
    return peft_model


# ---- export -------------------------------------------------------------------------------------------------


def _load_tokenizer(base_dir: Path, adapter_dir: Path) -> Any:
    """The adapter's own tokenizer when training saved one beside it, else the base's; a `chat_template.jinja` in
    the adapter folder (training writes the template it trained with) wins over the base's template."""
    from transformers import AutoTokenizer

    own = (adapter_dir / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if own else base_dir)
    template = adapter_dir / "chat_template.jinja"
    if template.is_file():
        tokenizer.chat_template = template.read_text()
    return tokenizer


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)
    if tokenizer.chat_template and saved.chat_template != tokenizer.chat_template:
        raise MergeError(f"{out}: the chat template did not survive the export")


def _new_workdir(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out}: already exists (choose another --out or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out: Path,
    options: MergeOptions = MergeOptions(),
    *,
    training: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Merge `adapter_dir` into `base_dir`, check equivalence, export atomically to `out`.

    `training` is the adapter's training metadata (QLoRA detection); `provenance` (source adapter ref, digest,
    base name and fingerprint) is copied into the manifest.
    """
    import torch

    started = time.monotonic()
    adapter_config = read_adapter_config(adapter_dir)
    quant = qlora_quant(training)
    merge_base = choose_merge_base(quant, options.qlora_base)
    work = _new_workdir(out)
    try:
        tokenizer = _load_tokenizer(base_dir, adapter_dir)
        reference_name = "4-bit base + adapter (PEFT)" if quant else "base + adapter (PEFT)"
        logger.info("building the reference: %s", reference_name)
        reference = _with_adapter(_load_base(base_dir, quant), adapter_dir)
        trajectories = _probe_trajectories(reference, tokenizer, options.probes, options.probe_new_tokens)
        ref_logits = _trajectory_logits(reference, trajectories)
        del reference

        logger.info("merging into the %s base", "dequantized 4-bit" if merge_base == "dequantized" else "original")
        merge_quant = quant if merge_base == "dequantized" else None
        merged = _with_adapter(_load_base(base_dir, merge_quant, dequantize=True), adapter_dir).merge_and_unload()
        dtype = getattr(torch, torch_dtype_name(options.precision))
        merged = merged.to(dtype)
        merged.config.dtype = dtype
        merged.save_pretrained(work, safe_serialization=True)
        _save_tokenizer(tokenizer, work)

        # Score the exported weights (rounded to the export precision) in float32 compute.
        max_diff, kl, agreement, tokens = compare_logits(ref_logits, _trajectory_logits(merged.float(), trajectories))
        passed, forced = judge(agreement, options.min_agreement, options.force)
        report = EquivalenceReport(
            reference=reference_name,
            probes=len(trajectories),
            tokens=tokens,
            max_logit_diff=max_diff,
            mean_token_kl=kl,
            greedy_agreement=agreement,
            min_agreement=options.min_agreement,
            passed=passed,
            forced=forced,
        )
        if not passed and not forced:
            raise MergeRefused(
                f"merged model disagrees with base + adapter on {1 - agreement:.1%} of greedy tokens "
                f"(agreement {agreement:.2%} < {options.min_agreement:.0%}); nothing written "
                "(--force to export anyway)",
                report,
            )
        manifest = build_manifest(
            adapter_config=adapter_config,
            merge_base=merge_base,
            quant=quant,
            options=options,
            report=report,
            provenance=provenance or {},
        )
        (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked by _new_workdir
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return MergeResult(
        out=out, manifest=manifest, report=report, merge_base=merge_base, seconds=time.monotonic() - started
    )


def build_manifest(
    *,
    adapter_config: Mapping[str, Any],
    merge_base: MergeBase,
    quant: QloraQuant | None,
    options: MergeOptions,
    report: EquivalenceReport,
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "schema_version": MANIFEST_SCHEMA,
        "kind": "loragate-merged-model",
        "source": dict(provenance),
        "adapter": {
            "peft_type": adapter_config.get("peft_type"),
            "r": adapter_config.get("r"),
            "lora_alpha": adapter_config.get("lora_alpha"),
            "use_dora": bool(adapter_config.get("use_dora")),
            "modules_to_save": adapter_config.get("modules_to_save"),
            "qlora": quant is not None,
        },
        "merge": {
            "base": merge_base,
            "quantization": asdict(quant) if quant and merge_base == "dequantized" else None,
            "precision": options.precision,
            "dtype": torch_dtype_name(options.precision),
        },
        "equivalence": asdict(report),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
