"""Sends a workload to each target, round after round, and collects what every request did.

    from loragate.bench.config import BenchConfig, Target
    from loragate.bench.runner import run_bench
    from loragate.bench.workload import WorkloadSpec

    result = run_bench(BenchConfig((Target("gw", ("http://127.0.0.1:8000",)),), WorkloadSpec(adapters=("a", "b"))))
    document = result.to_json()

Each round runs every target once, in an order shuffled from the seed; each run has its own HTTP session (no
connection outlives its run), its own prompts of the same lengths (see `workload.prompt_text`), and reads the
target's `/metrics` before, every `metrics_interval_s` during, and after. Closed loop: `concurrency` clients each
send their next request when the previous one ended. Open loop: each request is sent at its arrival time, however
many are in flight (or at most `concurrency`, and then late). With several URLs a target's requests go to them in
turn, in the order they are sent. With `duration_s` a run sends no request after that many seconds, and the
requests still unanswered `drain_s` later are cut: they are recorded with status "cut" and what they had received
(a collapsed target cannot hold a run for the read timeout of every request in flight); those never sent are not
counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp

from loragate.bench.client import CUT, Record, reachable, send
from loragate.bench.config import BenchConfig, BenchError, Target
from loragate.bench.report import BenchResult, RunResult
from loragate.bench.scrape import Counters, scrape
from loragate.bench.workload import BenchRequest, build_requests, prompt_text

Send = Callable[[BenchRequest, float], Awaitable[None]]
Progress = Callable[[RunResult], None]
# Entered before each run of a target (its warm-up too) and left after it: a benchmark that starts a target
# fresh for every run (a gateway process, engines emptied of adapters) passes one.
Around = Callable[[Target, int], contextlib.AbstractAsyncContextManager[None]]


def run_bench(config: BenchConfig, progress: Progress | None = None, around: Around | None = None) -> BenchResult:
    """`run_bench_async` on an event loop of its own (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_bench_async(config, progress, around))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_bench_async(config, progress, around))


async def run_bench_async(
    config: BenchConfig, progress: Progress | None = None, around: Around | None = None
) -> BenchResult:
    """Every target once per round; `progress` is called after each run. With `around`, each run happens inside
    `around(target, round)`, and the target is checked and warmed up there, at every run."""
    config.check()
    requests = build_requests(config.workload)
    headers = {"content-type": "application/json"}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    warm = requests[: config.warmup]
    if around is None:
        await _check_reachable(config.targets, headers)
        for target in config.targets if warm else ():
            await _run(config, target, warm, headers, salt="warmup", interval_s=None)
    runs: list[RunResult] = []
    orders: list[list[str]] = []
    for round_ in range(config.rounds):
        order = list(config.targets)
        if config.shuffle:
            random.Random(f"{config.workload.seed}:order:{round_}").shuffle(order)
        orders.append([target.name for target in order])
        for position, target in enumerate(order):
            async with around(target, round_) if around is not None else contextlib.nullcontext():
                if around is not None:
                    await _check_reachable([target], headers)
                    if warm:
                        await _run(config, target, warm, headers, f"warmup:{round_}", interval_s=None)
                run = await _run(
                    config,
                    target,
                    requests,
                    headers,
                    f"{config.workload.seed}:{round_}:{target.name}",
                    config.metrics_interval_s,
                )
            run.round, run.position = round_, position
            runs.append(run)
            if progress is not None:
                progress(run)
    return BenchResult(config, requests, runs, orders)


async def _check_reachable(targets: Sequence[Target], headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        for target in targets:
            for url in target.urls:
                why = await reachable(session, url, headers)
                if why is not None:
                    raise BenchError(f"target {target.name}: cannot reach {url}: {why}")


def _body(config: BenchConfig, request: BenchRequest, salt: str) -> bytes:
    body = {
        "model": request.model,
        "messages": [{"role": "user", "content": prompt_text(request, salt)}],
        "max_tokens": request.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"ignore_eos": True} if config.ignore_eos else {}),
        **config.extra_body,
    }
    return json.dumps(body).encode()


