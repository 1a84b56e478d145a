"""Runs that stop early. One killed mid-way resumes from its last whole checkpoint when re-run with the same output
folder (a checkpoint cut short by the kill, with no readable trainer state, is skipped, not loaded); one whose eval
loss stops improving is ended by early stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.training import RECIPES, train_with_cli
from training.sft import last_complete_checkpoint

STEPS_PER_EPOCH = 92  # tiny.yaml: 736 training rows, batch 8


def checkpoint(folder: Path, step: int, state: str | None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_last_complete_checkpoint_skips_what_a_kill_cut_short(tmp_path: Path) -> None:
    assert last_complete_checkpoint(tmp_path / "missing") is None
    assert last_complete_checkpoint(tmp_path) is None
    whole = checkpoint(tmp_path, 9, '{"global_step": 9}')
    checkpoint(tmp_path, 10, '{"global_step": 10}')
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    checkpoint(tmp_path, 30, None)  # killed before the state was written
    checkpoint(tmp_path, 100, '{"global_st')  # killed while writing it
    (tmp_path / "checkpoint-200").write_text("a file, not a checkpoint")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(tmp_path) == whole  # numeric order, not name order


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_whole_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first_epoch = out / "checkpoints" / f"checkpoint-{STEPS_PER_EPOCH}"
    cli = "from loragate.cli import main; raise SystemExit(main())"
    command = [sys.executable, "-c", cli, "train", "--config", str(RECIPES / "tiny.yaml")]
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen([*command, "--output-dir", str(out)], stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (first_epoch / "trainer_state.json").is_file():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after the first epoch"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "adapter").exists()  # killed before the end
    console = (tmp_path / "first.log").read_text()
    assert "step 10/276: loss" in console  # each trainer log reaches the console once, as a log line,
    assert "{'loss'" not in console  # not again as transformers' printed dict
    checkpoint(out / "checkpoints", 150, None)  # a save the kill cut short

    run = train_with_cli(out)

    text = (out / "train.log").read_text()
    assert f"resuming from {first_epoch}" in text
    assert "skipping incomplete checkpoint" in text
    state = json.loads((out / "checkpoints" / f"checkpoint-{3 * STEPS_PER_EPOCH}" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 * STEPS_PER_EPOCH
    assert run.metrics["adapter"]["exact_match"] >= 0.8


@pytest.mark.slow
def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Epoch 1 sets the best eval loss; epoch 2 cannot beat it by 100 nats, so patience 1 is spent after epoch 2.
    run = train_with_cli(out, "--set", "early_stopping.patience=1", "--set", "early_stopping.threshold=100")
    assert run.metrics["train"]["epoch"] == 2.0
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert f"checkpoint-{2 * STEPS_PER_EPOCH}" in saved and f"checkpoint-{3 * STEPS_PER_EPOCH}" not in saved
    assert run.info["sft_config"]["load_best_model_at_end"] is True
    assert run.info["sft_config"]["metric_for_best_model"] == "eval_loss"
