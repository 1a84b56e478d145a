"""A key store (the registry's) that stops answering does not stop the gateway: key checks run off the event loop,
and the last record read stands in while the store cannot be read. S3 on loopback (moto), frozen with SIGSTOP."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from gateway.keys import KeyStore
from tests.fakes import FakeEngine, fake_gateway
from tests.fixtures.registry import MotoServer, s3_registry_at

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def test_a_frozen_key_store_neither_blocks_the_gateway_nor_locks_out_known_keys(
    private_moto: MotoServer, registry_template: Path, tmp_path: Path
) -> None:
    registry = s3_registry_at(private_moto.url, registry_template, tmp_path / "cache")
    secret = KeyStore(registry.store, cache_ttl_s=0).create("acme").secret
    headers = {"authorization": f"Bearer {secret}"}
    with FakeEngine() as engine, fake_gateway([engine], registry, security={"key_cache_ttl_s": 1.0}) as (url, _):
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=30).status_code == 200
        private_moto.pause()
        try:
            time.sleep(1.2)  # past the key cache: the next check asks the frozen store (it gives up after ~10 s)
            replies: list[httpx.Response] = []
            asker = threading.Thread(
                target=lambda: replies.append(
                    httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
                )
            )
            asker.start()
            time.sleep(0.5)
            probe = httpx.get(f"{url}/healthz", timeout=5)  # the event loop is free meanwhile
            assert probe.status_code == 200 and not replies  # answered while the chat still waits on the store
            asker.join(60)
            assert replies and replies[0].status_code == 200  # answered from the record read before the freeze
            unknown = httpx.post(
                f"{url}/v1/chat/completions",
                json=CHAT,
                headers={"authorization": "Bearer lg-0123456789ab-" + "A" * 43},
                timeout=60,
            )
            assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "keys_unavailable"
        finally:
            private_moto.resume()
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=30).status_code == 200
