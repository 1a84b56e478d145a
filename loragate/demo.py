"""`loragate demo`: the whole path on the embedded default (tiny local model, vLLM on the CPU).

Today: build the tiny base, make a LoRA adapter, start vLLM with `--enable-lora`, and send one chat completion
to the base model and one to the adapter through the official OpenAI client.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Say something about free software."


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="run the end-to-end demo on the tiny local model (CPU)")
    demo.add_argument("--workdir", type=Path, default=None, help="keep artefacts here (default: a temp folder)")
    demo.set_defaults(handler=run)


def _step(message: str) -> float:
    print(f"==> {message}", flush=True)
    return time.monotonic()


def run(args: argparse.Namespace) -> int:
    import openai

    from gateway.engine_process import EngineProcess, EngineSpec, free_port
    from loragate.tiny_model import build_random_adapter, cached_tiny_model

    with tempfile.TemporaryDirectory(prefix="loragate-demo-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = _step("building the tiny base model (cached by content)")
        base = cached_tiny_model()
        print(f"    {base} ({time.monotonic() - t:.1f}s)")
        t = _step("making a LoRA adapter with PEFT")
        adapter = work / "adapter-demo"
        if not (adapter / "adapter_config.json").exists():
            build_random_adapter(base, adapter, seed=7)
        print(f"    {adapter} ({time.monotonic() - t:.1f}s)")

        spec = EngineSpec(
            model=str(base),
            served_model_name="tiny",
            port=free_port(),
            extra_args=("--lora-modules", f"demo-adapter={adapter}"),
        )
        engine = EngineProcess(spec, work / "vllm.log")
        t = _step(f"starting vLLM (CPU) on {spec.url} with --enable-lora (about 40s; log: {engine.log_path})")
        engine.start()
        try:
            engine.wait_ready()
            print(f"    ready ({time.monotonic() - t:.1f}s)")
            client = openai.OpenAI(base_url=f"{spec.url}/v1", api_key="local")
            for model in ("tiny", "demo-adapter"):
                reply = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": PROMPT}],
                    max_tokens=24,
                    temperature=0,
                )
                print(f"--- model={model!r}\n{reply.choices[0].message.content!r}")
        finally:
            _step("stopping vLLM")
            engine.stop()
    return 0
