"""Pure parts of the gateway: settings sources, error envelopes, refusal reasons, queue parsing, SSE side-reading,
CLI overrides, and the retry of a request whose engine dropped it before answering (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from adapters_registry.registry import open_registry
from gateway.adapters import AdapterManager, Target, no_engine_error, refusal_reason
from gateway.cli import overrides
from gateway.errors import AdapterRefused, ModelNotFound, Unavailable, UpstreamError, upstream_envelope
from gateway.proxy import (
    CallRecord,
    Proxy,
    SSEAccumulator,
    UpstreamStreamResponse,
    UsageStripper,
    failure_verdict,
    with_usage,
)
from gateway.routing import Policy
from gateway.settings import load_settings
from gateway.supervisor import Engine, Supervisor, backoff_s, parse_queue, read_engine_file


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
        max_lora_rank=None,
        pin=["a:prod"],
        engine_url=[],
        discovery_dns=None,
        discovery_port=None,
        discovery_file=None,
    )
    settings = load_settings(**overrides(args))  # type: ignore[arg-type]
    assert (settings.mode, settings.engines.count, settings.engines.max_loras) == ("managed", 2, 3)
    assert settings.adapters.pinned == ["a:prod"] and settings.registry == "/r"
    assert (settings.port, settings.metrics_port) == (8001, 9101)
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
    assert UpstreamError(400, json.dumps(vllm).encode()).envelope() == vllm
    assert upstream_envelope(502, b"Bad Gateway")["error"] == {
        "message": "Bad Gateway",
        "type": "upstream_error",
        "param": None,
        "code": 502,
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


def test_parse_queue_and_backoff_and_engine_file(tmp_path: Path) -> None:
    text = (
        "# HELP vllm:num_requests_waiting x\n"
        'vllm:num_requests_running{engine="0",model_name="tiny"} 3.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="tiny"} 1.0\n'
        "vllm:num_requests_waiting_total 99\n"
    )
    assert parse_queue(text) == (3, 3)
    assert parse_queue("") == (0, 0)
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


def test_sse_accumulator_reads_usage_and_text_across_chunk_boundaries() -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    side = SSEAccumulator(collect_text=True)
    head, sentinel = stream[: -len(b"data: [DONE]\n\n")], b"data: [DONE]\n\n"
    for i in range(0, len(head), 7):
        side.feed(head[i : i + 7])
    assert not side.done
    side.feed(sentinel)
    assert side.done
    assert side.usage == {"prompt_tokens": 4, "completion_tokens": 2}
    assert side.answer("chat")["choices"] == [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello"}}
    ]
    usage_only = SSEAccumulator(collect_text=False)
    usage_only.feed(stream)
    assert usage_only.usage == {"prompt_tokens": 4, "completion_tokens": 2} and usage_only.texts == {}


@pytest.mark.parametrize(
    ("exc", "another_ready", "expected"),
    [
        (httpx.ConnectError("refused"), True, (True, False, True)),
        (httpx.ConnectTimeout("slow accept"), False, (True, False, True)),
        (httpx.RemoteProtocolError("closed"), True, (False, True, True)),
        (httpx.ReadError("reset"), False, (False, True, False)),
    ],
)
def test_failure_verdict(exc: Exception, another_ready: bool, expected: tuple[bool, bool, bool]) -> None:
    assert tuple(failure_verdict(exc, another_ready)) == expected


FAILURES: dict[str, list[Exception]] = {}  # host -> what its next requests raise, in order (then it answers)


def failing_engines(request: httpx.Request) -> httpx.Response:
    pending = FAILURES.get(request.url.host, [])
    if pending:
        raise pending.pop(0)
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()
    return httpx.Response(200, headers={"content-type": "application/json"}, content=_chunks(body))


async def forward_once(hosts: list[str], seen: list[str]) -> tuple[Any, list[CallRecord], Supervisor]:
    """One completion through a Proxy over `hosts` (the first one is the least loaded, so it is tried first)."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return failing_engines(request)

    settings = load_settings(mode="external", base_name="tiny", external={"urls": [f"http://{h}" for h in hosts]})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        engines = {h: Engine(h, f"http://{h}", 2, 2, 16, healthy=True, inflight=i) for i, h in enumerate(hosts)}
        policy = Policy()  # type: ignore[arg-type]
        adapters = AdapterManager(None, client, engines, base_name="tiny", policy=policy, load_timeout_s=1)
        for h in hosts:
            adapters.ledger.add_engine(h, 2)
        supervisor = Supervisor(
            settings, client, model_path=None, served_name="tiny", on_ready=_noop, on_down=_noop, on_tick=_noop
        )
        supervisor.engines = engines
        supervisor._wake = {h: asyncio.Event() for h in hosts}
        records: list[CallRecord] = []
        proxy = Proxy(client, supervisor, adapters, [], records.append)
        try:
            response: Any = await proxy.forward(
                "/v1/completions", "completions", {"model": "tiny", "prompt": "x"}, Target("tiny", None, "tiny"), "r1"
            )
        except Exception as exc:
            response = exc
        return response, records, supervisor


