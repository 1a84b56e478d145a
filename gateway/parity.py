"""The parity gate: before a promote gives a candidate version any of an alias's traffic, the candidate and the
alias's current version answer the golden prompts on this gateway's engines, and the move is refused when the
candidate falls below the alias's thresholds (`ParityGate`).

The prompts are the `golden` rows the promote was given, else the candidate's own (`push --golden`, or the training
run's held-out test rows), else the current version's. Each is sent greedily (temperature 0) to both versions as a
whole answer through the same placement, hooks and contract checks as a caller's request (`Proxy.fetch`: no
usage, quota or request metrics). The figures per version:

- agreement: the share of rows whose answer matches the row's reference (the same text once stripped; the same
  parsed JSON under a JSON contract), or, for a row without one, the current version's answer;
- contract validity: the share of answers keeping to the version's contract (under a contract only);
- failures: prompts the version did not answer.

`judge` is pure: any failure of the candidate, an agreement below `min_agreement` or more than `max_agreement_drop`
below the current version's, or a contract validity below `min_contract_validity` refuses the move, with one line
naming the figures (`gateway.errors.ParityRefused`, 409). `force` skips the gate; the audit line of the promote says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapters_registry import AdapterManifest
from adapters_registry.golden import GoldenRow
from adapters_registry.manifest import ParityGate
from gateway.call import Call
from gateway.errors import GatewayError
from gateway.shadow import choice_texts
from gateway.structured import constraint_of

if TYPE_CHECKING:
    from gateway.proxy import Proxy

log = logging.getLogger(__name__)

GATE_CONCURRENCY = 8  # golden prompts in flight at once, both versions together
DEFAULT_MAX_TOKENS = 64  # an answer's tokens when the golden set names none
CHAT_PATH = "/v1/chat/completions"
_JSON_KINDS = frozenset({"json_schema", "json_object"})


@dataclass
class Answers:
    """One version's answers to the golden prompts, in row order (None: it did not answer that one)."""

    manifest: AdapterManifest
    texts: list[str | None]
    valid: list[bool | None]  # kept to its contract (None: no contract checked)
    as_json: bool = False  # answered under a JSON constraint: compared as parsed JSON
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Figures:
    ref: str
    prompts: int
    failed: int
    judged: int  # rows whose agreement was judged (a reference, or the current version's answer, to compare with)
    agreed: int
    checked: int  # answers checked against a contract
    valid: int

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.judged if self.judged else None

    @property
    def validity(self) -> float | None:
        return self.valid / self.checked if self.checked else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "prompts": self.prompts,
            "failed": self.failed,
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "judged": self.judged,
            "contract_validity": None if self.validity is None else round(self.validity, 4),
            "checked": self.checked,
        }


def same_answer(a: str | None, b: str | None, as_json: bool) -> bool:
    """Whether two answers agree: the same text once stripped, or with `as_json` the same parsed JSON."""
    if a is None or b is None:
        return False
    if as_json:
        try:
            return bool(json.loads(a) == json.loads(b))
        except ValueError:
            pass
    return a.strip() == b.strip()


def figures(rows: list[GoldenRow], mine: Answers, current: Answers | None) -> Figures:
    """`mine`'s figures on the rows: agreement with each row's reference, or with `current`'s answer where the row
    has none (so the current version, judged with itself as `current`, agrees with itself there); a row without a
    reference that `current` did not answer, or with no `current`, is not judged."""
    judged = agreed = 0
    for i, row in enumerate(rows):
        reference = row["reference"]
        if reference is None:
            if current is None or current.texts[i] is None:
                continue
            reference = current.texts[i]
        judged += 1
        agreed += same_answer(mine.texts[i], reference, mine.as_json)
    checked = [v for v in mine.valid if v is not None]
    return Figures(
        ref=mine.manifest.ref,
        prompts=len(rows),
        failed=sum(text is None for text in mine.texts),
        judged=judged,
        agreed=agreed,
        checked=len(checked),
        valid=sum(checked),
    )