async def _run(
    config: BenchConfig,
    target: Target,
    requests: Sequence[BenchRequest],
    headers: dict[str, str],
    salt: str,
    interval_s: float | None,
) -> RunResult:
    bodies = {request.index: _body(config, request, salt) for request in requests}  # built before the clock starts
    urls = [f"{root}/v1/chat/completions" for root in target.urls]
    turn = itertools.count()
    # keepalive below vLLM's (uvicorn's) 5 s, so a connection is never reused just as the server closes it
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=config.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        before = await scrape(session, target.metrics_roots, headers) if interval_s else None
        series: list[tuple[float, Counters]] = []
        cpu0 = time.process_time()
        start = time.perf_counter()
        deadline = start + config.duration_s if config.duration_s is not None else None
        records: list[Record] = []
        in_flight: dict[int, Record] = {}

        async def one(request: BenchRequest, late_s: float) -> None:
            url = next(turn) % len(urls)
            record = in_flight[request.index] = Record(request.index, url, late_s)
            try:
                records.append(await send(session, urls[url], bodies[request.index], headers, record, start))
            finally:
                in_flight.pop(request.index, None)

        async def sample() -> None:
            assert interval_s is not None and before is not None
            while True:
                await asyncio.sleep(interval_s)
                now = await scrape(session, target.metrics_roots, headers)
                if now is not None:
                    series.append((time.perf_counter() - start, now.minus(before)))

        sampler = asyncio.create_task(sample()) if before is not None else None
        if requests[0].at_s is None:
            sending = asyncio.ensure_future(_closed_loop(requests, config.concurrency or 1, one, deadline))
        else:
            sending = asyncio.ensure_future(_open_loop(requests, config.concurrency, one, start, deadline))
        try:
            if deadline is None:
                await sending
            else:
                await _cut_at(sending, deadline + config.drain_s, in_flight, records, start)
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
        duration = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        after = await scrape(session, target.metrics_roots, headers) if before is not None else None
    delta = after.minus(before) if after is not None and before is not None else None
    records.sort(key=lambda r: r.index)
    return RunResult(target.name, 0, 0, duration, cpu, records, delta, series)


async def _cut_at(
    sending: asyncio.Future[None], cut_at: float, in_flight: dict[int, Record], records: list[Record], start: float
) -> None:
    """Wait for `sending` until `cut_at`, then cancel it and record what was still in flight as cut."""
    done, _ = await asyncio.wait([sending], timeout=max(cut_at - time.perf_counter(), 0.0))
    while not done and time.perf_counter() < cut_at:  # the loop's timers may fire up to its clock resolution early
        done, _ = await asyncio.wait([sending], timeout=cut_at - time.perf_counter())
    if done:
        sending.result()
        return
    now = time.perf_counter()
    cut = list(in_flight.values())  # before the cancellation empties it
    sending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    for record in cut:
        record.status, record.error = CUT, "still unanswered when the run's duration and drain ended"
        record.e2e_s = now - start - record.sent_s
        records.append(record)


async def _closed_loop(
    requests: Sequence[BenchRequest], clients: int, one: Send, deadline: float | None = None
) -> None:
    pending = iter(requests)

    async def client() -> None:
        for request in pending:  # shared: each request is taken by one client, in order
            if deadline is not None and time.perf_counter() >= deadline:
                return
            await one(request, 0.0)

    await asyncio.gather(*(client() for _ in range(min(clients, len(requests)))))


async def _open_loop(
    requests: Sequence[BenchRequest], cap: int | None, one: Send, start: float, deadline: float | None = None
) -> None:
    limit = asyncio.Semaphore(cap) if cap else None

    def late(request: BenchRequest) -> float:
        return max(0.0, time.perf_counter() - start - (request.at_s or 0.0))

    async def arrive(request: BenchRequest) -> None:
        if limit is None:
            return await one(request, late(request))
        async with limit:
            return await one(request, late(request))

    tasks = []
    try:
        for request in requests:
            delay = start + (request.at_s or 0.0) - time.perf_counter()
            if deadline is not None and delay > deadline - time.perf_counter():
                break
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(arrive(request)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
