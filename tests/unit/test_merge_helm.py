"""The Helm values `loragate merge --register` writes: rendered by Helm's Go SDK, they serve the merged model
under the adapter's public name on engines without LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from training.merge_cli import helm_values

helm = pytest.importorskip("helm_python")

CHART = Path(__file__).resolve().parents[2] / "helm" / "loragate"


def _engine_args(values: dict[str, Any]) -> list[str]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="bot", namespace="ml")
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("-engine"):
                vllm = next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")
                return list(vllm["args"])
    raise AssertionError("no engine Deployment rendered")


def test_merged_values_serve_without_lora() -> None:
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    if "enabled" not in chart_values["engine"]["lora"]:
        pytest.skip("the chart has no engine.lora.enabled switch yet (asked of the chart owner in NOTES.md)")
    args = _engine_args(helm_values(public_name="support-bot", model_dir_name="support-bot-merged"))
    assert args[args.index("--served-model-name") + 1] == "support-bot"
    assert args[args.index("--model") + 1] == "/models/support-bot-merged"
    assert not {"--enable-lora", "--max-loras", "--max-lora-rank"} & set(args)
    assert "--enable-lora" in _engine_args({})  # the default deployment keeps LoRA
