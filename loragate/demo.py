"""`loragate demo` (`make demo`): the whole product on the embedded default, a tiny local model and vLLM on the CPU.

    loragate demo                       # artefacts in a temp folder, removed at the end
    loragate demo --workdir demo-run    # kept; a second run reuses the trained adapters
    loragate demo --keep-serving        # leave the gateways up at the end (Ctrl-C stops them)

Steps: build the tiny base (briefly pre-trained); train two LoRA adapters with `training.sft` on two small tasks
(topic labels; an action as JSON with an output contract) and publish them to a registry; start the gateway over
one vLLM CPU engine with --enable-lora; ask the base and each adapter the same held-out questions with the official
openai client; show the JSON contract at work; merge the topic adapter, serve the merged model without LoRA under
the adapter's name, and compare; print where the metrics are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_registry.errors import RegistryError
from training.errors import TrainingError

if TYPE_CHECKING:
    import openai

    from gateway.settings import Settings

# What `loragate demo` prints as one line (`error: ...`, exit status 2) instead of a traceback.
USER_ERRORS = (TrainingError, RegistryError)

TOPIC, ACTION = "topic", "action-json"
RECIPES = {TOPIC: "tiny.yaml", ACTION: "tiny-json.yaml"}
HELD_OUT_SEED = 2026
QUESTIONS = 6
CONTRACT_SAMPLES = 6
CONTRACT_TEMPERATURE = 1.5


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="run the end-to-end demo on the tiny local model (CPU, a few minutes)")
    demo.add_argument("--workdir", type=Path, default=None, help="keep artefacts here (default: a temp folder)")
    demo.add_argument("--keep-serving", action="store_true", help="keep the gateways running at the end")
    demo.add_argument("--engine-deadline", type=float, default=900.0, help="seconds a vLLM engine may take to start")
    demo.set_defaults(handler=run, log_level=logging.INFO)


# ---- pure helpers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    messages: list[dict[str, str]]
    expected: str

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def questions(task: str, n: int = QUESTIONS, seed: int = HELD_OUT_SEED) -> list[Question]:
    """Fresh samples of a training task (another seed than the training data)."""
    from training.tasks import task_rows

    return [Question(row["prompt"], row["completion"][0]["content"]) for row in task_rows(task, n, seed)]


def same_answer(answer: str, expected: str) -> bool:
    """Equal text, or equal JSON values (constrained decoding drops the spaces the training data had)."""
    if answer.strip() == expected.strip():
        return True
    try:
        return bool(json.loads(answer) == json.loads(expected))
    except ValueError:
        return False


def score(answers: Sequence[str], expected: Sequence[str]) -> int:
    return sum(same_answer(a, e) for a, e in zip(answers, expected, strict=True))


def valid_for(text: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def recipes_dir() -> Path:
    import training.recipe

    return Path(training.recipe.__file__).parent / "recipes"


def clip(text: str, width: int = 28) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "~"


# ---- the gateway in this process ----------------------------------------------------------------------------


@contextmanager
def running_gateway(settings: Settings, name: str = "gateway") -> Iterator[str]:
    """Serve `create_app(settings)` with uvicorn on a thread until the block ends; yields its URL once the engines
    are healthy. The engines are the gateway's children and stop with it."""
    import httpx

    from gateway.app import create_app
    from gateway.server import gateway_server

    app = create_app(settings)
    server = gateway_server(app, host=settings.host, port=settings.port, log_level="warning")
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    try:
        deadline = time.monotonic() + settings.engines.start_timeout_s + 60
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                engines = httpx.get(f"{url}/admin/engines", timeout=5).json()["engines"]
                if engines and all(e["healthy"] for e in engines):
                    break
            if not thread.is_alive():
                raise RuntimeError(f"{name} exited during start-up (engine logs: {settings.engines.log_dir})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: engines not healthy (engine logs: {settings.engines.log_dir})")
            time.sleep(0.5)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=120)


