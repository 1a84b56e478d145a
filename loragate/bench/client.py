"""One streamed chat completion over aiohttp, timed: time to the first token, end to end, the usage it reported,
or how it failed.

Failure statuses are the HTTP status as a string ("429", "503"), or one of: "connect_error" (no connection),
"timeout" (no byte for `timeout_s`), "disconnected" (the connection broke mid-answer), "stream_error" (an SSE error
event, as the gateway sends when an engine breaks off), "incomplete" (the stream ended without `[DONE]`),
"client_error" (any other aiohttp error), "cut" (unanswered at the end of a run of limited duration).

After the first token only lines that mention usage or an error are parsed as JSON: the rest are counted, so the
client's cost per token stays a substring test.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

OK = "ok"
CUT = "cut"  # still unanswered when a run of limited duration ended (see runner)


@dataclass(slots=True)
class Record:
    index: int
    url: int  # which of the target's URLs it went to
    late_s: float = 0.0  # sent after its scheduled arrival (open loop; 0 in a closed loop)
    status: str = OK  # or a failure status (module docstring)
    sent_s: float = 0.0  # from the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None  # from the usage, else the content chunks counted
    error: str | None = None
    engine: str | None = None  # the engine a gateway says answered (x-loragate-engine); None from anything else

    @property
    def ok(self) -> bool:
        return self.status == OK


def _has_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or delta.get("tool_calls"):
            return True
    return False


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)[:300]
    except (ValueError, AttributeError):
        pass
    return body[:300].decode("utf-8", "replace")


async def send(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], record: Record, run_start: float
) -> Record:
    """POST `body` to `url` and fill in `record`; never raises for a failed request (only for cancellation)."""
    start = time.perf_counter()
    record.sent_s = start - run_start
    chunks = 0
    done = False
    try:
        async with session.post(url, data=body, headers=headers) as response:
            record.engine = response.headers.get("x-loragate-engine")
            if response.status != 200:
                record.status, record.error = str(response.status), _error_message(await response.read())
                record.e2e_s = time.perf_counter() - start
                return record
            tail = b""
            async for received in response.content.iter_any():  # all that arrived: one await for many events
                *lines, tail = (tail + received).split(b"\n")
                for raw in lines:
                    if not raw.startswith(b"data:"):
                        continue
                    data = raw[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    if record.ttft_s is not None and b'"usage"' not in data and b'"error"' not in data:
                        chunks += 1
                        continue
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        record.status, record.error = "stream_error", _error_message(data)
                        break
                    if _has_token(chunk):
                        if record.ttft_s is None:
                            record.ttft_s = time.perf_counter() - start
                        chunks += 1
                    usage = chunk.get("usage")
                    if usage:
                        record.prompt_tokens = usage.get("prompt_tokens")
                        record.output_tokens = usage.get("completion_tokens")
                if done or record.status != OK:
                    break
    except aiohttp.ClientConnectorError as exc:
        record.status, record.error = "connect_error", str(exc)[:300]
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        record.status, record.error = "disconnected", str(exc)[:300] or type(exc).__name__
    except TimeoutError:
        record.status, record.error = "timeout", "no answer within the read timeout"
    except aiohttp.ClientError as exc:
        record.status, record.error = "client_error", str(exc)[:300] or type(exc).__name__
    except ValueError as exc:  # a data line that is not JSON
        record.status, record.error = "stream_error", f"malformed event: {exc}"[:300]
    record.e2e_s = time.perf_counter() - start
    if record.status == OK and not done:
        record.status, record.error = "incomplete", "the stream ended without [DONE]"
    if record.output_tokens is None and chunks:
        record.output_tokens = chunks
    return record


async def reachable(session: aiohttp.ClientSession, root: str, headers: dict[str, str]) -> str | None:
    """None when `root` answers HTTP at all (any status), else why not."""
    try:
        async with session.get(f"{root}/v1/models", headers=headers, timeout=aiohttp.ClientTimeout(total=10)):
            return None
    except aiohttp.ClientError as exc:
        return str(exc) or type(exc).__name__
    except TimeoutError:
        return "no answer within 10 s"
