"""`--publish NAME`: push a finished run into the adapter registry, bound to its base, with its metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.errors import TrainingError
from training.recipe import Recipe

log = logging.getLogger(__name__)

REGISTRY_METRICS = ("exact_match", "loss", "perplexity", "stop_rate", "format_compliance")


class PublishError(TrainingError):
    """The registry refused the run; the message is the registry's reason."""


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics a manifest carries: the adapter's, the base's exact match beside it, and the canary delta."""
    adapter, base = metrics["adapter"], metrics["base"]
    out = {k: adapter[k] for k in REGISTRY_METRICS if k in adapter}
    out["base_exact_match"] = base["exact_match"]
    out["canary_delta"] = metrics["canary"]["delta"]
    out["test_rows"] = adapter["rows"]
    return out


def base_name(recipe: Recipe, base: Path) -> str:
    return recipe.base.name or f"base-{base.name}"


def publish_run(
    adapter_dir: Path,
    name: str,
    recipe: Recipe,
    base: Path,
    metrics: dict[str, Any],
    digest: str,
    contract: dict[str, Any] | None,
    registry: str | None,
    test_rows: list[dict[str, Any]] | None = None,
) -> Any:
    """The registered version; its golden prompts (for the parity gate before a promote) are the run's held-out
    test rows, those the evaluation generated for, answered in at most the evaluation's `max_new_tokens`."""
    from adapters_registry import open_registry
    from adapters_registry.errors import NotFoundError, RegistryError

    training = {
        "dataset_hash": digest,
        "hyperparameters": {
            "lora": recipe.lora.model_dump(mode="json"),
            "sft": recipe.sft,
            "seed": recipe.seed,
            "qlora": recipe.quantization.enabled,
        },
        "metrics": summary(metrics),
    }
    try:
        reg = open_registry(registry)
        bname = base_name(recipe, base)
        try:
            reg.get_base(bname)
        except NotFoundError:
            log.info("registering base %s from %s", bname, base)
            reg.add_base(base, bname)
        return reg.push(
            adapter_dir,
            name,
            bname,
            contract=contract,
            training=training,
            source=f"loragate train ({recipe.name})",
            description=f"recipe {recipe.name}",
            golden=_golden(recipe, test_rows),
        )
    except RegistryError as exc:
        raise PublishError(f"publish {name}: {exc}") from exc


def _golden(recipe: Recipe, rows: list[dict[str, Any]] | None) -> Any:
    from adapters_registry.golden import MAX_GOLDEN_ROWS, GoldenInput

    if not rows:
        return None
    kept = [{k: row[k] for k in ("messages", "prompt", "completion") if k in row} for row in rows]
    limit = min(recipe.evaluation.max_examples, MAX_GOLDEN_ROWS)
    return GoldenInput(kept[:limit], "training test split", recipe.evaluation.max_new_tokens)