# ---- the demo -----------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, work: Path, engine_deadline: float) -> None:
        self.work = work
        self.registry = work / "registry"
        self.logs = work / "logs"
        self.engine_deadline = engine_deadline
        self.base_name = "tiny-lm"
        self.steps = 8
        self.step_no = 0

    def step(self, title: str) -> float:
        self.step_no += 1
        print(f"\n[{self.step_no}/{self.steps}] {title}", flush=True)
        return time.monotonic()

    @staticmethod
    def done(started: float, detail: str = "") -> None:
        print(f"    done in {time.monotonic() - started:.0f}s{': ' + detail if detail else ''}", flush=True)

    def settings(self, **fields: Any) -> Settings:
        from gateway.engine_process import free_port
        from gateway.settings import load_settings

        engines = {"count": 1, "log_dir": self.logs, "start_timeout_s": self.engine_deadline}
        engines.update(fields.pop("engines", {}))
        return load_settings(fields.pop("config", None), port=free_port(), engines=engines, **fields)

    def train(self) -> dict[str, Any]:
        from training.recipe import load_recipe
        from training.sft import run as train_run

        results = {}
        for name, recipe_file in RECIPES.items():
            t = self.step(f"training adapter {name!r} with training/recipes/{recipe_file} (LoRA, TRL SFTTrainer)")
            result = train_run(
                load_recipe(recipes_dir() / recipe_file),
                self.work / "runs" / name,
                publish=name,
                registry=str(self.registry),
            )
            m = result.metrics
            detail = (
                f"published {result.manifest_ref}; held-out exact match base {m['base']['exact_match']:.2f} "
                f"-> adapter {m['adapter']['exact_match']:.2f}"
            )
            if "format_compliance" in m.get("adapter", {}):
                detail += f", JSON contract compliance {m['adapter']['format_compliance']:.2f}"
            self.done(t, detail)
            results[name] = result
        return results

    def run(self, keep_serving: bool) -> int:
        import openai

        from adapters_registry import open_registry

        t = self.step("building the tiny base model (2-layer Llama, tokenizer trained on local text, pre-trained)")
        from training.base_model import resolve_base
        from training.recipe import load_recipe

        base_spec = load_recipe(recipes_dir() / RECIPES[TOPIC]).base
        self.done(t, str(resolve_base(base_spec)))
        self.train()
        base_name = self.base_name = str(base_spec.name)
        reg = open_registry(self.registry)
        print(f"    registry {self.registry}: " + ", ".join(f"{m.ref} ({m.serving})" for m in reg.list_adapters()))

        with contextlib.ExitStack() as stack:
            t = self.step(f"starting the gateway over one vLLM CPU engine with --enable-lora (logs: {self.logs})")
            url = stack.enter_context(running_gateway(self.settings(base=base_name, registry=str(self.registry))))
            self.done(t, f"{url}/v1 serves {base_name!r} and every registered adapter by name")
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo")
            print("    models: " + ", ".join(m.id for m in client.models.list().data))

            t = self.step("asking the base and each adapter the same held-out questions (official openai client)")
            topic_answers = self.compare(client, base_name)
            self.done(t)

            t = self.step(
                f"the output contract of {ACTION!r}: stored with the adapter, enforced and checked by the gateway"
            )
            self.contract(client)
            self.done(t)

            t = self.step(f"merging {TOPIC!r} into its base and serving it without LoRA under the name {TOPIC!r}")
            merged_url = self.merge_and_serve(stack)
            merged = openai.OpenAI(base_url=f"{merged_url}/v1", api_key="demo")
            answers = [self.ask(merged, TOPIC, q.messages)[0] for q in questions(TOPIC)]
            same = sum(a == b for a, b in zip(answers, topic_answers, strict=True))
            print(f"    merged model at {merged_url}/v1: {same}/{len(answers)} answers identical to base + adapter")
            for q, a in zip(questions(TOPIC), answers, strict=True):
                print(f"    {clip(q.text, 40):40}  merged: {a!r}")
            self.done(t)

            t = self.step("metrics")
            self.metrics(url)
            self.done(t)
            if keep_serving:
                print(f"\ngateways up: {url}/v1 (base + adapters), {merged_url}/v1 (merged {TOPIC}); Ctrl-C stops them")
                with contextlib.suppress(KeyboardInterrupt):
                    threading.Event().wait()
            print("\nstopping the gateways and their engines", flush=True)
        print("demo finished")
        return 0

    @staticmethod
    def ask(
        client: openai.OpenAI,
        model: str,
        messages: list[dict[str, str]],
        temperature: float = 0.0,
        max_tokens: int = 16,
        **kw: Any,
    ) -> tuple[str, dict[str, str]]:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=temperature,
            **kw,
        )
        reply = raw.parse()
        return (reply.choices[0].message.content or "").strip(), dict(raw.headers)

    def compare(self, client: openai.OpenAI, base_name: str) -> list[str]:
        topic_answers: list[str] = []
        for task in (TOPIC, ACTION):
            qs = questions(task)
            print(f"\n    task {task!r}: {len(qs)} fresh questions")
            print(f"    {'question':40}  {'expected':22}  {'base ' + base_name:24}  adapter {task}")
            answers = {model: [self.ask(client, model, q.messages)[0] for q in qs] for model in (base_name, task)}
            for i, q in enumerate(qs):
                print(
                    f"    {clip(q.text, 40):40}  {clip(q.expected, 22):22}  {clip(answers[base_name][i], 24):24}  "
                    f"{clip(answers[task][i], 30)}"
                )
            expected = [q.expected for q in qs]
            print(
                f"    correct: base {score(answers[base_name], expected)}/{len(qs)}, "
                f"adapter {task!r} {score(answers[task], expected)}/{len(qs)}"
            )
            if task == TOPIC:
                topic_answers = answers[task]
        return topic_answers

    def contract(self, client: openai.OpenAI) -> None:
        from adapters_registry import open_registry

        contract = open_registry(self.registry).resolve(ACTION).contract or {}
        schema = contract.get("schema", {})
        print(f"    contract in the registry: {json.dumps(schema, separators=(',', ':'))}")
        question = questions(ACTION, 1, seed=HELD_OUT_SEED + 1)[0]
        print(f"    {CONTRACT_SAMPLES} samples at temperature {CONTRACT_TEMPERATURE} for {question.text!r}:")
        modes: list[tuple[str, dict[str, Any]]] = [
            ("contract off (response_format text)", {"response_format": {"type": "text"}}),
            ("contract on (the default)          ", {}),
        ]
        for label, extra in modes:
            texts, flags = [], []
            for seed in range(CONTRACT_SAMPLES):
                text, headers = self.ask(
                    client, ACTION, question.messages, temperature=CONTRACT_TEMPERATURE, seed=seed, **extra
                )
                texts.append(text)
                flags.append(headers.get("x-loragate-output-valid", "-"))
            valid = sum(valid_for(t, schema) for t in texts)
            example = next((t for t in texts if not valid_for(t, schema)), texts[0])
            print(
                f"      {label}: {valid}/{len(texts)} match the schema, e.g. {clip(example, 34)!r}; "
                f"x-loragate-output-valid: {','.join(flags)}"
            )
        # The mechanism behind it is constrained decoding: the same schema forces even the untrained base into shape.
        print(f"    the base model {self.base_name!r}, greedy, same question:")
        free, _ = self.ask(client, self.base_name, question.messages)
        fmt = {"type": "json_schema", "json_schema": {"name": "contract", "schema": schema}}
        held, headers = self.ask(client, self.base_name, question.messages, max_tokens=64, response_format=fmt)
        print(f"      no constraint:                      {clip(free, 34)!r}  matches: {valid_for(free, schema)}")
        print(
            f"      response_format = the same schema:  {clip(held, 34)!r}  matches: {valid_for(held, schema)}, "
            f"x-loragate-output-valid: {headers.get('x-loragate-output-valid', '-')}"
        )

    def merge_and_serve(self, stack: contextlib.ExitStack) -> str:
        from training.merge import MergeOptions
        from training.merge_cli import merge_registered

        out = self.work / "merged" / f"{TOPIC}-merged"
        with contextlib.suppress(Exception):
            # A kept workdir may hold an earlier export; registry bases are immutable, so reuse both as they are.
            from adapters_registry import open_registry

            open_registry(self.registry).get_base(f"{TOPIC}-merged")
            if out.is_dir():
                print(f"    reusing {out} (registered as base '{TOPIC}-merged' by an earlier run)")
                return self._serve_merged(stack, out)
        merge_registered(
            str(self.registry), TOPIC, out, MergeOptions(), register=f"{TOPIC}-merged", say=lambda s: print(f"    {s}")
        )
        return self._serve_merged(stack, out)

    def _serve_merged(self, stack: contextlib.ExitStack, out: Path) -> str:
        config = out.parent / f"{TOPIC}-merged.gateway.yaml"
        settings = self.settings(config=config)
        print(f"    starting a second gateway from {config.name} (engines.enable_lora: {settings.engines.enable_lora})")
        return stack.enter_context(running_gateway(settings, name="merged-gateway"))

    @staticmethod
    def metrics(url: str) -> None:
        import httpx

        text = httpx.get(f"{url}/metrics", timeout=10).text
        shown = [
            line
            for line in text.splitlines()
            if line.startswith(("loragate_requests_total{", "loragate_adapter_loads_total{"))
        ]
        for line in shown[:10]:
            print(f"    {line}")
        print(f"    Prometheus metrics: {url}/metrics (per adapter: requests, tokens, latency, TTFT, loads)")
        print("    Grafana: deploy/grafana/loragate.json (docker compose -f deploy/compose.yaml up, then :3000)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The demo prints its own summary of each step; the trainers' progress bars stay. INFO records still reach each
    # run's train.log, not the console; the "Loading weights" bar of every model load and the dataset preparation
    # bars go.
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # the console; a FileHandler is a StreamHandler subclass
            handler.setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loragate-demo-")))
        else:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        print(f"loragate demo: working in {work}")
        return Demo(work, args.engine_deadline).run(args.keep_serving)
