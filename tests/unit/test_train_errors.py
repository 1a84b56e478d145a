"""What `loragate train` reports: a `TrainingError` raised inside a run as one line (exit status 2), and any other
exception (a ValueError from transformers included) as itself, traceback and all, never as a user error."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.cli import main as loragate_main
from training.checks import CheckError
from training.data import DataError
from training.errors import TrainingError
from training.merge import MergeError, MergeRefused
from training.plan import PlanError
from training.preflight import PreflightError
from training.publish import PublishError
from training.recipe import RecipeError
from training.serving_lint import LintError


def test_every_training_error_is_in_the_tree() -> None:
    for error in (RecipeError, DataError, LintError, PlanError, PreflightError, CheckError, PublishError, MergeError):
        assert error.__bases__ == (TrainingError,)
    assert MergeRefused.__bases__ == (MergeError,)


def _recipe(tmp_path: Path, base: Path, data: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {{path: {base}}}\ndata: {{path: {data}}}\nsft: {{num_train_epochs: 1, max_length: 64}}\n")
    return recipe


def test_a_training_error_inside_a_run_is_one_line(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.jsonl"
    argv = ["train", "--config", str(_recipe(tmp_path, tiny_model, missing)), "--output-dir", str(tmp_path / "run")]
    assert loragate_main(argv) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such file or directory\n"


def test_a_value_error_from_a_library_keeps_its_traceback(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoConfig

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug inside transformers")

    monkeypatch.setattr(AutoConfig, "from_pretrained", broken)  # the first library call of a run (serving lint)
    data = tmp_path / "d.jsonl"
    data.write_text("")
    argv = ["train", "--config", str(_recipe(tmp_path, tiny_model, data)), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"^a bug inside transformers$") as raised:
        loragate_main(argv)
    assert not isinstance(raised.value, TrainingError)
    assert "error:" not in capsys.readouterr().err
