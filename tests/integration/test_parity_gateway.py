"""The parity gate on the real engine: a gateway with one vLLM CPU engine on the base the shipped tiny recipe trains
(the session's `tiny_lora_run`, published with its held-out test rows as golden prompts). The trained adapter
passes the gate against a random one, an adapter of random noise is refused against the trained one with the
figures in the message, and --force lets it through, audited; the CLI makes the same moves through the gateway."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters_registry.registry import open_registry
from gateway.app import create_app
from gateway.engine_process import free_port
from gateway.settings import load_settings
from loragate.cli import main as loragate_main
from tests.fixtures.gateway import GatewayUnderTest, served
from tests.fixtures.training import PUBLISHED_NAME, TrainedRun
from training.tiny_model import build_random_adapter

pytestmark = pytest.mark.integration

OUTCOMES = ("skipped", "passed", "refused", "forced")
NAME = PUBLISHED_NAME  # tiny-topic@1: the trained adapter, with the run's test rows as its golden prompts


@pytest.fixture(scope="module")
def trained_gateway(
    tiny_lora_run: TrainedRun, training_registry: Path, engine_logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayUnderTest]:
    root = tmp_path_factory.mktemp("parity") / "registry"
    shutil.copytree(training_registry, root)  # the session's registry stays as the training tests expect it
    registry = open_registry(root)
    port = free_port()
    settings = load_settings(
        base="tiny-lm",
        port=port,
        registry=str(root),
        engines={"count": 1, "max_loras": 2, "max_cpu_loras": 4, "log_dir": engine_logs},
        health_interval_s=1.0,
        drain_grace_s=5.0,
    )
    app = create_app(settings)
    with served(app, port, "parity-gateway") as url:
        handle = GatewayUnderTest(url, app, registry, settings)
        handle.wait_engines_healthy()
        yield handle


def promote(gw: GatewayUnderTest, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/admin/aliases/promote", json=body, timeout=300)


def last_promote(gw: GatewayUnderTest) -> dict[str, Any]:
    """The newest `registry.promote` audit line (each promote through the admin API writes one)."""
    entries: list[dict[str, Any]] = [e for e in gw.state.security.audit.read() if e["action"] == "registry.promote"]
    return entries[-1]


def test_the_trained_adapter_passes_and_a_noise_adapter_is_refused_with_the_figures(
    trained_gateway: GatewayUnderTest, tiny_lora_run: TrainedRun, tmp_path: Path
) -> None:
    gw, reg = trained_gateway, trained_gateway.registry
    trained = reg.resolve(f"{NAME}@1")
    assert trained.golden is not None and trained.golden.source == "training test split"
    assert trained.golden.rows == trained.golden.references == tiny_lora_run.metrics["adapter"]["rows"]
    base = Path(tiny_lora_run.info["base_path"])
    first = reg.push(build_random_adapter(base, tmp_path / "first", seed=3, r=16), NAME, "tiny-lm")
    noise = reg.push(build_random_adapter(base, tmp_path / "noise", seed=4, r=16), NAME, "tiny-lm")

    # a first attempt (a random adapter, no golden prompts) serves prod; nothing to compare with yet
    started = promote(gw, ref=first.ref, alias="prod")
    assert started.status_code == 200, started.text
    assert started.json()["parity"] == {
        "skipped": f"no golden prompts: neither {first.ref} nor the alias's version has any"
    }

    # the trained adapter: its golden prompts on it and on the first attempt; it agrees with the references far more
    passed = promote(gw, ref=trained.ref, alias="prod", weight=10)
    assert passed.status_code == 200, passed.text
    parity = passed.json()["parity"]
    assert parity["passed"] is True and parity["golden"] == f"{trained.ref} (training test split)"
    assert parity["candidate"]["ref"] == trained.ref and parity["current"]["ref"] == first.ref
    assert parity["candidate"]["agreement"] >= 0.7 > parity["current"]["agreement"]
    assert parity["candidate"]["failed"] == 0 and parity["candidate"]["prompts"] == trained.golden.rows
    assert last_promote(gw)["details"]["parity"]["candidate"] == parity["candidate"]
    completed = promote(gw, ref=trained.ref, alias="prod", weight=100)  # the gate runs again, and passes
    assert completed.status_code == 200 and completed.json()["parity"]["passed"] is True
    assert reg.alias_records(NAME)["prod"].version == trained.version

    # the noise adapter, judged on the trained one's golden prompts: refused, one line with the figures, nothing moved
    before = reg.alias_records(NAME)["prod"]
    refused = promote(gw, ref=noise.ref, alias="prod", weight=10)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "parity_gate_failed" and error["param"] == "ref"
    message = error["message"]
    assert "\n" not in message and message.startswith(f"parity gate: {noise.ref} may not get traffic on {NAME}:prod:")
    trained_agreement = completed.json()["parity"]["candidate"]["agreement"]
    assert f"against {trained.ref}'s {trained_agreement:.0%}" in message
    assert f"from {trained.ref} (training test split); nothing moved" in message
    assert reg.alias_records(NAME)["prod"] == before
    refusal = last_promote(gw)
    assert refusal["result"] == "error" and refusal["error"] == message
    assert refusal["details"]["parity"]["passed"] is False
    assert refusal["details"]["parity"]["candidate"]["agreement"] < trained_agreement - 0.05
    engines = gw.engines()
    assert all(noise.engine_name not in [r["engine_name"] for r in e["resident"]] for e in engines)  # unloaded

    # --force: through, and the audit line says the gate was skipped
    forced = promote(gw, ref=noise.ref, alias="prod", weight=10, force=True)
    assert forced.status_code == 200, forced.text
    assert forced.json()["parity"] == {"forced": True}
    assert reg.alias_records(NAME)["prod"].split is not None
    assert last_promote(gw)["details"]["parity"] == {"forced": True}
    assert promote(gw, ref=noise.ref, alias="prod", weight=0).status_code == 200  # stopping needs no gate
    counts = {o: gw.metric("loragate_parity_gate_runs_total", alias=f"{NAME}:prod", outcome=o) for o in OUTCOMES}
    assert counts == {"skipped": 1, "passed": 2, "refused": 1, "forced": 1}


def test_golden_prompts_without_references_compare_with_the_current_version_and_the_cli_goes_through_the_gateway(
    trained_gateway: GatewayUnderTest, tiny_lora_run: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows without a reference are judged against the alias's version's answers: the same weights pushed again
    (another version, one changed byte of metadata) agree on all of them, a random adapter does not. The CLI, given
    --gateway, makes the same moves through the admin API and prints the gateway's one line when it refuses."""
    gw, reg = trained_gateway, trained_gateway.registry
    base = Path(tiny_lora_run.info["base_path"])
    prompts = [
        {"messages": [{"role": "user", "content": f"Topic of: the {w} was great"}]} for w in ("game", "vote", "film")
    ]
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(json.dumps(row) + "\n" for row in prompts))
    same = tmp_path / "same"
    shutil.copytree(tiny_lora_run.adapter_dir, same)
    (same / "README.md").write_text("the trained adapter again\n")
    name = "topic-b"
    current = reg.push(tiny_lora_run.adapter_dir, name, "tiny-lm")
    again = reg.push(same, name, "tiny-lm")
    other = reg.push(build_random_adapter(base, tmp_path / "other", seed=9, r=16), name, "tiny-lm")
    reg.promote(current.ref, "live")

    args = ["registry", "promote", "--alias", "live", "--gateway", gw.url, "--golden", str(golden)]
    args += ["--golden-max-tokens", "8", "--weight", "20"]
    capsys.readouterr()
    assert loragate_main([*args[:2], again.ref, *args[2:]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{name}:live -> {current.ref} (80%), {again.ref} (20%)"
    assert out[1] == (
        f"parity gate passed: {again.ref} agreement 100%; {current.ref} agreement 100% on 3 golden prompts from "
        "the request"
    )
    reg.promote(again.ref, "live", weight=0)

    assert loragate_main([*args[:2], other.ref, *args[2:]]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: the gateway answered 409: parity gate: {other.ref} may not get traffic on ")
    assert f"against {current.ref}'s 100%" in error and "3 golden prompts from the request" in error
    assert reg.alias_records(name)["live"].split is None

    # malformed golden prompts, thresholds and fields: one line, 400, nothing moved
    for body, needle in (
        ({"golden": [{"messages": []}]}, "golden row 1: `messages` must be a non-empty list"),
        ({"golden": []}, "golden prompts are a non-empty list of rows"),
        ({"gate": {"max_agreement_drop": 2}}, "a parity gate's max agreement drop is a fraction, 0-1, not 2"),
        ({"gate": {"max_drop": 0.1}}, "max_drop"),
    ):
        bad = promote(gw, ref=other.ref, alias="live", weight=10, **body)
        assert bad.status_code == 400, bad.text
        assert needle in bad.json()["error"]["message"] and "\n" not in bad.json()["error"]["message"]
    assert reg.alias_records(name)["live"].split is None and reg.alias_records(name)["live"].version == 1
