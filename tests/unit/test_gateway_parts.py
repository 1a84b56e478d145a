"""Pure parts of the gateway: settings sources, error envelopes, refusal reasons, queue parsing, SSE side-reading,
CLI overrides. (What the request path does with failing engines: test_gateway_dataplane.py.)"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from adapters_registry.registry import open_registry
from gateway.adapters import AdapterManager, no_engine_error, refusal_reason
from gateway.cli import overrides
from gateway.errors import AdapterRefused, ModelNotFound, Unavailable, UpstreamError, upstream_envelope
from gateway.proxy import failure_verdict, usage_of
from gateway.routing import Policy
from gateway.settings import UpstreamSettings, load_settings
from gateway.sse import StreamScan, with_usage
from gateway.supervisor import Engine, backoff_s, read_engine_file
from gateway.upstream import Upstream


def test_settings_precedence_flags_over_env_over_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("base: tiny\nport: 7000\nengines:\n  count: 2\n  max_loras: 3\nrouting:\n  max_queue: 9\n")
    monkeypatch.setenv("LORAGATE_ENGINES__MAX_LORAS", "5")
    monkeypatch.setenv("LORAGATE_PORT", "7100")
    settings = load_settings(config, engines={"count": 4}, port=None)
    assert (settings.engines.count, settings.engines.max_loras, settings.port) == (4, 5, 7100)
    assert (settings.routing.max_queue, settings.engines.slots) == (9, 5)


def test_settings_refuse_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such config file"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ValidationError, match="managed mode needs `base`"):
        load_settings()
    with pytest.raises(ValidationError, match="external mode needs"):
        load_settings(mode="external", base_name="tiny")
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        load_settings(base="tiny", engines={"count": 0})
    with pytest.raises(ValidationError, match="Extra inputs"):
        load_settings(base="tiny", engine_count=2)


def test_cli_flags_become_nested_overrides() -> None:
    args = SimpleNamespace(
        base="tiny",
        base_name=None,
        host=None,
        port=8001,
        metrics_port=9101,
        registry="/r",
        engine_count=2,
        max_loras=3,
        max_cpu_loras=None,
        max_registered_loras=None,
        max_lora_rank=None,
        max_model_len=None,
        tool_call_parser=None,
        enable_auto_tool_choice=None,
        chat_template=None,
        workers=4,
        pin=["a:prod"],
        prewarm=["team-*"],
        engine_url=[],
        discovery_dns=None,
        discovery_port=None,
        discovery_file=None,
    )
    settings = load_settings(**overrides(args))  # type: ignore[arg-type]
    assert (settings.mode, settings.engines.count, settings.engines.max_loras) == ("managed", 2, 3)
    assert settings.adapters.pinned == ["a:prod"] and settings.registry == "/r"
    assert settings.adapters.prewarm == ["team-*"]
    assert (settings.port, settings.metrics_port, settings.workers) == (8001, 9101, 4)
    args.engine_url, args.base, args.base_name = ["http://e:8000"], None, "tiny"
    external = load_settings(**overrides(args))  # type: ignore[arg-type]
    assert (external.mode, external.external.urls, external.external.max_loras) == ("external", ["http://e:8000"], 3)


def test_error_envelopes() -> None:
    assert ModelNotFound("x").envelope() == {
        "error": {
            "message": "The model 'x' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    busy = Unavailable("busy", retry_after_s=3, code="engines_busy")
    assert (busy.status, busy.headers(), busy.envelope()["error"]["code"]) == (
        503,
        {"retry-after": "3"},
        "engines_busy",
    )
    vllm = {"error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}}
    assert UpstreamError(400, json.dumps(vllm).encode()).envelope() == {"error": {**vllm["error"], "code": "400"}}
    assert upstream_envelope(502, b"Bad Gateway")["error"] == {
        "message": "Bad Gateway",
        "type": "upstream_error",
        "param": None,
        "code": "502",
    }
    assert upstream_envelope(500, b"")["error"]["message"] == "engine answered 500"


def manifest(**kw: Any) -> Any:
    fields = {"ref": "a@1", "serving": "lora", "serving_reason": None, "base": "tiny", "r": 8}
    return SimpleNamespace(**{**fields, **kw})


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, None),
        ({"r": 16}, None),
        ({"r": 32}, "adapter a@1 has rank 32, above the engines' max_lora_rank 16"),
        ({"base": "other"}, "adapter a@1 was trained on base 'other', but this gateway serves 'tiny'"),
        (
            {"serving": "merge-only", "serving_reason": "DoRA adapters are not supported by vLLM"},
            "adapter a@1 cannot be served as a LoRA: DoRA adapters are not supported by vLLM. "
            "Merge it into its base with `loragate merge a@1`",
        ),
    ],
)
def test_refusal_reason(kw: dict[str, Any], expected: str | None) -> None:
    reason = refusal_reason(manifest(**kw), "tiny", 16)
    assert reason == expected if expected is None else reason is not None and reason.startswith(expected)


def test_backoff_and_engine_file(tmp_path: Path) -> None:
    assert [backoff_s(n, 2.0, 10.0) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    listing = tmp_path / "engines.txt"
    listing.write_text("# engines\nhttp://a:8000/\n\nhttp://b:8000  # second\n")
    assert read_engine_file(listing) == {"http://a:8000", "http://b:8000"}


def test_no_engine_error_tells_starting_from_given_up() -> None:
    def engine(id: str, gave_up: bool, error: str | None = None) -> Engine:
        return Engine(id, f"http://{id}", 2, 2, 16, gave_up=gave_up, last_error=error)

    assert no_engine_error([]).code == "engines_not_ready"
    starting = no_engine_error([engine("e0", False), engine("e1", True, "vLLM exited with status 1")])
    assert (starting.code, starting.retry_after_s) == ("engines_not_ready", 5)
    down = no_engine_error([engine("e0", True, "vLLM exited with status 2"), engine("e1", True)])
    assert (down.code, down.retry_after_s) == ("engines_down", 60)
    assert "e0: vLLM exited with status 2; e1: down" in down.message


def test_stream_scan_reads_usage_and_text_across_chunk_boundaries() -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    side = StreamScan(strip_usage=False, collect_text=True)
    relayed = b"".join(side.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)) + side.rest()
    assert relayed == stream  # nothing dropped or reordered, whatever the cut points
    assert side.usage == {"prompt_tokens": 4, "completion_tokens": 2} and side.done and side.events == 4
    assert side.answer("chat")["choices"] == [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello"}}
    ]
    usage_only = StreamScan(strip_usage=False, collect_text=False)
    assert usage_only.feed(stream) == stream
    assert usage_only.usage == {"prompt_tokens": 4, "completion_tokens": 2} and usage_only.texts == {}
    unfinished = StreamScan(strip_usage=False, collect_text=False)
    assert unfinished.feed(b"data: {}\n\ndata: {") == b"data: {}\n\n"  # an incomplete event waits for its end
    assert (unfinished.rest(), unfinished.done) == (b"data: {", False)


def test_the_responses_api_stream_gives_its_usage_from_the_final_event() -> None:
    final = {"type": "response.completed", "response": {"usage": {"input_tokens": 9, "output_tokens": 3}}}
    stream = b"event: response.created\ndata: {}\n\nevent: response.completed\ndata: " + json.dumps(final).encode()
    scan = StreamScan(strip_usage=False, collect_text=False)
    assert scan.feed(stream + b"\n\n") == stream + b"\n\n"
    assert (scan.usage, scan.done) == ({"input_tokens": 9, "output_tokens": 3}, True)


@pytest.mark.parametrize(
    ("body", "counts"),
    [
        (b'{"id":"x","choices":[{"text":"\\"usage\\": 1"}],"usage":{"prompt_tokens":3,"completion_tokens":4}}', (3, 4)),
        (b'{"id":"x","usage": {"input_tokens": 2, "output_tokens": 5, "total_tokens": 7}}', (2, 5)),
        (b'{"id":"x"}', (None, None)),
        (b'{"usage": "lots"}', (None, None)),
        (b"not json", (None, None)),
    ],
)
def test_usage_of_a_whole_answer_is_read_without_parsing_it(body: bytes, counts: tuple[int, int]) -> None:
    assert usage_of(body) == counts


@pytest.mark.parametrize(
    ("exc", "another_ready", "expected"),
    [
        (
            aiohttp.ClientConnectorError(SimpleNamespace(ssl=None, host="h", port=1), OSError(111, "refused")),
            True,
            (True, False, True),
        ),
        (aiohttp.ConnectionTimeoutError("slow accept"), False, (True, False, True)),
        (aiohttp.ServerDisconnectedError(), True, (False, True, True)),
        (aiohttp.ClientOSError(104, "reset"), False, (False, True, False)),
    ],
)
def test_failure_verdict(exc: Exception, another_ready: bool, expected: tuple[bool, bool, bool]) -> None:
    assert tuple(failure_verdict(exc, another_ready)) == expected


def test_adapter_refused_is_a_400() -> None:
    assert (AdapterRefused("no").status, AdapterRefused("no").code) == (400, "adapter_refused")


def test_usage_requested_for_metrics_only_is_kept_from_the_client() -> None:
    body, strip = with_usage({"model": "m", "stream": True})
    assert (body["stream_options"], strip) == ({"include_usage": True}, True)
    asked = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    assert with_usage(asked) == (asked, False)
    stream = (
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
    )
    stripper = StreamScan(strip_usage=True, collect_text=False)
    relayed = b"".join(stripper.feed(stream[i : i + 9]) for i in range(0, len(stream), 9)) + stripper.rest()
    assert relayed == b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\ndata: [DONE]\n\n'
    assert stripper.usage == {"prompt_tokens": 3, "completion_tokens": 1}


def test_serve_refuses_an_unknown_base_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loragate.cli import main

    assert main(["serve", "--base", "no-such-base", "--registry", str(tmp_path / "reg")]) == 2
    assert capsys.readouterr().err == "error: base 'no-such-base' is neither a directory nor a registered base\n"
    assert main(["serve", "--base", "tiny", "--engines", "0", "--registry", str(tmp_path / "reg")]) == 2
    assert "invalid settings (engines.count): Input should be greater than or equal to 1" in capsys.readouterr().err


def test_serve_refuses_a_prewarm_reference_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loragate.cli import main

    common = ["serve", "--engine-url", "http://127.0.0.1:9", "--base-name", "tiny", "--registry", str(tmp_path / "r")]
    assert main([*common, "--prewarm", "team-*", "--prewarm", "no-such:prod"]) == 2
    assert capsys.readouterr().err == "error: no-such:prod: 'no-such' has no alias 'prod'\n"


def test_serve_refuses_a_metrics_port_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loragate.cli import main

    common = ["serve", "--engine-url", "http://127.0.0.1:9", "--base-name", "tiny", "--registry", str(tmp_path / "r")]
    assert main([*common, "--port", "8123", "--metrics-port", "8123"]) == 2
    assert "`metrics_port` 8123 is the API port: give /metrics a port of its own" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([*common, "--metrics-port", str(port)]) == 2
    assert capsys.readouterr().err == f"error: cannot serve /metrics on 127.0.0.1:{port}: Address already in use\n"


def test_adapters_are_bound_to_the_registry_base_not_the_served_name(tmp_path: Path) -> None:
    from gateway.base_model import bound_base_name
    from gateway.settings import load_settings

    registry_base = load_settings(base="tiny", base_name="public-name", registry=str(tmp_path))
    assert bound_base_name(registry_base, "public-name") == "tiny"
    model_dir = load_settings(base=str(tmp_path), registry=str(tmp_path))
    assert bound_base_name(model_dir, tmp_path.name) == tmp_path.name
    external = load_settings(
        mode="external", base_name="served", registry=str(tmp_path), external={"urls": ["http://127.0.0.1:1"]}
    )
    assert bound_base_name(external, "served") == "served"


def test_without_materializing_the_gateway_names_the_folder_the_engines_sidecar_fills(
    registry_template: Path, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    shutil.copytree(registry_template, tmp_path / "registry")
    registry = open_registry(tmp_path / "registry", cache_dir=tmp_path / "gateway-cache")
    manifest = registry.push(adapter_dirs[0], "named-only", "tiny")

    async def path_of(materialize: bool) -> Path:
        manager = AdapterManager(
            registry,
            Upstream(UpstreamSettings()),
            {},
            base_name="tiny",
            policy=Policy(),
            load_timeout_s=1,
            materialize=materialize,
        )
        return await manager._local_path(manifest)

    named = asyncio.run(path_of(materialize=False))
    assert named == registry.materialized_path(manifest)
    assert not named.exists()  # nothing downloaded or assembled on the gateway's disk
    assert asyncio.run(path_of(materialize=True)) == named  # the folder a sync pass (or the gateway) assembles
    assert {p.name for p in named.iterdir()} == set(manifest.files)


def test_registered_adapters_default_to_the_cpu_slots_and_never_fall_below_them(tmp_path: Path) -> None:
    common: dict[str, Any] = {"mode": "external", "base_name": "tiny", "registry": str(tmp_path)}
    ext = {"urls": ["http://e"], "max_loras": 2, "max_cpu_loras": 4}
    assert load_settings(**common, external=ext).external.slots == 4
    assert load_settings(**common, external={**ext, "max_registered_loras": 16}).external.slots == 16
    assert load_settings(**common, external={**ext, "max_registered_loras": 2}).external.slots == 4
    managed = load_settings(base="tiny", registry=str(tmp_path), engines={"max_loras": 2, "max_registered_loras": 9})
    assert (managed.engines.cpu_slots, managed.engines.slots) == (2, 9)
    args = ["serve", "--engine-url", "http://e", "--max-cpu-loras", "4", "--max-registered-loras", "32"]
    from loragate.cli import make_parser

    external = overrides(make_parser().parse_args(args))["external"]
    assert (external["max_cpu_loras"], external["max_registered_loras"]) == (4, 32)


@pytest.mark.parametrize(("slots", "cpu_slots", "order"), [(4, 4, [0, 1, 2]), (6, 2, [2, 1, 0])])
def test_prewarm_loads_the_most_wanted_last_when_more_are_registered_than_vllm_caches(
    registry_template: Path, adapter_dirs: list[Path], tmp_path: Path, slots: int, cpu_slots: int, order: list[int]
) -> None:
    """vLLM's CPU cache keeps the adapters loaded last (LRU): with more registered than it holds, the prewarm
    loads its choice (the most wanted first) in reverse, so the most wanted are the ones cached."""
    shutil.copytree(registry_template, tmp_path / "registry")
    registry = open_registry(tmp_path / "registry")
    wanted = [registry.push(adapter_dirs[i % 2], f"w{i}", "tiny") for i in range(3)]
    engine = Engine("e0", "http://e0", 2, slots, 16, cpu_slots=cpu_slots)
    manager = AdapterManager(
        registry, Upstream(UpstreamSettings()), {"e0": engine}, base_name="tiny", policy=Policy(), load_timeout_s=1
    )
    manager.ledger.add_engine("e0", slots)
    loaded: list[str] = []

    async def load(engine: Engine, manifest: Any, *, evict: bool = True) -> bool:  # the engine's side is tested
        assert not evict  # in test_deploy_multi_gateway; a prewarm never evicts
        loaded.append(manifest.name)
        manager.ledger.record_loaded(engine.id, manifest.engine_name)
        return True

    manager.ensure_loaded = load  # type: ignore[method-assign]
    assert asyncio.run(manager.prewarm(engine, wanted)) == [f"w{i}@1" for i in order]
    assert loaded == [f"w{i}" for i in order]
