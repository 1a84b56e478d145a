"""Format compliance of a tiny adapter trained to emit JSON, with and without its output contract.

    .venv/bin/python benchmarks/bench_contract.py [--set sft.num_train_epochs=1] [--temperatures 0 1]

Steps: train the recipe training/recipes/tiny-json.yaml with the training module (a tiny base pretrained on local
text, a LoRA adapter answering `{"<verb>":true}`; its JSON schema is the output contract); start one vLLM (CPU)
engine with that base and adapter; send every prompt of the recipe's held-out test split (rows training never saw)
without a constraint, with the contract applied the way the gateway applies it (`gateway.structured.prepare_request`)
and with the schema as an outlines regex that allows optional spaces; print, per temperature and mode, the share of
answers that keep to the contract (parse as JSON, validate against the schema) and the share exactly right.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from outlines_core.json_schema import build_regex_from_schema

from adapters_registry.contract import canonical_json, contract_satisfied, normalize_contract
from gateway.engine_process import EngineProcess, EngineSpec, free_port
from gateway.structured import prepare_request

RECIPE = Path(__file__).resolve().parents[1] / "training" / "recipes" / "tiny-json.yaml"
ADAPTER = "json-adapter"


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]]
    expected: str


@dataclass
class Row:
    mode: str
    temperature: float
    valid: int
    correct: int
    total: int
    tokens: list[int]


async def ask_all(
    url: str,
    examples: list[Example],
    rewrite: Callable[[dict[str, Any]], dict[str, Any]],
    temperature: float,
    seed: int,
) -> list[tuple[str, int]]:
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0, connect=10.0), limits=limits) as client:

        async def ask(i: int, ex: Example) -> tuple[str, int]:
            body: dict[str, Any] = {
                "model": ADAPTER,
                "messages": ex.messages,
                "max_tokens": 32,
                "temperature": temperature,
                "seed": seed + i,
            }
            body = rewrite(body)
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            answer = response.json()
            return answer["choices"][0]["message"]["content"] or "", int(answer["usage"]["completion_tokens"])

        return list(await asyncio.gather(*(ask(i, ex) for i, ex in enumerate(examples))))


def contract_modes(contract: dict[str, Any]) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """How each mode rewrites a request body: not at all; as the gateway does (`prepare_request`: vLLM's JSON grammar,
    compact-only under the engine flag disable_any_whitespace); for a JSON schema also as the regex outlines compiles
    from it with one optional space wherever JSON allows whitespace (the candidate fix for compact-only JSON)."""
    modes: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "without contract": lambda body: body,
        "contract (gateway)": lambda body: prepare_request(body, contract).body,
    }
    if contract["type"] == "json_schema":
        pattern = build_regex_from_schema(canonical_json(contract["schema"]), r"[ ]?")
        modes["contract as outlines regex"] = lambda body: {**body, "structured_outputs": {"regex": pattern}}
    return modes


def judge(text: str, expected: str, contract: dict[str, Any]) -> tuple[bool, bool]:
    valid = contract_satisfied(contract, text)
    correct = text.strip() == expected.strip() or (valid and json.loads(text) == json.loads(expected))
    return valid, correct


def evaluate(
    engine: EngineProcess, examples: list[Example], contract: dict[str, Any], temperatures: list[float], seed: int
) -> list[Row]:
    rows = []
    modes = contract_modes(contract)
    plan = [(mode, t) for t in temperatures for mode in modes]
    random.Random(seed).shuffle(plan)  # no systematic order between the modes
    for mode, temperature in plan:
        answers = asyncio.run(ask_all(engine.url, examples, modes[mode], temperature, seed))
        verdicts = [judge(text, ex.expected, contract) for (text, _), ex in zip(answers, examples, strict=True)]
        rows.append(
            Row(
                mode,
                temperature,
                sum(v for v, _ in verdicts),
                sum(c for _, c in verdicts),
                len(examples),
                [tokens for _, tokens in answers],
            )
        )
    rows.sort(key=lambda r: (r.temperature, list(modes).index(r.mode)))
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'mode':<26} {'temp':>5} {'compliance':>11} {'exact match':>12} {'median tokens':>14}")
    for r in rows:
        print(
            f"{r.mode:<26} {r.temperature:>5.1f} {r.valid / r.total:>10.1%} {r.correct / r.total:>11.1%} "
            f"{statistics.median(r.tokens):>14.0f}   ({r.valid}/{r.total} valid)"
        )


def trained_base(adapter: Path) -> Path | None:
    """The base the adapter was trained on, as the training module recorded it (a recipe edit can change the
    base that `resolve_base` builds today)."""
    info = adapter / "training.json"
    if not info.is_file():
        return None
    path = json.loads(info.read_text()).get("base_path")
    return Path(path) if isinstance(path, str) else None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--heldout", type=int, default=200, help="at most this many held-out rows")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", type=Path, help="an adapter already trained with this recipe (skips training)")
    parser.add_argument("--workdir", type=Path, help="keep the training run and the engine log here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    from training import sft
    from training.base_model import resolve_base
    from training.data import load_rows, make_splits
    from training.evaluate import reference
    from training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if recipe.evaluation.contract is None:
        raise SystemExit(f"{args.recipe}: the recipe has no evaluation.contract to measure compliance against")
    contract = normalize_contract(recipe.evaluation.contract)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-contract-"))
    work.mkdir(parents=True, exist_ok=True)
    test_rows = make_splits(load_rows(recipe.data), recipe.data).test[: args.heldout]
    examples = [
        Example(row["prompt"] if "prompt" in row else row["messages"][:-1], reference(row)) for row in test_rows
    ]
    adapter = args.adapter
    if adapter is None:
        started = time.monotonic()
        adapter = sft.train(recipe, work / "run")
        print(f"trained {adapter} in {time.monotonic() - started:.0f}s")
    base = trained_base(adapter) or resolve_base(recipe.base)
    spec = EngineSpec(
        model=str(base),
        served_model_name="base",
        port=free_port(),
        max_loras=1,
        max_lora_rank=recipe.serving.max_lora_rank,
        extra_args=("--lora-modules", f"{ADAPTER}={adapter}"),
    )
    engine = EngineProcess(spec, work / "vllm.log")
    engine.start()
    try:
        engine.wait_ready(timeout_s=300)
        rows = evaluate(engine, examples, contract, args.temperatures, args.seed)
    finally:
        engine.stop()
    print(f"recipe {args.recipe.name}: {len(examples)} held-out rows; contract {json.dumps(contract)}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
