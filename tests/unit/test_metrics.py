"""Unit tests of gateway.metrics, metric_labels and engine_collector: exact sample values on a fresh
CollectorRegistry per test."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from adapters_registry.manifest import AdapterManifest
from gateway.call import Call
from gateway.engine_collector import EngineSnapshot, ResidentAdapter, engine_snapshots, residency_tier
from gateway.ledger import ResidencyLedger
from gateway.metric_labels import FoldDecision, fold_decision, slug, status_class, time_per_output_token, validity_label
from gateway.metrics import GatewayMetrics
from gateway.supervisor import Engine


def outcome(adapter: str | None = "acme", version: str | None = "3", **kw: object) -> Call:
    fields: dict[str, object] = {
        "route": "chat",
        "adapter": adapter,
        "version": version,
        "engine": "e0",
        "status": 200,
        "error_code": None,
        "prompt_tokens": 11,
        "completion_tokens": 5,
        "latency_s": 0.9,
        "ttft_s": 0.1,
        "queue_s": 0.02,
        "output_valid": None,
        "stream": True,
        "request_id": "req-1",
    }
    fields.update(kw)
    latency = fields.pop("latency_s")
    return Call(started=0.0, ended=latency, **fields)  # type: ignore[arg-type]


def value(m: GatewayMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


@pytest.fixture
def m() -> GatewayMetrics:
    return GatewayMetrics(registry=CollectorRegistry(), max_adapter_labels=3)


# -- pure decisions -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter", "usage", "labelled", "limit", "expected"),
    [
        ("a", {}, frozenset({"a"}), 1, FoldDecision("a")),
        ("b", {"b": 1}, frozenset({"a"}), 2, FoldDecision("b", promote=True)),
        ("c", {"a": 5, "b": 1, "c": 2}, frozenset({"a", "b"}), 2, FoldDecision("other")),
        ("c", {"a": 5, "b": 1, "c": 3}, frozenset({"a", "b"}), 2, FoldDecision("c", promote=True, demote="b")),
        ("c", {"a": 1, "b": 1, "c": 3}, frozenset({"a", "b"}), 2, FoldDecision("c", promote=True, demote="a")),
        ("c", {"a": 0, "b": 0, "c": 0}, frozenset({"a", "b"}), 2, FoldDecision("other")),
        ("a", {"a": 9}, frozenset(), 0, FoldDecision("other")),
    ],
)
def test_fold_decision(
    adapter: str, usage: dict[str, float], labelled: frozenset[str], limit: int, expected: FoldDecision
) -> None:
    assert fold_decision(adapter, usage, labelled, limit) == expected


@pytest.mark.parametrize(
    ("status", "label"), [(200, "2xx"), (201, "2xx"), (400, "4xx"), (429, "4xx"), (503, "5xx"), (0, "unknown")]
)
def test_status_class(status: int, label: str) -> None:
    assert status_class(status) == label


@pytest.mark.parametrize(("valid", "label"), [(True, "valid"), (False, "invalid"), (None, "none")])
def test_validity_label(valid: bool | None, label: str) -> None:
    assert validity_label(valid) == label


@pytest.mark.parametrize(
    ("latency", "ttft", "tokens", "expected"),
    [(1.0, 0.2, 5, 0.2), (1.0, 0.2, 1, None), (1.0, None, 5, None), (1.0, 0.2, None, None), (0.1, 0.2, 3, 0.0)],
)
def test_time_per_output_token(latency: float, ttft: float | None, tokens: int | None, expected: float | None) -> None:
    assert time_per_output_token(latency, ttft, tokens) == expected


@pytest.mark.parametrize(
    ("raw", "label"),
    [("model_not_found", "model_not_found"), ("Upstream Timeout!", "upstream_timeout"), ("  ", "unknown")],
)
def test_slug(raw: str, label: str) -> None:
    assert slug(raw) == label


@pytest.mark.parametrize(
    ("running", "tier"),
    [(None, "unknown"), (frozenset(), "cpu"), (frozenset({"a@1"}), "gpu"), (frozenset({"b"}), "cpu")],
)
def test_residency_tier(running: frozenset[str] | None, tier: str) -> None:
    assert residency_tier("a@1", running) == tier


# -- request metrics ----------------------------------------------------------------------------------------------


def test_request_counters_and_histograms(m: GatewayMetrics) -> None:
    m.observe_request(outcome())
    m.observe_request(outcome(prompt_tokens=4, completion_tokens=3, output_valid=True, stream=False, ttft_s=None))
    av = {"adapter": "acme", "version": "3"}
    assert value(m, "loragate_requests_total", **av, route="chat", status_class="2xx", error_code="") == 2
    assert value(m, "loragate_prompt_tokens_total", **av) == 15
    assert value(m, "loragate_completion_tokens_total", **av) == 8
    assert value(m, "loragate_request_duration_seconds_count", **av, route="chat") == 2
    assert value(m, "loragate_request_duration_seconds_sum", **av, route="chat") == pytest.approx(1.8)
    assert value(m, "loragate_time_to_first_token_seconds_count", **av) == 1
    assert value(m, "loragate_time_to_first_token_seconds_bucket", **av, le="0.1") == 1
    assert value(m, "loragate_time_to_first_token_seconds_bucket", **av, le="0.05") == 0
    assert value(m, "loragate_time_per_output_token_seconds_count", **av) == 1
    assert value(m, "loragate_time_per_output_token_seconds_sum", **av) == pytest.approx(0.2)
    assert value(m, "loragate_queue_wait_seconds_count", **av) == 2
    assert value(m, "loragate_structured_outputs_total", **av, result="none") == 1
    assert value(m, "loragate_structured_outputs_total", **av, result="valid") == 1


def test_errors_by_status_class_and_code(m: GatewayMetrics) -> None:
    m.observe_request(outcome(status=503, error_code="engine_unavailable", prompt_tokens=None, completion_tokens=None))
    m.observe_request(outcome(status=429, error_code="rate_limited", prompt_tokens=None, completion_tokens=None))
    av = {"adapter": "acme", "version": "3", "route": "chat"}
    assert value(m, "loragate_requests_total", **av, status_class="5xx", error_code="engine_unavailable") == 1
    assert value(m, "loragate_requests_total", **av, status_class="4xx", error_code="rate_limited") == 1
    assert value(m, "loragate_prompt_tokens_total", adapter="acme", version="3") is None


def test_base_model_and_unresolved_names(m: GatewayMetrics) -> None:
    m.observe_request(outcome(adapter=None, version=None))
    m.observe_request(outcome(adapter=None, version=None, unresolved=True, status=404, error_code="model_not_found"))
    ok = {"route": "chat", "status_class": "2xx", "error_code": ""}
    assert value(m, "loragate_requests_total", adapter="", version="", **ok) == 1
    missing = {"route": "chat", "status_class": "4xx", "error_code": "model_not_found"}
    assert value(m, "loragate_requests_total", adapter="other", version="", **missing) == 1


def test_no_request_ids_or_key_ids_in_exposition(m: GatewayMetrics) -> None:
    m.observe_request(outcome(request_id="chatcmpl-secret-123", key_id="key-abc"))
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    assert b"secret-123" not in body
    assert b"key-abc" not in body


def test_error_codes_are_capped() -> None:
    m = GatewayMetrics(registry=CollectorRegistry())
    for i in range(40):
        m.observe_request(outcome(status=500, error_code=f"code{i}"))
    codes = {
        s.labels["error_code"]
        for fam in m.registry.collect()
        if fam.name == "loragate_requests"
        for s in fam.samples
        if s.name == "loragate_requests_total"
    }
    assert len(codes) == 33
    assert "other" in codes
    assert value(m, "loragate_requests_total", adapter="acme", version="3", route="chat", status_class="5xx",
                 error_code="other") == 8  # fmt: skip


# -- folding ------------------------------------------------------------------------------------------------------


def test_adapters_past_the_limit_fold_into_other(m: GatewayMetrics) -> None:
    for name in ("a", "b", "c"):
        m.observe_request(outcome(adapter=name, version="1"))
    m.observe_request(outcome(adapter="d", version="7"))
    m.observe_request(outcome(adapter="e", version="2"))
    ok = {"route": "chat", "status_class": "2xx", "error_code": ""}
    for name in ("a", "b", "c"):
        assert value(m, "loragate_requests_total", adapter=name, version="1", **ok) == 1
    assert value(m, "loragate_requests_total", adapter="other", version="", **ok) == 2
    assert value(m, "loragate_prompt_tokens_total", adapter="other", version="") == 22
    assert value(m, "loragate_requests_total", adapter="d", version="7", **ok) is None


def test_a_busy_newcomer_replaces_the_least_used_label(m: GatewayMetrics) -> None:
    for name, n in (("a", 5), ("b", 1), ("c", 5)):
        for _ in range(n):
            m.observe_request(outcome(adapter=name, version="1"))
    for _ in range(3):  # d: 1 and 2 requests stay in "other"; the third beats 2 x b's single request
        m.observe_request(outcome(adapter="d", version="1"))
    ok = {"route": "chat", "status_class": "2xx", "error_code": ""}
    assert value(m, "loragate_requests_total", adapter="d", version="1", **ok) == 1
    assert value(m, "loragate_requests_total", adapter="other", version="", **ok) == 2
    assert value(m, "loragate_requests_total", adapter="b", version="1", **ok) is None
    assert value(m, "loragate_time_to_first_token_seconds_count", adapter="b", version="1") is None
    m.observe_request(outcome(adapter="b", version="1"))
    assert value(m, "loragate_requests_total", adapter="other", version="", **ok) == 3


def test_usage_decays_so_stale_adapters_can_be_replaced() -> None:
    m = GatewayMetrics(registry=CollectorRegistry(), max_adapter_labels=1, decay_every=4)
    for _ in range(4):  # a: 4 -> halved to 2 at the 4th request
        m.observe_request(outcome(adapter="a", version="1"))
    for _ in range(4):  # b: requests 5-8 stay in "other"; the 8th halves a to 1 and b to 2 (not more than twice)
        m.observe_request(outcome(adapter="b", version="1"))
    m.observe_request(outcome(adapter="b", version="1"))  # b 3 > 2 x a 1: b takes a's label
    ok = {"route": "chat", "status_class": "2xx", "error_code": ""}
    assert value(m, "loragate_requests_total", adapter="b", version="1", **ok) == 1
    assert value(m, "loragate_requests_total", adapter="other", version="", **ok) == 4
    assert value(m, "loragate_requests_total", adapter="a", version="1", **ok) is None


def test_zero_labels_folds_every_adapter() -> None:
    m = GatewayMetrics(registry=CollectorRegistry(), max_adapter_labels=0)
    m.observe_request(outcome(adapter="a"))
    m.adapter_loaded("e0", "a", "3", 0.01)
    assert value(m, "loragate_adapter_loads_total", engine="e0", adapter="other", version="") == 1


def test_negative_label_limit_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_adapter_labels must be >= 0, got -1"):
        GatewayMetrics(registry=CollectorRegistry(), max_adapter_labels=-1)


# -- lifecycle and engines ----------------------------------------------------------------------------------------


def test_adapter_lifecycle(m: GatewayMetrics) -> None:
    m.adapter_loaded("e0", "acme", "3", 0.02)
    m.adapter_loaded("e0", "acme", "3", 0.2)
    m.adapter_unloaded("e0", "acme", "3", 0.004, evicted=True)
    m.adapter_unloaded("e0", "acme", "3", 0.004, evicted=False)
    m.adapter_load_failed("e0", "acme", "Upstream 400")
    assert value(m, "loragate_adapter_loads_total", engine="e0", adapter="acme", version="3") == 2
    assert value(m, "loragate_adapter_load_seconds_count", engine="e0", adapter="acme") == 2
    assert value(m, "loragate_adapter_load_seconds_bucket", engine="e0", adapter="acme", le="0.025") == 1
    assert value(m, "loragate_adapter_unload_seconds_count", engine="e0", adapter="acme") == 2
    assert value(m, "loragate_adapter_evictions_total", engine="e0", adapter="acme", version="3") == 1
    assert value(m, "loragate_adapter_load_failures_total", engine="e0", adapter="acme", reason="upstream_400") == 1


def test_engine_up_and_restarts(m: GatewayMetrics) -> None:
    m.engine_up("e0", True)
    m.engine_up("e1", False)
    m.engine_restarted("e1", "exited")
    m.engine_restarted("e1", "exited")
    assert value(m, "loragate_engine_up", engine="e0") == 1
    assert value(m, "loragate_engine_up", engine="e1") == 0
    assert value(m, "loragate_engine_restarts_total", engine="e1", reason="exited") == 2


def test_auth_and_rate_limit_counters(m: GatewayMetrics) -> None:
    m.rate_limited("key", "rpm")
    m.rate_limited("key", "rpm")
    m.rate_limited("adapter", "concurrency")
    m.auth_failed("revoked")
    m.limit_rejected("max_tokens")
    assert value(m, "loragate_rate_limited_total", scope="key", limit="rpm") == 2
    assert value(m, "loragate_rate_limited_total", scope="adapter", limit="concurrency") == 1
    assert value(m, "loragate_auth_failures_total", reason="revoked") == 1
    assert value(m, "loragate_limit_rejections_total", limit="max_tokens") == 1


def test_state_collector_reads_ledgers_at_scrape_time(m: GatewayMetrics) -> None:
    ledger = [ResidentAdapter("a", "1", "gpu")]
    m.observe_request(outcome(adapter="a", version="1"))
    m.add_state_collector(lambda: [EngineSnapshot("e0", adapter_slots=4, resident=list(ledger), waiting=3)])
    assert value(m, "loragate_adapter_resident", engine="e0", adapter="a", version="1", tier="gpu") == 1
    assert value(m, "loragate_engine_free_adapter_slots", engine="e0") == 3
    assert value(m, "loragate_engine_adapter_slots", engine="e0") == 4
    assert value(m, "loragate_engine_waiting_requests", engine="e0") == 3
    ledger.extend([ResidentAdapter("x", "2", "cpu"), ResidentAdapter("y", "5", "cpu")])
    for name in ("b", "c"):
        m.observe_request(outcome(adapter=name, version="1"))
    # x and y have no label of their own (the limit is 3): summed under "other"
    assert value(m, "loragate_adapter_resident", engine="e0", adapter="other", version="", tier="cpu") == 2
    assert value(m, "loragate_engine_free_adapter_slots", engine="e0") == 1
    ledger.append(ResidentAdapter("a", "2", "hbm?"))  # a tier the gateway does not know stays bounded
    assert value(m, "loragate_adapter_resident", engine="e0", adapter="a", version="2", tier="unknown") == 1
    assert value(m, "loragate_engine_free_adapter_slots", engine="e0") == 0


def test_inflight_comes_from_the_snapshot(m: GatewayMetrics) -> None:
    m.add_state_collector(lambda: [EngineSnapshot("e0", adapter_slots=2, inflight=7), EngineSnapshot("e1", 2)])
    assert value(m, "loragate_engine_inflight_requests", engine="e0") == 7
    assert value(m, "loragate_engine_inflight_requests", engine="e1") == 0
    assert value(m, "loragate_engine_inflight_requests", engine="e2") is None  # no snapshot, no series


def _manifest(name: str, version: int, hex_char: str) -> AdapterManifest:
    return AdapterManifest(
        name=name,
        version=version,
        digest="sha256:" + hex_char * 64,
        files={},
        base="tiny",
        base_fingerprint="sha256:" + "f" * 64,
        peft_type="LORA",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj"],
        dtype="float32",
        size_bytes=0,
    )


def test_engine_snapshots_read_the_ledger_and_the_engines() -> None:
    a, b = _manifest("a", 1, "a"), _manifest("b", 2, "b")
    ledger = ResidencyLedger()
    ledger.add_engine("e0", 3)
    ledger.add_engine("e1", 2)  # not (or no longer) known to the supervisor
    for key in (a.engine_name, b.engine_name, "gone@cccccccccccc"):  # gone: its manifest is no longer kept
        ledger.record_loaded("e0", key)
    ledger.record_loaded("e1", a.engine_name)
    engine = Engine("e0", "http://e0", max_loras=2, slots=3, max_lora_rank=16, waiting=4, inflight=6)
    engine.gpu_adapters = frozenset({b.engine_name})
    manifests = {m.engine_name: m for m in (a, b)}
    assert engine_snapshots(ledger, {"e0": engine}, manifests) == [
        EngineSnapshot("e0", 3, [ResidentAdapter("a", "1", "cpu"), ResidentAdapter("b", "2", "gpu")], 4, 6),
        EngineSnapshot("e1", 2, [ResidentAdapter("a", "1", "unknown")], 0, 0),
    ]


def test_a_failing_state_source_does_not_break_the_scrape(m: GatewayMetrics) -> None:
    def broken() -> list[EngineSnapshot]:
        raise RuntimeError("ledger gone")

    m.add_state_collector(broken)
    m.add_state_collector(lambda: [EngineSnapshot("e1", adapter_slots=2)])
    body, _ = m.render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert [s.value for s in families["loragate_engine_free_adapter_slots"].samples] == [2.0]


def test_two_instances_do_not_share_state() -> None:
    first = GatewayMetrics(registry=CollectorRegistry())
    second = GatewayMetrics(registry=CollectorRegistry())
    first.observe_request(outcome())
    labels = {"adapter": "acme", "version": "3", "route": "chat", "status_class": "2xx", "error_code": ""}
    assert first.registry.get_sample_value("loragate_requests_total", labels) == 1
    assert second.registry.get_sample_value("loragate_requests_total", labels) is None