def judge(gate: ParityGate, candidate: Figures, current: Figures | None) -> list[str]:
    """Why the candidate may not get traffic (pure; empty: it passes)."""
    breaches = []
    if candidate.failed:
        breaches.append(f"{candidate.failed} of {candidate.prompts} golden prompts got no answer from {candidate.ref}")
    agreement = candidate.agreement
    if agreement is not None:
        if gate.min_agreement is not None and agreement < gate.min_agreement:
            breaches.append(
                f"agreement {agreement:.0%} ({candidate.agreed} of {candidate.judged}) < {gate.min_agreement:.0%}"
            )
        floor = None if current is None or current.agreement is None else current.agreement - gate.max_agreement_drop
        if floor is not None and current is not None and agreement < floor - 1e-9:
            breaches.append(
                f"agreement {agreement:.0%} ({candidate.agreed} of {candidate.judged}) against {current.ref}'s "
                f"{current.agreement:.0%}, more than the {gate.max_agreement_drop * 100:g} points the alias allows"
            )
    validity = candidate.validity
    if validity is not None and validity < gate.min_contract_validity:
        breaches.append(
            f"contract validity {validity:.0%} ({candidate.valid} of {candidate.checked}) < "
            f"{gate.min_contract_validity:.0%}"
        )
    return breaches


@dataclass(frozen=True)
class Verdict:
    source: str  # whose golden prompts, from where: "support@4 (training test split)"
    candidate: Figures
    current: Figures | None
    breaches: list[str]

    def to_dict(self) -> dict[str, Any]:
        """What the promote's audit line and answer carry."""
        return {
            "golden": self.source,
            "candidate": self.candidate.to_dict(),
            "current": self.current.to_dict() if self.current else None,
            "passed": not self.breaches,
            "breaches": self.breaches,
        }


async def answers(
    proxy: Proxy, manifest: AdapterManifest, rows: list[GoldenRow], max_tokens: int, limit: asyncio.Semaphore
) -> Answers:
    """`manifest`'s greedy answers to the rows, through the gateway's own request path."""
    texts: list[str | None] = [None] * len(rows)
    valid: list[bool | None] = [None] * len(rows)
    out = Answers(manifest, texts, valid)

    async def one(i: int, row: GoldenRow) -> None:
        body = {"messages": row["messages"], "temperature": 0, "max_tokens": max_tokens}
        call = Call("chat", f"parity-{manifest.name}-{manifest.version}-{i}", body=body)
        call.resolved(manifest, manifest.engine_name)
        async with limit:
            try:
                answer = await proxy.fetch(call, CHAT_PATH)
            except GatewayError as exc:
                out.errors.append(exc.message)
                return
        constraint = constraint_of(call)
        out.as_json = out.as_json or (constraint is not None and constraint.kind in _JSON_KINDS)
        got = choice_texts(answer) if call.status == 200 else None
        if not got:
            out.errors.append(f"answered {call.status}")
            return
        texts[i], valid[i] = got[0], call.output_valid

    await asyncio.gather(*(one(i, row) for i, row in enumerate(rows)))
    return out


async def run_gate(
    proxy: Proxy,
    gate: ParityGate,
    candidate: AdapterManifest,
    current: AdapterManifest | None,
    rows: list[GoldenRow],
    source: str,
    max_tokens: int | None,
) -> Verdict:
    """Both versions' answers to the golden prompts, judged against the alias's thresholds."""
    limit = asyncio.Semaphore(GATE_CONCURRENCY)
    tokens = max_tokens or DEFAULT_MAX_TOKENS
    runs = [answers(proxy, candidate, rows, tokens, limit)]
    if current is not None:
        runs.append(answers(proxy, current, rows, tokens, limit))
    got = await asyncio.gather(*runs)
    mine, theirs = got[0], (got[1] if current is not None else None)
    if mine.errors:
        log.warning(
            "parity gate: %s left %d golden prompts unanswered (%s)", candidate.ref, len(mine.errors), mine.errors[0]
        )
    current_figures = figures(rows, theirs, theirs) if theirs is not None else None
    candidate_figures = figures(rows, mine, theirs)
    return Verdict(source, candidate_figures, current_figures, judge(gate, candidate_figures, current_figures))
