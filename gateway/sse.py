"""What the gateway reads from an engine's SSE stream on the way through: usage, and the answer when a hook wants it.

The relay holds back only an incomplete trailing event (engines write whole events, so in practice nothing waits)
and looks inside a block of complete events only when it must: an event that carries usage (`"usage"` found by a
byte search, which for chat and completions is the last one), or every event when a hook checks the answer. The
usage-only event that the gateway asked for on its own (`with_usage`: the client did not) is dropped before the
client sees it.
"""

from __future__ import annotations

import json
from typing import Any

USAGE_MARK = b'"usage"'
DONE = b"data: [DONE]"
# The Responses API's last event of a stream (there is no `[DONE]`): the answer is whole
RESPONSES_ENDS = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')


def with_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Ask the engine for a final usage event (token accounting); True when the client did not ask for it."""
    options = body.get("stream_options")
    options = options if isinstance(options, dict) else {}
    if options.get("include_usage"):
        return body, False
    return {**body, "stream_options": {**options, "include_usage": True}}, True


def usage_counts(usage: Any) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of a chat/completions `usage` or a Responses `usage` (input/output tokens)."""
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (prompt if isinstance(prompt, int) else None), (completion if isinstance(completion, int) else None)


class StreamScan:
    def __init__(self, *, strip_usage: bool, collect_text: bool) -> None:
        self.strip_usage = strip_usage
        self.collect_text = collect_text
        self.usage: dict[str, Any] | None = None
        self.events = 0
        self.done = False  # the `[DONE]` sentinel (or the Responses API's final event) passed: the answer is whole
        self.texts: dict[int, list[str]] = {}
        self.finish_reasons: dict[int, str | None] = {}
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of `chunk` to relay now (complete events, maybe with one usage-only event dropped)."""
        data = self._carry + chunk
        cut = data.rfind(b"\n\n")
        if cut == -1:
            self._carry = data
            return b""
        block, self._carry = data[: cut + 2], data[cut + 2 :]
        self.events += block.count(b"\n\n")
        if self.collect_text or USAGE_MARK in block:
            block = self._inspect(block)
        if not self.done and (DONE in block or any(end in block for end in RESPONSES_ENDS)):
            self.done = True
        return block

    def rest(self) -> bytes:
        """What is left at the end of the stream (an unterminated last event), relayed as it is."""
        rest, self._carry = self._carry, b""
        return rest

    def _inspect(self, block: bytes) -> bytes:
        kept: list[bytes] = []
        dropped = False
        for event in block.split(b"\n\n")[:-1]:
            data = _event_data(event)
            if data is None:
                kept.append(event)
                continue
            try:
                parsed = json.loads(data)
            except ValueError:
                kept.append(event)
                continue
            if not isinstance(parsed, dict):
                kept.append(event)
                continue
            usage = parsed.get("usage")
            if not isinstance(usage, dict) and isinstance(parsed.get("response"), dict):
                usage = parsed["response"].get("usage")  # the Responses API's response.completed
            if isinstance(usage, dict):
                self.usage = usage
                if self.strip_usage and parsed.get("choices") == []:
                    dropped = True
                    continue
            if self.collect_text:
                self._collect(parsed)
            kept.append(event)
        if not dropped:
            return block
        return b"".join(event + b"\n\n" for event in kept)

    def _collect(self, event: dict[str, Any]) -> None:
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = int(choice.get("index", 0))
            piece = choice.get("text")
            if piece is None:
                piece = (choice.get("delta") or {}).get("content")
            if piece:
                self.texts.setdefault(index, []).append(piece)
            if choice.get("finish_reason") is not None:
                self.finish_reasons[index] = choice["finish_reason"]

    def answer(self, route: str) -> dict[str, Any]:
        """The streamed answer assembled as the non-streamed body would read (choices and usage)."""
        choices = []
        for index in sorted(self.texts.keys() | self.finish_reasons.keys()):
            text = "".join(self.texts.get(index, []))
            content = {"message": {"role": "assistant", "content": text}} if route == "chat" else {"text": text}
            choices.append({"index": index, "finish_reason": self.finish_reasons.get(index), **content})
        return {"choices": choices, "usage": self.usage}


def _event_data(event: bytes) -> bytes | None:
    """The `data:` payload of one SSE event (None for a comment or an event without data, and for `[DONE]`)."""
    lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    data = b"\n".join(line[5:].lstrip(b" ") for line in lines)
    return None if data == b"[DONE]" else data


def error_event(message: str, type_: str, code: str) -> bytes:
    """An SSE event the OpenAI SDKs raise as an APIError: how a stream the gateway must end says why."""
    payload = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
