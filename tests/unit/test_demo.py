"""The demo's pure helpers: held-out questions, scoring, JSON checks, clipping; and its CLI registration."""

from __future__ import annotations

import pytest

from loragate.cli import make_parser
from loragate.demo import Question, clip, questions, recipes_dir, same_answer, score, valid_for
from training.tasks import ACTION_JSON_CONTRACT, task_rows


def test_questions_are_fresh_samples_of_the_task() -> None:
    qs = questions("topic", n=4, seed=7)
    assert qs == [Question(r["prompt"], r["completion"][0]["content"]) for r in task_rows("topic", 4, 7)]
    assert all(q.text.startswith("Topic: ") for q in qs)
    assert questions("topic", n=4, seed=7) == qs  # deterministic
    assert questions("topic", n=4, seed=8) != qs


def test_json_questions_expect_the_contract_shape() -> None:
    assert all(valid_for(q.expected, ACTION_JSON_CONTRACT) for q in questions("action-json", n=5))


@pytest.mark.parametrize(
    ("answers", "expected", "correct"),
    [
        (["a", "b"], ["a", "b"], 2),
        ([" a\n", "c"], ["a", "b"], 1),
        (["", ""], ["a", "b"], 0),
        (['{"action":"copy"}', '{"action":"copy"}'], ['{"action": "copy"}', '{"action": "modify"}'], 1),
    ],
)
def test_score(answers: list[str], expected: list[str], correct: int) -> None:
    assert score(answers, expected) == correct


def test_score_needs_equal_lengths() -> None:
    with pytest.raises(ValueError):
        score(["a"], ["a", "b"])


@pytest.mark.parametrize(
    ("text", "width", "expected"),
    [("short", 10, "short"), ("a  b\nc", 10, "a b c"), ("abcdefghijkl", 6, "abcde~")],
)
def test_clip(text: str, width: int, expected: str) -> None:
    assert clip(text, width) == expected


def test_demo_subcommand_and_recipes() -> None:
    args = make_parser().parse_args(["demo", "--workdir", "w", "--keep-serving"])
    assert (str(args.workdir), args.keep_serving, args.engine_deadline) == ("w", True, 900.0)
    assert {"tiny.yaml", "tiny-json.yaml"} <= {p.name for p in recipes_dir().iterdir()}


@pytest.mark.parametrize(
    ("answer", "expected", "same"),
    [("copy", "copy", True), ('{"a":1}', '{"a": 1}', True), ('{"a":1}', '{"a": 2}', False), ("1", "1.0", True)],
)
def test_same_answer(answer: str, expected: str, same: bool) -> None:
    assert same_answer(answer, expected) is same


SCHEMA = {"type": "object", "properties": {"action": {"enum": ["copy"]}}, "required": ["action"]}


@pytest.mark.parametrize(
    ("text", "valid"), [('{"action":"copy"}', True), ('{"action":"fly"}', False), ("{}", False), ("copy", False)]
)
def test_valid_for(text: str, valid: bool) -> None:
    assert valid_for(text, SCHEMA) is valid
