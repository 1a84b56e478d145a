"""Per-request cost of the security middleware, in process: the same small route with and without it.

    .venv/bin/python benchmarks/bench_security.py [--requests 2000] [--rounds 5] [--prompt-chars 200]

Targets: the bare route (twice, so the table shows its own noise), the route behind `SecurityMiddleware` in local
mode (no keys: limits only), and in keyed mode with a key that has rpm and tpm limits (auth, access, quotas, usage
read from the response). Requests go through httpx's ASGI transport, so no socket or engine time is included: the
numbers isolate the middleware. Each round runs the targets in a shuffled order; the table shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request

from adapters_registry.local import LocalStore
from gateway.auth import SecurityMiddleware, SecuritySettings, build_security
from gateway.keys import KeyStore


def make_app(store: LocalStore | None, secured: bool) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        await request.body()
        return {"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}

    if secured:
        app.state.security = build_security(SecuritySettings(), store, base_name="tiny")
        app.add_middleware(SecurityMiddleware)
    return app


async def measure(app: FastAPI, key: str | None, body: dict[str, Any], requests: int) -> float:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as client:
        started = time.perf_counter()
        for _ in range(requests):
            reply = await client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
        return (time.perf_counter() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-chars", type=int, default=200)
    args = parser.parse_args()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x" * args.prompt_chars}], "max_tokens": 16}
    with tempfile.TemporaryDirectory() as tmp:
        local_store = LocalStore(Path(tmp) / "local")
        keyed_store = LocalStore(Path(tmp) / "keyed")
        key = KeyStore(keyed_store).create("bench", rpm=10**9, tpm=10**12).secret
        targets = {
            "bare route": (make_app(None, secured=False), None),
            "bare route (again)": (make_app(None, secured=False), None),
            "middleware, local mode": (make_app(local_store, secured=True), None),
            "middleware, keyed + quotas": (make_app(keyed_store, secured=True), key),
        }
        results: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            order = list(targets)
            random.shuffle(order)
            for name in order:
                app, secret = targets[name]
                results[name].append(asyncio.run(measure(app, secret, body, args.requests)))
    base = statistics.median(results["bare route"])
    print(f"{'target':<30} {'us/request':>11} {'vs bare':>8}")
    for name, samples in results.items():
        median = statistics.median(samples)
        print(f"{name:<30} {median:>11.0f} {median / base:>7.2f}x")


if __name__ == "__main__":
    main()
