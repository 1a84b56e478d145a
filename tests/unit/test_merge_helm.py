"""The Helm values `loragate merge --register` writes: rendered and linted by Helm's Go SDK, they serve the merged
model under the adapter's public name on engines without LoRA, from a volume that holds it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters_registry.registry import Registry
from adapters_registry.store import sha256_file
from training.merge_cli import helm_values, write_snippets
from training.tiny_model import build_random_adapter

helm = pytest.importorskip("helm_python")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "loragate"


def _engine_pod(values: dict[str, Any]) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="bot", namespace="ml")
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("-engine"):
                pod: dict[str, Any] = doc["spec"]["template"]["spec"]
                return pod
    raise AssertionError("no engine Deployment rendered")


def _engine_args(values: dict[str, Any]) -> list[str]:
    vllm = next(c for c in _engine_pod(values)["containers"] if c["name"] == "vllm")
    return list(vllm["args"])


def _model_on_a_volume(pod: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(the --model path, the vLLM mount holding it, that mount's volume); fails if no mount holds the path."""
    vllm = next(c for c in pod["containers"] if c["name"] == "vllm")
    model = vllm["args"][vllm["args"].index("--model") + 1]
    [mount] = [m for m in vllm["volumeMounts"] if model.startswith(m["mountPath"].rstrip("/") + "/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return model, mount, volume


def test_merged_values_serve_without_lora() -> None:
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    if "enabled" not in chart_values["engine"]["lora"]:
        pytest.skip("the chart has no engine.lora.enabled switch yet (asked of the chart owner in NOTES.md)")
    values = helm_values(
        public_name="support-bot",
        model_dir_name="support-bot-merged",
        registry_base="support-bot-merged",
        registry="s3://adapters/registry",
    )
    args = _engine_args(values)
    assert args[args.index("--served-model-name") + 1] == "support-bot"
    assert args[args.index("--model") + 1] == "/models/support-bot-merged"
    assert not {"--enable-lora", "--max-loras", "--max-lora-rank"} & set(args)
    assert "--enable-lora" in _engine_args({})  # the default deployment keeps LoRA


def test_values_for_an_s3_registry_render_a_pod_that_mounts_its_model(tmp_path: Path) -> None:
    """Weights in the registry: an init container copies the base onto the model volume, where vLLM reads it."""
    out = tmp_path / "merged" / "bot-merged"
    out.mkdir(parents=True)
    _, helm_file = write_snippets(out, "bot-merged", "bot", "s3://adapters/reg", weights_in_registry=True)
    text = helm_file.read_text()
    assert text.startswith("# helm install bot helm/loragate -f bot-merged.helm-values.yaml\n")
    assert "# the engine pods copy base bot-merged from s3://adapters/reg at start" in text
    values = yaml.safe_load(text)
    assert values["registry"] == {"mode": "s3", "s3": {"bucket": "adapters", "prefix": "reg"}}
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []

    pod = _engine_pod(values)
    model, mount, volume = _model_on_a_volume(pod)
    assert (model, mount["mountPath"], mount["readOnly"]) == ("/models/bot-merged", "/models", True)
    assert volume == {"name": "models", "emptyDir": {"sizeLimit": "100Gi"}}
    [fetch] = pod["initContainers"]
    assert fetch["args"] == ["--base", "bot-merged", "--out", model]
    assert {m["name"]: m["mountPath"] for m in fetch["volumeMounts"]} == {"models": "/models"}


def test_values_for_a_local_registry_fail_lint_and_install_until_a_volume_holds_the_model(tmp_path: Path) -> None:
    out = tmp_path / "merged" / "bot-merged"
    out.mkdir(parents=True)
    _, helm_file = write_snippets(out, "bot-merged", "bot", str(tmp_path / "registry"))
    text = helm_file.read_text()
    assert f"# copy {out} into a PVC as bot-merged/ and set engine.modelVolume.existingClaim to that PVC:" in text
    values = yaml.safe_load(text)
    no_volume = "at '/engine/modelVolume/existingClaim': minLength: got 0, want 1"
    assert any(no_volume in error for error in helm.lint(CHART, values, strict=True)["errors"])
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name="bot", namespace="ml")
    assert no_volume in str(info.value)
    # What the comment asks for: a PVC holding the folder.
    values["engine"]["modelVolume"] = {"existingClaim": "merged-models"}
    model, mount, volume = _model_on_a_volume(_engine_pod(values))
    assert (model, mount["mountPath"]) == ("/models/bot-merged", "/models")
    assert volume["persistentVolumeClaim"]["claimName"] == "merged-models"


def test_merge_register_into_s3_writes_values_whose_init_container_fetches_the_merged_model(
    s3_registry: Registry, tiny_model: Path, moto_endpoint: str, tmp_path: Path
) -> None:
    """The whole path: `loragate merge --register` into an S3 registry, its values rendered, and the init container's
    script (deploy/base_fetch.py) run with the rendered arguments against that registry."""
    from loragate.cli import main

    adapter = build_random_adapter(tiny_model, tmp_path / "adapter", seed=41)
    s3_registry.push(adapter, "bot", base="tiny")
    out = tmp_path / "export" / "bot-merged"
    argv = ["merge", "bot@1", "--out", str(out), "--register", "bot-merged", "--registry", s3_registry.location]
    assert main(argv) == 0
    values = yaml.safe_load((out.parent / "bot-merged.helm-values.yaml").read_text())
    assert values["engine"]["modelVolume"] == {"registryBase": "bot-merged"}
    [fetch] = _engine_pod(values)["initContainers"]

    models = tmp_path / "pod" / "models"  # the pod's model volume, here
    args = [a.replace("/models", str(models)) if a.startswith("/models") else a for a in fetch["args"]]
    env = {
        **os.environ,
        "LORAGATE_REGISTRY": s3_registry.location,
        "LORAGATE_S3_ENDPOINT_URL": moto_endpoint,
        "PYTHONPATH": str(REPO),
    }
    script = [sys.executable, str(REPO / "deploy" / "base_fetch.py"), *args]
    proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fetched = models / "bot-merged"
    manifest = s3_registry.get_base("bot-merged")
    assert manifest.files is not None
    assert {p.name: sha256_file(p) for p in fetched.iterdir()} == manifest.files
    assert (fetched / "config.json").read_bytes() == (out / "config.json").read_bytes()
