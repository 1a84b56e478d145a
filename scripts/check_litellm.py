"""litellm's calls through the gateway (run by scripts/check_litellm.sh, in litellm's own virtualenv)."""

import sys

import litellm

url, model, tools_model = sys.argv[1], sys.argv[2], sys.argv[3]
common = {"api_base": url, "api_key": "none", "max_tokens": 8}
checks = []

reply = litellm.completion(model=f"hosted_vllm/{model}", messages=[{"role": "user", "content": "Hello"}], **common)
checks.append(("completion", bool(reply.choices[0].message.content), reply.model))

chunks = litellm.completion(
    model=f"hosted_vllm/{model}", messages=[{"role": "user", "content": "Hello"}], stream=True, **common
)
checks.append(("streamed completion", sum(1 for _ in chunks) > 1, ""))

response = litellm.responses(model=f"openai/{model}", input="Hello", api_base=url, api_key="none", max_output_tokens=8)
checks.append(("responses", response.status == "completed", getattr(response, "model", "")))

tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
called = litellm.completion(
    model=f"hosted_vllm/{tools_model}",
    messages=[{"role": "user", "content": "Look it up"}],
    tools=[tool],
    tool_choice={"type": "function", "function": {"name": "lookup"}},
    api_base=url,
    api_key="none",
    max_tokens=64,
)
calls = called.choices[0].message.tool_calls or []
checks.append(("tool call", bool(calls) and calls[0].function.name == "lookup", ""))

for name, ok, detail in checks:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
print(f"litellm {litellm.__version__ if hasattr(litellm, '__version__') else ''}")
sys.exit(0 if all(ok for _, ok, _ in checks) else 1)
