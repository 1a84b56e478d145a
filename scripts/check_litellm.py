"""litellm's calls through the gateway (run by scripts/check_litellm.sh, in litellm's own virtualenv)."""

import importlib.metadata
import sys

import litellm

litellm.suppress_debug_info = True

url, model, tools_model = sys.argv[1], sys.argv[2], sys.argv[3]
common = {"api_base": url, "api_key": "none", "max_tokens": 8}
checks: list[tuple[str, str, str]] = []  # (name, "ok" | "FAIL" | "skip", detail)


def check(name, call, verdict):
    try:
        result = call()
    except litellm.exceptions.BadRequestError as e:
        if "tool-call-parser" in str(e):  # the engines run without a tool parser: nothing to check there
            checks.append((name, "skip", "the engines have no tool parser (engines.tool_call_parser)"))
        else:
            checks.append((name, "FAIL", str(e).splitlines()[0][:200]))
        return
    except Exception as e:  # one line per failed call
        checks.append((name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        return
    ok, detail = verdict(result)
    checks.append((name, "ok" if ok else "FAIL", detail))


hello = [{"role": "user", "content": "Hello"}]
check(
    "completion",
    lambda: litellm.completion(model=f"hosted_vllm/{model}", messages=hello, **common),
    lambda r: (bool(r.choices[0].message.content), r.model),
)
check(
    "streamed completion",
    lambda: list(litellm.completion(model=f"hosted_vllm/{model}", messages=hello, stream=True, **common)),
    lambda chunks: (len(chunks) > 1, f"{len(chunks)} chunks"),
)
check(
    "responses",
    lambda: litellm.responses(
        model=f"openai/{model}", input="Hello", api_base=url, api_key="none", max_output_tokens=8
    ),
    lambda r: (r.status in ("completed", "incomplete") and bool(r.output), f"status {r.status}"),
)
no_arguments = {"type": "object", "properties": {}, "additionalProperties": False}
tool = {"type": "function", "function": {"name": "lookup", "parameters": no_arguments}}
check(
    "tool call",
    lambda: litellm.completion(
        model=f"hosted_vllm/{tools_model}",
        messages=[{"role": "user", "content": "Look it up"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        api_base=url,
        api_key="none",
        max_tokens=96,
    ),
    lambda r: (
        bool(r.choices[0].message.tool_calls) and r.choices[0].message.tool_calls[0].function.name == "lookup",
        f"finish_reason {r.choices[0].finish_reason}",
    ),
)

for name, verdict, detail in checks:
    print(f"{verdict:4} {name} {detail}")
print(f"litellm {importlib.metadata.version('litellm')}")
sys.exit(0 if all(verdict != "FAIL" for _, verdict, _ in checks) else 1)
