"""The Helm chart, rendered and linted by Helm's own Go SDK (helm-python-sdk): schema, cross-field checks, registry,
conventions. The other test_helm_*.py files cover the engines, the gateway, and scaling and monitoring."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from adapters_registry.registry import Registry
from tests.unit.helm_render import CHART, FULL, NAMESPACE, RELEASE, container, env_of, render

helm = pytest.importorskip("helm_python")


# -- lint and schema -------------------------------------------------------------------------------------------------


GOOD_VALUES: list[dict[str, Any]] = [
    {},
    {"registry": {"mode": "pvc", "pvc": {"existingClaim": "shared-registry"}}},
    {"registry": {"mode": "s3", "s3": {"existingSecret": "s3-creds", "endpoint": "http://minio.minio.svc:9000"}}},
    {"engine": {"device": "cpu", "model": "/models/tiny", "modelVolume": {"existingClaim": "models"}}},
    # An autoscaler reads the gateways' metrics from Prometheus: it needs the ServiceMonitor (test_helm_scaling.py).
    {"engine": {"autoscaling": {"keda": {"enabled": True}}}, "metrics": {"serviceMonitor": {"enabled": True}}},
    {
        "engine": {"autoscaling": {"hpa": {"enabled": True}}},
        "gateway": {"autoscaling": {"enabled": False}},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    {"engine": {"image": {"digest": "sha256:" + "a" * 64}}, "metrics": {"serviceMonitor": {"enabled": True}}},
    {"engine": {"gpu": {"count": 4}, "tensorParallelSize": 4, "lora": {"maxLoraRank": 64}}},
    {"registry": {"mode": "pvc", "gc": {"enabled": True, "minAge": "2d", "schedule": "*/30 * * * *"}}},
    {"gateway": {"httpRoute": {"enabled": True, "parentRefs": [{"name": "public"}], "timeouts": {"request": "0s"}}}},
    {"gateway": {"ingress": {"enabled": True, "className": "nginx", "hosts": [{"host": "llm.example.com"}]}}},
    {"engine": {"model": "/models/m", "modelVolume": {"registryBase": "m"}, "lora": {"enabled": False}}},
    {
        "engine": {
            "podAntiAffinity": "hard",
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
            ],
        }
    },
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
    ({"gateway": {"podAntiAffinity": "always"}}, "at '/gateway/podAntiAffinity': value must be one of '', 'soft'"),
    ({"gateway": {"httpRoute": {"timeouts": {"request": "forever"}}}}, "at '/gateway/httpRoute/timeouts/request'"),
    ({"engine": {"extraVolumeMounts": [{"name": "m"}]}}, "at '/engine/extraVolumeMounts/0': missing property"),
    ({"engine": {"autoscaling": {"minReplicas": -1}}}, "at '/engine/autoscaling/minReplicas': minimum: got -1"),
    ({"engine": {"modelVolume": {"registryBase": "a/b"}}}, "at '/engine/modelVolume/registryBase'"),
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
    chart: Any, registry: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
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

    # The rendered arguments are ones the real CLI accepts: here against a fresh local registry (the tiny base only).
    monkeypatch.setenv("LORAGATE_REGISTRY", registry.location)
    from loragate.cli import main as loragate_main

    assert loragate_main(gc["args"]) == 0
    assert "deleted 0 blob(s)" in capsys.readouterr().out


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
        for c in o["spec"]["template"]["spec"]["containers"] + o["spec"]["template"]["spec"].get("initContainers", [])
    ]
    assert sorted(images) == sorted(
        ["ghcr.io/loragate/gateway:0.1.0", "ghcr.io/loragate/gateway:0.1.0", f"ghcr.io/loragate/engine@{digest}"]
    )


def test_notes_say_how_to_call_it(chart: Any) -> None:
    text = render(chart)[("NOTES", "")]["text"]
    assert 'OpenAI(base_url="http://localhost:8080/v1"' in text
    assert 'model="<adapter>"' in text
    assert f"port-forward svc/{FULL}-gateway 8080:80" in text
