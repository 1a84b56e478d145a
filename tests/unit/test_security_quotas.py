"""Quotas: token buckets per key and per adapter, concurrency slots, replica shares (time from a fake clock)."""

from __future__ import annotations

import pytest

from gateway.quotas import (
    Bucket,
    Limits,
    QuotaExceeded,
    QuotaManager,
    QuotaRefusal,
    QuotaSettings,
    Scope,
    adapter_limits,
    decide,
    share,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("limit", "replicas", "expected"), [(60, 1, 60), (60, 2, 30), (61, 2, 31), (1, 3, 1), (10, 4, 3)]
)
def test_share(limit: int, replicas: int, expected: int) -> None:
    assert share(limit, replicas) == expected


def test_bucket_refills_up_to_capacity() -> None:
    bucket = Bucket(capacity=60, rate_per_s=1.0, balance=0.0, stamp=0.0)
    assert bucket.refilled(30.0).balance == 30.0
    assert bucket.refilled(600.0).balance == 60.0
    assert bucket.refilled(-5.0).balance == 0.0
    assert Bucket(60, 1.0, -10.0, 0.0).wait_for(1.0) == 11.0
    assert Bucket(60, 1.0, 5.0, 0.0).wait_for(1.0) == 0.0


KEY = Scope("key", "k1", Limits(rpm=2, max_concurrency=1))


@pytest.mark.parametrize(
    ("buckets", "inflight", "replicas", "refusal"),
    [
        ({}, {}, 1, None),
        ({}, {("key", "k1"): 1}, 1, QuotaRefusal("key", "concurrency", 1, 1.0)),
        ({("key", "k1", "rpm"): Bucket(2, 2 / 60, 0.5, 0.0)}, {}, 1, QuotaRefusal("key", "rpm", 2, 15.0)),
        ({("key", "k1", "rpm"): Bucket(2, 2 / 60, 1.0, 0.0)}, {}, 1, None),
        # two replicas: rpm=2 is 1 per replica, so one request already in a full bucket of 1 leaves none
        ({("key", "k1", "rpm"): Bucket(1, 1 / 60, 0.0, 0.0)}, {}, 2, QuotaRefusal("key", "rpm", 2, 60.0)),
    ],
)
def test_decide(
    buckets: dict[tuple[str, str, str], Bucket],
    inflight: dict[tuple[str, str], int],
    replicas: int,
    refusal: QuotaRefusal | None,
) -> None:
    assert decide([KEY], buckets, inflight, 0.0, replicas) == refusal


def test_decide_reports_the_longest_wait() -> None:
    scopes = [Scope("key", "k", Limits(rpm=60)), Scope("adapter", "a", Limits(tpm=600))]
    buckets = {("key", "k", "rpm"): Bucket(60, 1.0, 0.0, 0.0), ("adapter", "a", "tpm"): Bucket(600, 10.0, -100.0, 0.0)}
    assert decide(scopes, buckets, {}, 0.0, 1) == QuotaRefusal("adapter", "tpm", 600, 10.0)


@pytest.mark.parametrize(
    ("adapter", "expected"),
    [("acme-bot", Limits(rpm=5)), ("acme", Limits(rpm=5)), ("globex", Limits(tpm=100)), ("other", None), (None, None)],
)
def test_adapter_limits_first_match(adapter: str | None, expected: Limits | None) -> None:
    table = {"acme*": Limits(rpm=5), "*ex": Limits(tpm=100), "acme-bot": Limits(rpm=99)}
    assert adapter_limits(adapter, table) == expected


def test_rpm_per_key_refuses_then_refills() -> None:
    clock = Clock()
    quotas = QuotaManager(QuotaSettings(), clock)
    scopes = quotas.scopes_for("k1", Limits(rpm=2), None)
    quotas.admit(scopes).release()
    quotas.admit(scopes).release()
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(scopes)
    assert refused.value.refusal == QuotaRefusal("key", "rpm", 2, 30.0)
    assert refused.value.refusal.retry_after_header == "30"
    clock.now += 30
    quotas.admit(scopes).release()
    # another key has its own bucket
    quotas.admit(quotas.scopes_for("k2", Limits(rpm=2), None))


def test_concurrency_slot_freed_on_release_only_once() -> None:
    quotas = QuotaManager(QuotaSettings(), Clock())
    scopes = quotas.scopes_for("k1", Limits(max_concurrency=2), None)
    first = quotas.admit(scopes)
    second = quotas.admit(scopes)
    with pytest.raises(QuotaExceeded, match="concurrency=2 for this API key"):
        quotas.admit(scopes)
    first.release()
    first.release()
    assert quotas.inflight("key", "k1") == 1
    third = quotas.admit(scopes)
    second.release()
    third.release()
    assert quotas.inflight("key", "k1") == 0


def test_tpm_admits_while_positive_and_charges_after() -> None:
    clock = Clock()
    quotas = QuotaManager(QuotaSettings(), clock)
    scopes = quotas.scopes_for("k1", Limits(tpm=60), None)
    lease = quotas.admit(scopes)
    lease.charge(90)  # a response may overdraw: its size is known only at the end
    lease.release()
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(scopes)
    assert refused.value.refusal.limit == "tpm"
    assert refused.value.refusal.retry_after_s == pytest.approx(30.0)
    clock.now += 30.5
    quotas.admit(scopes)


def test_adapter_scope_is_shared_by_keys_and_a_refusal_charges_nothing() -> None:
    clock = Clock()
    quotas = QuotaManager(QuotaSettings(adapters={"acme*": Limits(rpm=1)}), clock)
    a = quotas.scopes_for("k1", Limits(rpm=10), "acme-bot")
    b = quotas.scopes_for("k2", Limits(rpm=10), "acme-bot")
    assert [s.kind for s in a] == ["key", "adapter"]
    quotas.admit(a)
    with pytest.raises(QuotaExceeded, match="rpm=1 for this model"):
        quotas.admit(b)
    # k2's own bucket was not charged by the refused request: 10 more fit once the adapter refills
    clock.now += 60
    quotas.admit(b)
    assert quotas.scopes_for("k1", None, "globex") == []


def test_replicas_split_every_limit() -> None:
    quotas = QuotaManager(QuotaSettings(replicas=2), Clock())
    scopes = quotas.scopes_for("k1", Limits(rpm=4, max_concurrency=2), None)
    quotas.admit(scopes)
    with pytest.raises(QuotaExceeded, match="concurrency=2"):
        quotas.admit(scopes)
