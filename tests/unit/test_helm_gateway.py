"""The gateway pods as rendered: external mode, probes, the settings its env builds, disruption budgets, and the
routes in front of it (HTTPRoute, Ingress)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.helm_render import FULL, NAMESPACE, container, env_of, render

pytest.importorskip("helm_python")


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


# -- routes in front of it -------------------------------------------------------------------------------------------


def test_an_httproute_sends_the_api_port_to_the_gateway_service(chart: Any) -> None:
    assert not any(kind == "HTTPRoute" for kind, _ in render(chart))
    route = {
        "enabled": True,
        "parentRefs": [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}],
        "hostnames": ["llm.example.com"],
        "timeouts": {"request": "0s"},
    }
    objs = render(chart, {"gateway": {"httpRoute": route}})
    http_route = objs[("HTTPRoute", f"{FULL}-gateway")]
    assert http_route["apiVersion"] == "gateway.networking.k8s.io/v1"
    spec = http_route["spec"]
    assert spec["parentRefs"] == route["parentRefs"]
    assert spec["hostnames"] == ["llm.example.com"]
    [rule] = spec["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["timeouts"] == {"request": "0s"}
    # The backend is the gateway Service's API port: never the metrics port.
    service = objs[("Service", f"{FULL}-gateway")]["spec"]
    [backend] = rule["backendRefs"]
    [api_port] = [p for p in service["ports"] if p["port"] == backend["port"]]
    assert (backend["name"], api_port["name"]) == (f"{FULL}-gateway", "http")
    assert api_port["targetPort"] == "http"


def test_an_ingress_sends_the_api_port_to_the_gateway_service(chart: Any) -> None:
    ingress = {
        "enabled": True,
        "className": "nginx",
        "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600"},
        "hosts": [{"host": "llm.example.com", "paths": ["/v1"]}, {"host": "api.example.com"}],
        "tls": [{"hosts": ["llm.example.com"], "secretName": "llm-tls"}],
    }
    objs = render(chart, {"gateway": {"ingress": ingress}})
    obj = objs[("Ingress", f"{FULL}-gateway")]
    assert obj["metadata"]["annotations"] == ingress["annotations"]
    spec = obj["spec"]
    assert (spec["ingressClassName"], spec["tls"]) == ("nginx", ingress["tls"])
    backend = {"service": {"name": f"{FULL}-gateway", "port": {"name": "http"}}}
    assert spec["rules"] == [
        {"host": "llm.example.com", "http": {"paths": [{"path": "/v1", "pathType": "Prefix", "backend": backend}]}},
        {"host": "api.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}},
    ]
    catch_all = render(chart, {"gateway": {"ingress": {"enabled": True}}})[("Ingress", f"{FULL}-gateway")]["spec"]
    assert catch_all == {"defaultBackend": backend}


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ({"httpRoute": {"enabled": True}}, "gateway.httpRoute.parentRefs: name the Gateway (Gateway API)"),
        (
            {"httpRoute": {"enabled": True, "parentRefs": [{"name": "public"}]}, "metricsPort": None},
            "gateway.httpRoute would publish /metrics without a key (gateway.metricsPort is null and "
            "gateway.security.metricsAuth is none)",
        ),
        (
            {"ingress": {"enabled": True}, "metricsPort": None},
            "gateway.ingress would publish /metrics without a key",
        ),
    ],
    ids=["no-parent", "route-publishes-metrics", "ingress-publishes-metrics"],
)
def test_route_mistakes_fail_the_render_in_one_line(chart: Any, gateway: dict[str, Any], message: str) -> None:
    helm = pytest.importorskip("helm_python")
    with pytest.raises(helm.HelmRenderError) as info:
        render(chart, {"gateway": gateway})
    assert message in str(info.value)
    # With a key required on /metrics, the API port may be public.
    if "metricsPort" in gateway:
        render(chart, {"gateway": gateway | {"security": {"metricsAuth": "admin"}}})
