"""Input limits: pure checks with the limit's name in every message."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.limits import (
    LimitSettings,
    LimitViolation,
    check_body_size,
    check_generation,
    check_headers,
    check_json_depth,
    json_depth,
    prompt_length,
)

LIMITS = LimitSettings(
    max_body_bytes=100, max_headers=3, max_header_bytes=40, max_json_depth=3, max_tokens=64, max_n=2,
    max_prompt_chars=10, max_messages=3, max_stop_sequences=2, max_stop_chars=5,
)  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"1", 0),
        (b"{}", 1),
        (b'{"a": [1, {"b": 2}]}', 3),
        (b'{"a": "[[[[{{{{"}', 1),
        (b'{"a": "\\"[[["}', 1),
        (b'{"a": "\\\\", "b": [[]]}', 3),
        (b"[" * 5000 + b"]" * 5000, 5000),
        (b'["\\\\", ["\\"[["]]', 2),  # an escaped backslash ends the escape; an escaped quote stays in the string
        (b'[{"k": "{{{{\\u005b"}, [[]]]', 3),
        (b"", 0),
    ],
)
def test_json_depth(raw: bytes, depth: int) -> None:
    assert json_depth(raw) == depth


def test_check_json_depth() -> None:
    assert check_json_depth(b"[[[]]]", LIMITS) is None
    assert check_json_depth(b"[[[[]]]]", LIMITS) == LimitViolation("max_json_depth", 3, None)
    assert check_json_depth(b'[[["[[[[[[["]]]', LIMITS) is None  # brackets in strings do not count
    assert check_json_depth(b"[[], [], [], [], []]", LIMITS) is None


@pytest.mark.parametrize(
    ("headers", "violation"),
    [
        ([(b"a", b"1")], None),
        ([(b"a", b"1")] * 4, LimitViolation("max_headers", 3, None, status=431)),
        ([(b"a", b"x" * 40)], LimitViolation("max_header_bytes", 40, None, status=431)),
    ],
)
def test_check_headers(headers: list[tuple[bytes, bytes]], violation: LimitViolation | None) -> None:
    assert check_headers(headers, LIMITS) == violation


def test_check_body_size() -> None:
    assert check_body_size(100, LIMITS) is None
    violation = check_body_size(101, LIMITS)
    assert violation == LimitViolation("max_body_bytes", 100, None)
    assert violation.message == "request body is larger than the gateway limit max_body_bytes=100"


@pytest.mark.parametrize(
    ("body", "violation"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "n": 2, "stop": ["a", "b"]}, None),
        ({"max_tokens": 65}, LimitViolation("max_tokens", 64, "max_tokens")),
        ({"max_completion_tokens": 65}, LimitViolation("max_tokens", 64, "max_completion_tokens")),
        ({"max_tokens": "many"}, None),  # wrong types are the engine's validation
        ({"max_tokens": True}, None),
        # the engine's lax validation reads 1e9 and "65" as integers: so does the limit (found by the fuzzer)
        ({"max_tokens": 1e9}, LimitViolation("max_tokens", 64, "max_tokens")),
        ({"max_tokens": " 65 "}, LimitViolation("max_tokens", 64, "max_tokens")),
        ({"max_tokens": "64"}, None),
        ({"n": "3"}, LimitViolation("max_n", 2, "n")),
        ({"n": 2.0}, None),
        ({"n": 3}, LimitViolation("max_n", 2, "n")),
        ({"messages": [{"content": "x"}] * 4}, LimitViolation("max_messages", 3, "messages")),
        (
            {"messages": [{"content": "123456"}, {"content": "12345"}]},
            LimitViolation("max_prompt_chars", 10, "messages"),
        ),
        ({"prompt": "12345678901"}, LimitViolation("max_prompt_chars", 10, "prompt")),
        ({"prompt": ["12345", "123456"]}, LimitViolation("max_prompt_chars", 10, "prompt")),
        ({"prompt": list(range(11))}, LimitViolation("max_prompt_chars", 10, "prompt")),
        (
            {"messages": [{"content": [{"type": "text", "text": "12345678901"}]}]},
            LimitViolation("max_prompt_chars", 10, "messages"),
        ),
        ({"stop": ["a", "b", "c"]}, LimitViolation("max_stop_sequences", 2, "stop")),
        ({"stop": "abcdef"}, LimitViolation("max_stop_chars", 5, "stop")),
        ({"stop": None}, None),
    ],
)
def test_check_generation(body: dict[str, Any], violation: LimitViolation | None) -> None:
    assert check_generation(body, LIMITS) == violation


def test_messages_name_the_limit_not_the_text() -> None:
    violation = check_generation({"prompt": "secret customer text!"}, LIMITS)
    assert violation is not None
    assert violation.message == "prompt is longer than the gateway limit max_prompt_chars=10"
    assert "secret" not in violation.message


def test_prompt_length_ignores_non_text() -> None:
    assert prompt_length({"messages": [{"content": None}, "junk", {"content": {"text": "abc"}}]}) == 3
    assert prompt_length({}) == 0
