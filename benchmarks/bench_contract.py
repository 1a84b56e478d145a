"""Format compliance of a tiny adapter trained to emit JSON, with and without its output contract.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_contract.py [--train 128] [--heldout 64] [--epochs 8]

Steps: build the tiny base; make a ticket-triage dataset (prompt "Ticket: ..." -> `{"team": ..., "priority": n}`)
whose held-out tickets share no sentence with the training ones; train a LoRA adapter with the training module;
start one vLLM (CPU) engine with the adapter; send every held-out prompt without a constraint and with the
adapter's contract applied the way the gateway applies it (`gateway.structured.prepare_request`); print, per mode
and temperature, the share of answers that keep to the contract (parse as JSON and validate against the schema)
and the share whose labels are right.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from adapters_registry.contract import contract_satisfied, normalize_contract
from gateway.engine_process import EngineProcess, EngineSpec, free_port
from gateway.structured import prepare_request

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"team": {"enum": ["billing", "tech", "sales"]}, "priority": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["team", "priority"],
    "additionalProperties": False,
}
CONTRACT = normalize_contract(SCHEMA)
ADAPTER = "triage"

TEAM_PHRASES = {
    "billing": ["I was charged twice", "my invoice is wrong", "please refund my payment", "the card was declined"],
    "tech": ["the app crashes on start", "login fails with an error", "the page will not load", "sync is broken"],
    "sales": ["I want a quote for 50 seats", "do you offer a discount", "can we upgrade our plan", "pricing for teams"],
}
URGENCY = {1: ["whenever you can", "no rush"], 2: ["this week please", "soon if possible"], 3: ["urgent!", "ASAP"]}
OPENERS = ["Hello,", "Hi team,", "Good morning,", "Hey,", "Dear support,", "Greetings,"]


@dataclass(frozen=True)
class Example:
    prompt: str
    team: str
    priority: int

    @property
    def answer(self) -> str:
        return json.dumps({"team": self.team, "priority": self.priority}, separators=(",", ":"))

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Ticket: {self.prompt}"}]


def make_examples(n: int, rng: random.Random, *, held_out: bool) -> list[Example]:
    """Training uses the first half of each phrase list, held-out the second half: no shared sentence."""
    examples = []
    for _ in range(n):
        team = rng.choice(sorted(TEAM_PHRASES))
        priority = rng.choice([1, 2, 3])
        phrases, urgency = TEAM_PHRASES[team], URGENCY[priority]
        phrase = rng.choice(phrases[len(phrases) // 2 :] if held_out else phrases[: len(phrases) // 2])
        tail = urgency[1] if held_out else urgency[0]
        examples.append(Example(f"{rng.choice(OPENERS)} {phrase}, {tail}", team, priority))
    return examples


def write_jsonl(examples: list[Example], path: Path) -> Path:
    with path.open("w") as f:
        for ex in examples:
            row = {"prompt": ex.messages(), "completion": [{"role": "assistant", "content": ex.answer}]}
            f.write(json.dumps(row) + "\n")
    return path


def train_adapter(base: Path, train_file: Path, out: Path, epochs: int) -> Path:
    """A LoRA adapter trained with the training module (issue 4)."""
    from training import sft

    sft.train(
        model=str(base), dataset=str(train_file), output_dir=str(out), num_train_epochs=epochs, learning_rate=3e-3
    )
    return out


@dataclass
class Row:
    mode: str
    temperature: float
    valid: int
    correct: int
    total: int
    tokens: list[int]


async def ask_all(
    url: str, examples: list[Example], *, constrained: bool, temperature: float, seed: int
) -> tuple[int, int, list[int]]:
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0, connect=10.0), limits=limits) as client:

        async def ask(i: int, ex: Example) -> tuple[bool, bool, int]:
            body: dict[str, Any] = {
                "model": ADAPTER,
                "messages": ex.messages(),
                "max_tokens": 48,
                "temperature": temperature,
                "seed": seed + i,
            }
            if constrained:
                body = prepare_request(body, CONTRACT).body
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            answer = response.json()
            text = answer["choices"][0]["message"]["content"] or ""
            valid = contract_satisfied(CONTRACT, text)
            correct = valid and json.loads(text) == json.loads(ex.answer)
            return valid, correct, int(answer["usage"]["completion_tokens"])

        results = await asyncio.gather(*(ask(i, ex) for i, ex in enumerate(examples)))
    return sum(v for v, _, _ in results), sum(c for _, c, _ in results), [t for _, _, t in results]


def evaluate(engine: EngineProcess, examples: list[Example], temperatures: list[float], seed: int) -> list[Row]:
    rows = []
    plan = [(mode, t) for t in temperatures for mode in ("without contract", "with contract")]
    random.Random(seed).shuffle(plan)  # no systematic order between the two modes
    for mode, temperature in plan:
        valid, correct, tokens = asyncio.run(
            ask_all(engine.url, examples, constrained=mode == "with contract", temperature=temperature, seed=seed)
        )
        rows.append(Row(mode, temperature, valid, correct, len(examples), tokens))
    rows.sort(key=lambda r: (r.temperature, r.mode != "without contract"))
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'mode':<18} {'temp':>5} {'compliance':>11} {'labels right':>13} {'median tokens':>14}")
    for r in rows:
        print(
            f"{r.mode:<18} {r.temperature:>5.1f} {r.valid / r.total:>10.1%} {r.correct / r.total:>12.1%} "
            f"{statistics.median(r.tokens):>14.0f}   ({r.valid}/{r.total} valid)"
        )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--train", type=int, default=128, help="training examples")
    parser.add_argument("--heldout", type=int, default=64, help="held-out examples")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", type=Path, help="use this trained adapter instead of training one")
    parser.add_argument("--workdir", type=Path, help="keep data, adapter and engine log here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    from loragate.tiny_model import cached_tiny_model

    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-contract-"))
    work.mkdir(parents=True, exist_ok=True)
    base = cached_tiny_model()
    train_set = make_examples(args.train, rng, held_out=False)
    held_out = make_examples(args.heldout, rng, held_out=True)
    adapter = args.adapter
    if adapter is None:
        started = time.monotonic()
        adapter = train_adapter(base, write_jsonl(train_set, work / "train.jsonl"), work / "adapter", args.epochs)
        print(f"trained {adapter} on {len(train_set)} examples in {time.monotonic() - started:.0f}s")
    spec = EngineSpec(
        model=str(base),
        served_model_name="tiny",
        port=free_port(),
        max_loras=1,
        extra_args=("--lora-modules", f"{ADAPTER}={adapter}"),
    )
    engine = EngineProcess(spec, work / "vllm.log")
    engine.start()
    try:
        engine.wait_ready(timeout_s=300)
        rows = evaluate(engine, held_out, args.temperatures, args.seed)
    finally:
        engine.stop()
    print(f"held-out set: {len(held_out)} tickets; contract: {json.dumps(SCHEMA, separators=(',', ':'))}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
