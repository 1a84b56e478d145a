"""Rendering helpers for the Helm chart tests (test_helm_*.py): the chart rendered by Helm's own Go SDK."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "loragate"
RELEASE, NAMESPACE = "lg", "ml"
FULL = f"{RELEASE}-loragate"

Manifest = dict[str, Any]
Objects = dict[tuple[str, str], Manifest]


@contextmanager
def loaded_chart() -> Iterator[Any]:
    import helm_python as helm

    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None = None) -> Objects:
    """Rendered objects keyed by (kind, name); NOTES.txt under ("NOTES", "")."""
    out: Objects = {}
    for path, text in chart.render(values or {}, name=RELEASE, namespace=NAMESPACE).items():
        if path.endswith("NOTES.txt"):
            out[("NOTES", "")] = {"text": text}
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in out, f"{key} rendered twice"
                out[key] = doc
    return out


def pod_spec(objs: Objects, deployment: str) -> Manifest:
    spec: Manifest = objs[("Deployment", deployment)]["spec"]["template"]["spec"]
    return spec


def container(objs: Objects, deployment: str, name: str) -> Manifest:
    """A container of a Deployment's pod, init containers (native sidecars) included."""
    pod = pod_spec(objs, deployment)
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def env_of(c: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]
