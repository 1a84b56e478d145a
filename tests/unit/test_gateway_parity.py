"""The parity gate's decisions (gateway/parity.py, pure): how answers agree, what a version's figures are with and
without reference answers, and when a candidate is refused against the alias's thresholds."""

from __future__ import annotations

import pytest

from adapters_registry import AdapterManifest
from adapters_registry.manifest import ParityGate
from gateway.parity import Answers, Figures, figures, judge, same_answer


def _manifest(version: int) -> AdapterManifest:
    return AdapterManifest(
        name="support",
        version=version,
        digest="sha256:" + str(version) * 64,
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


def _row(reference: str | None) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "q"}], "reference": reference}


def test_answers_agree_on_stripped_text_or_under_json_on_parsed_json() -> None:
    assert same_answer(" sports\n", "sports", as_json=False)
    assert not same_answer("Sports", "sports", as_json=False)
    assert same_answer('{"a": 1, "b": 2}', '{"b":2,"a":1}', as_json=True)
    assert not same_answer('{"a": 1, "b": 2}', '{"b":2,"a":1}', as_json=False)
    assert same_answer("not json ", "not json", as_json=True)  # text where either is not JSON
    assert not same_answer(None, "sports", as_json=False)  # no answer agrees with nothing


def test_figures_judge_references_and_else_the_current_versions_answer() -> None:
    rows = [_row("sports"), _row("politics"), _row(None), _row(None), _row(None)]
    current = Answers(_manifest(1), ["sports", "sports", "tech", None, "art"], [True, True, True, None, False])
    candidate = Answers(_manifest(2), ["sports", "politics", "tech", "x", None], [True, False, None, None, None])
    mine = figures(rows, candidate, current)
    # rows 1-2 against their references, 3 and 5 against the current answer, 4 unjudged (current gave none)
    assert (mine.judged, mine.agreed, mine.failed, mine.checked, mine.valid) == (4, 3, 1, 2, 1)
    assert (mine.agreement, mine.validity) == (0.75, 0.5)
    theirs = figures(rows, current, current)  # the current version agrees with itself where a row has no reference
    assert (theirs.judged, theirs.agreed, theirs.failed) == (4, 3, 1)
    alone = figures(rows, candidate, None)  # a new alias: only the references count
    assert (alone.judged, alone.agreed) == (2, 2)
    assert figures([_row(None)], candidate, None).agreement is None


def _figures(ref: str, agreed: int, judged: int = 20, *, failed: int = 0, valid: int = 0, checked: int = 0) -> Figures:
    return Figures(ref, prompts=20, failed=failed, judged=judged, agreed=agreed, checked=checked, valid=valid)


CURRENT = _figures("support@1", 18)  # 90%


@pytest.mark.parametrize(
    ("gate", "candidate", "current", "breaches"),
    [
        (ParityGate(), _figures("support@2", 18), CURRENT, []),  # the same
        (ParityGate(), _figures("support@2", 17), CURRENT, []),  # 85%: exactly the 5 points allowed
        (
            ParityGate(),
            _figures("support@2", 16),
            CURRENT,
            ["agreement 80% (16 of 20) against support@1's 90%, more than the 5 points the alias allows"],
        ),
        (ParityGate(max_agreement_drop=0.1), _figures("support@2", 16), CURRENT, []),
        (ParityGate(), _figures("support@2", 20), CURRENT, []),  # better
        (ParityGate(), _figures("support@2", 0), None, []),  # a new alias: nothing to be at parity with
        (ParityGate(min_agreement=0.5), _figures("support@2", 9), None, ["agreement 45% (9 of 20) < 50%"]),
        (ParityGate(), _figures("support@2", 0, judged=0), CURRENT, []),  # nothing judged: no agreement figure
        (
            ParityGate(),
            _figures("support@2", 18, failed=2),
            CURRENT,
            ["2 of 20 golden prompts got no answer from support@2"],
        ),
        (
            ParityGate(),
            _figures("support@2", 18, valid=19, checked=20),
            CURRENT,
            ["contract validity 95% (19 of 20) < 99%"],
        ),
        (ParityGate(min_contract_validity=0.9), _figures("support@2", 18, valid=19, checked=20), CURRENT, []),
        (
            ParityGate(min_agreement=0.95),
            _figures("support@2", 4, valid=10, checked=20),
            CURRENT,
            [
                "agreement 20% (4 of 20) < 95%",
                "agreement 20% (4 of 20) against support@1's 90%, more than the 5 points the alias allows",
                "contract validity 50% (10 of 20) < 99%",
            ],
        ),
    ],
)
def test_judge(gate: ParityGate, candidate: Figures, current: Figures | None, breaches: list[str]) -> None:
    assert judge(gate, candidate, current) == breaches
