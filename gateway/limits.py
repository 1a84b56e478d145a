"""Input limits: caps on body size, headers, JSON depth and the generation fields of OpenAI requests.

The checks are pure functions over plain values; `LimitViolation.message` names the limit and its configured
value (never the user's text), and `param` names the offending field, as in OpenAI's error envelope. The JSON
depth is measured on the raw bytes before parsing, so a deeply nested body cannot reach the parser's recursion.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field


class LimitSettings(BaseModel):
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    max_headers: int = Field(default=64, ge=1)
    max_header_bytes: int = Field(default=16 * 1024, ge=1)
    max_json_depth: int = Field(default=32, ge=2)
    max_tokens: int = Field(default=4096, ge=1)
    max_n: int = Field(default=8, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    max_messages: int = Field(default=512, ge=1)
    max_stop_sequences: int = Field(default=4, ge=0)
    max_stop_chars: int = Field(default=256, ge=1)


@dataclass(frozen=True)
class LimitViolation:
    limit: str
    value: int
    param: str | None
    status: int = 400

    @property
    def message(self) -> str:
        what = {
            "max_body_bytes": "request body is larger than",
            "max_headers": "request has more headers than",
            "max_header_bytes": "request headers are larger than",
            "max_json_depth": "JSON body is nested deeper than",
            "max_tokens": "max_tokens is above",
            "max_n": "n is above",
            "max_prompt_chars": "prompt is longer than",
            "max_messages": "request has more messages than",
            "max_stop_sequences": "stop has more sequences than",
            "max_stop_chars": "a stop sequence is longer than",
        }[self.limit]
        return f"{what} the gateway limit {self.limit}={self.value}"


def check_headers(headers: Iterable[tuple[bytes, bytes]], limits: LimitSettings) -> LimitViolation | None:
    count = 0
    size = 0
    for name, value in headers:
        count += 1
        size += len(name) + len(value) + 4
    if count > limits.max_headers:
        return LimitViolation("max_headers", limits.max_headers, None, status=431)
    if size > limits.max_header_bytes:
        return LimitViolation("max_header_bytes", limits.max_header_bytes, None, status=431)
    return None


def check_body_size(size: int, limits: LimitSettings) -> LimitViolation | None:
    if size > limits.max_body_bytes:
        return LimitViolation("max_body_bytes", limits.max_body_bytes, None)
    return None


_JSON_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted without parsing (strings skipped)."""
    depth = deepest = 0
    in_string = False
    escaped_at = -1  # the position right after a backslash inside a string
    for match in _JSON_STRUCTURE.finditer(raw):  # jumps over plain text at C speed
        position = match.start()
        byte = raw[position]
        if in_string:
            if position == escaped_at:
                continue
            if byte == 0x5C:  # backslash: the next byte is escaped
                escaped_at = position + 1
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def check_json_depth(raw: bytes, limits: LimitSettings) -> LimitViolation | None:
    if raw.count(b"[") + raw.count(b"{") <= limits.max_json_depth:  # cannot be deeper: skip the scan
        return None
    if json_depth(raw) > limits.max_json_depth:
        return LimitViolation("max_json_depth", limits.max_json_depth, None)
    return None


def _text_length(content: Any) -> int:
    """Characters of text in a prompt, a message content, or a list of content parts / token ids."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(_text_length(part) for part in content)
    if isinstance(content, Mapping):
        text = content.get("text")
        return len(text) if isinstance(text, str) else 0
    if isinstance(content, int) and not isinstance(content, bool):
        return 1  # a token id of a pre-tokenised prompt
    return 0


def prompt_length(body: Mapping[str, Any]) -> int:
    """Characters of prompt text in a chat, completions or Responses API body."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(_text_length(m.get("content")) for m in messages if isinstance(m, Mapping))
    if "input" in body:  # Responses: a string or a list of items (messages, whose content is text or parts)
        items = body["input"]
        total = _text_length(body.get("instructions"))
        if isinstance(items, list):
            return total + sum(_text_length(i.get("content")) if isinstance(i, Mapping) else 0 for i in items)
        return total + _text_length(items)
    return _text_length(body.get("prompt"))


def _numeric_field(body: Mapping[str, Any], name: str) -> float | None:
    """A number field as the engine's lax validation would read it: 5, 5.0 and "5" all mean 5."""
    value = body.get(name)
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def check_generation(body: Mapping[str, Any], limits: LimitSettings) -> LimitViolation | None:
    """Caps on a chat or completions request body; other wrong types are left to the engine's validation."""
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = _numeric_field(body, name)
        if value is not None and value > limits.max_tokens:
            return LimitViolation("max_tokens", limits.max_tokens, name)
    n = _numeric_field(body, "n")
    if n is not None and n > limits.max_n:
        return LimitViolation("max_n", limits.max_n, "n")
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        return LimitViolation("max_messages", limits.max_messages, "messages")
    if prompt_length(body) > limits.max_prompt_chars:
        param = "messages" if messages else "input" if "input" in body else "prompt"
        return LimitViolation("max_prompt_chars", limits.max_prompt_chars, param)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > limits.max_stop_sequences:
        return LimitViolation("max_stop_sequences", limits.max_stop_sequences, "stop")
    if any(isinstance(s, str) and len(s) > limits.max_stop_chars for s in stops):
        return LimitViolation("max_stop_chars", limits.max_stop_chars, "stop")
    return None