def test_an_engine_that_refuses_connections_is_dropped_and_the_request_retried_elsewhere() -> None:
    seen: list[str] = []
    FAILURES["gone"] = [httpx.ConnectError("All connection attempts failed")]
    response, records, supervisor = asyncio.run(forward_once(["gone", "works"], seen))
    assert getattr(response, "status_code", None) == 200
    assert seen == ["gone", "works"]
    assert records[-1].engine == "works" and records[-1].completion_tokens == 2
    engines = supervisor.engines
    assert (engines["works"].inflight, engines["gone"].inflight, engines["gone"].healthy) == (1, 0, False)


def test_a_connection_dropped_before_the_answer_is_retried_without_condemning_the_engine() -> None:
    # Two engines: the retry goes to the other one; the first is probed at once but stays in rotation.
    seen: list[str] = []
    FAILURES["dies"] = [httpx.RemoteProtocolError("Server disconnected without sending a response.")]
    response, _, supervisor = asyncio.run(forward_once(["dies", "works"], seen))
    assert getattr(response, "status_code", None) == 200 and seen == ["dies", "works"]
    assert supervisor.engines["dies"].healthy and supervisor._wake["dies"].is_set()

    # One engine whose idle connection was closed under the gateway (keep-alive race): a fresh connection to the
    # same engine answers, instead of a 503 until the next health check.
    seen.clear()
    FAILURES["only"] = [httpx.ReadError("connection reset")]
    response, records, supervisor = asyncio.run(forward_once(["only"], seen))
    assert getattr(response, "status_code", None) == 200 and seen == ["only", "only"]
    assert records[-1].status == 200 and supervisor.engines["only"].healthy

    # Both attempts dropped: a 503, the engine still probed rather than condemned.
    seen.clear()
    FAILURES["only"] = [httpx.ReadError("reset"), httpx.ReadError("reset again")]
    failed, records, supervisor = asyncio.run(forward_once(["only"], seen))
    assert isinstance(failed, Unavailable) and "the retry failed too" in failed.message
    assert seen == ["only", "only"] and records[-1].status == 503


def test_the_gateways_own_full_pool_is_a_busy_503_not_an_engine_failure() -> None:
    seen: list[str] = []
    FAILURES["busy"] = [httpx.PoolTimeout("no connection available")]
    failed, records, supervisor = asyncio.run(forward_once(["busy", "idle"], seen))
    assert isinstance(failed, Unavailable) and (failed.code, failed.retry_after_s) == ("engines_busy", 1)
    assert seen == ["busy"] and records[-1].status == 503  # not retried: the limit is the gateway's own
    assert supervisor.engines["busy"].healthy and not supervisor._wake["busy"].is_set()


async def _chunks(body: bytes) -> Any:
    yield body[:5]
    yield body[5:]


async def _noop(engine: Engine) -> None:
    return None


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
    stripper = UsageStripper()
    relayed = b"".join(stripper.feed(stream[i : i + 9]) for i in range(0, len(stream), 9)) + stripper.flush()
    assert relayed == b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\ndata: [DONE]\n\n'


def test_serve_refuses_an_unknown_base_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loragate.cli import main

    assert main(["serve", "--base", "no-such-base", "--registry", str(tmp_path / "reg")]) == 2
    assert capsys.readouterr().err == "error: base 'no-such-base' is neither a directory nor a registered base\n"
    assert main(["serve", "--base", "tiny", "--engines", "0", "--registry", str(tmp_path / "reg")]) == 2
    assert "invalid settings (engines.count): Input should be greater than or equal to 1" in capsys.readouterr().err


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
    from gateway.app import bound_base_name
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
        async with httpx.AsyncClient() as client:
            policy = Policy()  # type: ignore[arg-type]
            manager = AdapterManager(
                registry, client, {}, base_name="tiny", policy=policy, load_timeout_s=1, materialize=materialize
            )
            return await manager._local_path(manifest)

    named = asyncio.run(path_of(materialize=False))
    assert named == registry.materialized_path(manifest)
    assert not named.exists()  # nothing downloaded or assembled on the gateway's disk
    assert asyncio.run(path_of(materialize=True)) == named  # the folder a sync pass (or the gateway) assembles
    assert {p.name for p in named.iterdir()} == set(manifest.files)


@pytest.mark.parametrize("hang_up", ["heard", "write_failed"])
def test_a_client_hang_up_closes_the_upstream_however_the_server_notices_it(hang_up: str) -> None:
    """uvicorn reports a hang-up either as `http.disconnect` or by failing the next write (ClientDisconnected, an
    OSError), whichever comes first: both must count as a disconnect."""
    closed: list[bool] = []
    sent: list[bytes] = []
    first_sent = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:  # a long answer, still streaming
        yield b"data: 1\n\n"
        first_sent.set()
        if hang_up == "write_failed":
            yield b"data: 2\n\n"
        await asyncio.sleep(3600)
        yield b"never"

    async def on_close(disconnected: bool) -> None:
        closed.append(disconnected)

    async def receive() -> dict[str, Any]:
        await first_sent.wait()
        if hang_up == "write_failed":
            await asyncio.sleep(3600)  # the server has not heard of the hang-up yet
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if sent:
                raise OSError("client disconnected")
            sent.append(message["body"])

    async def run() -> None:
        response = UpstreamStreamResponse(chunks(), status_code=200, headers={}, on_close=on_close)
        await asyncio.wait_for(response({"type": "http"}, receive, send), 10)

    asyncio.run(run())
    assert closed == [True] and sent == [b"data: 1\n\n"]
