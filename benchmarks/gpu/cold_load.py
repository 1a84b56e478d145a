"""A cold adapter's first token: through the gateway, against vLLM's own load call plus first token.

    python benchmarks/gpu/cold_load.py --engine-url URL --gateway-url URL --direct-dirs D1,D2,... --cold a,b,...

`--direct-dirs` are adapter folders the engine has never loaded: each is loaded with vLLM's runtime API
(`/v1/load_lora_adapter`) and asked for one streamed token, timed from the load call to the first token.
`--cold` are adapters in the gateway's registry that no engine holds: each is asked for one streamed token through
the gateway, timed to the first token (the gateway resolves, materializes, loads and forwards). The two kinds
alternate, so both see the same engine. Prints the medians and the gateway's part; `--json` keeps every sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

PROMPT = [{"role": "user", "content": "Say one word."}]


def first_token_s(client: httpx.Client, url: str, model: str, started: float) -> float:
    body = {"model": model, "messages": PROMPT, "max_tokens": 1, "stream": True, "temperature": 0}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                return time.perf_counter() - started
    raise RuntimeError(f"{model}: no token")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--engine-url", required=True)
    parser.add_argument("--gateway-url", required=True)
    parser.add_argument("--direct-dirs", required=True, help="comma-separated adapter folders, never loaded")
    parser.add_argument("--cold", required=True, help="comma-separated registry adapters, on no engine")
    parser.add_argument("--json")
    args = parser.parse_args()
    dirs = [Path(d) for d in args.direct_dirs.split(",") if d]
    cold = [name for name in args.cold.split(",") if name]
    direct: list[dict[str, float]] = []
    through: list[float] = []
    with httpx.Client() as client:
        for i, (folder, name) in enumerate(zip(dirs, cold, strict=False)):
            started = time.perf_counter()
            load = client.post(
                f"{args.engine_url}/v1/load_lora_adapter",
                json={"lora_name": f"direct-{i}", "lora_path": str(folder)},
                timeout=120,
            )
            load.raise_for_status()
            loaded = time.perf_counter() - started
            total = first_token_s(client, args.engine_url, f"direct-{i}", started)
            direct.append({"load_s": loaded, "first_token_s": total})
            through.append(first_token_s(client, args.gateway_url, name, time.perf_counter()))
    direct_p50 = statistics.median(d["first_token_s"] for d in direct)
    load_p50 = statistics.median(d["load_s"] for d in direct)
    gateway_p50 = statistics.median(through)
    print(f"cold adapter, first streamed token (p50 of {len(through)}):")
    print(f"  vLLM direct: load call {load_p50 * 1000:.1f} ms, load + first token {direct_p50 * 1000:.1f} ms")
    own = 1000 * (gateway_p50 - direct_p50)
    print(f"  through the gateway: {gateway_p50 * 1000:.1f} ms  (the gateway's own part {own:+.1f} ms)")
    print("  samples ms: direct " + " ".join(f"{d['first_token_s'] * 1000:.0f}" for d in direct))
    print("              gateway " + " ".join(f"{t * 1000:.0f}" for t in through))
    if args.json:
        Path(args.json).write_text(json.dumps({"direct": direct, "gateway_first_token_s": through}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
