"""`loragate train` end to end on the CPU with the tiny model: the shipped recipe must teach the task (LoRA and
QLoRA), the output folder must hold what the issue lists, a published run must show up in the registry with its
metrics, and bad runs (broken loss mask, unservable LoRA config) must be refused with one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loragate.cli import main as loragate_main
from tests.fixtures.training import PUBLISHED_NAME, RECIPES, TrainedRun
from training.tasks import task_rows
from training.tiny_model import CHAT_TEMPLATE, TinyModelSpec, cached_tiny_model

pytestmark = pytest.mark.slow

# The end-of-turn token moved outside {% generation %}: TRL's assistant mask then leaves it out of the loss.
SCHEMA = {
    "type": "object",
    "properties": {"action": {"type": "string", "enum": ["copy", "modify"]}},
    "required": ["action"],
    "additionalProperties": False,
}
BROKEN_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
    "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
)


def _check_run(run: TrainedRun) -> None:
    assert run.metrics["base"]["exact_match"] == 0.0
    assert run.metrics["adapter"]["exact_match"] >= 0.8
    assert run.metrics["adapter"]["stop_rate"] >= 0.8
    assert run.metrics["adapter"]["rows"] == run.metrics["data"]["sizes"]["test"]
    assert set(run.metrics["canary"]) == {"base_loss", "adapter_loss", "delta"}
    files = sorted(p.name for p in run.adapter_dir.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "chat_template.jinja" in files and "metrics.json" in files and "training.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    assert run.info["seed"] == 42
    assert run.info["dataset_hash"].startswith("sha256:") and run.info["dataset_hash"] == run.metrics["data"]["hash"]
    assert run.info["packages"]["trl"] and run.info["packages"]["peft"]
    assert run.info["sft_config"]["warmup_steps"] == 0.03 and run.info["sft_config"]["use_cpu"] is True
    assert run.info["recipe"]["lora"]["r"] == 16
    view = (run.output_dir / "preflight.txt").read_text()
    assert view.count("--- example") == 5 and "[[<|im_end|>]]" in view


def test_lora_recipe_raises_exact_match(tiny_lora_run: TrainedRun) -> None:
    _check_run(tiny_lora_run)
    assert tiny_lora_run.info["recipe"]["quantization"]["enabled"] is False


def test_qlora_recipe_raises_exact_match(tiny_qlora_run: TrainedRun) -> None:
    _check_run(tiny_qlora_run)
    assert tiny_qlora_run.info["recipe"]["quantization"]["enabled"] is True


def test_published_run_shows_in_registry(
    tiny_lora_run: TrainedRun, training_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert loragate_main(["registry", "show", PUBLISHED_NAME, "--json", "--registry", str(training_registry)]) == 0
    shown = json.loads(capsys.readouterr().out)
    training = shown["training"]
    assert training["dataset_hash"] == tiny_lora_run.info["dataset_hash"]
    assert training["metrics"]["exact_match"] == tiny_lora_run.metrics["adapter"]["exact_match"]
    assert training["metrics"]["base_exact_match"] == tiny_lora_run.metrics["base"]["exact_match"]
    assert training["hyperparameters"]["lora"]["r"] == 16
    assert shown["base"] == "tiny-lm" and shown["r"] == 16


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's one-line error (progress bars of model loading may precede it on stderr)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0]
    return errors[0]


def _raw_base_recipe(tmp_path: Path, data: Path, base: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"base: {{path: {base}}}\ndata: {{path: {data}, eval_fraction: 0.2, test_fraction: 0.2}}\n"
        "sft: {num_train_epochs: 1, max_length: 64}\n"
    )
    return recipe


def _messages_jsonl(path: Path, rows: int = 40) -> Path:
    lines = []
    for row in task_rows("topic", rows, seed=5):
        lines.append(json.dumps({"messages": row["prompt"] + row["completion"]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _base_with_template(tmp_path: Path, template: str) -> Path:
    base = tmp_path / "base"
    shutil.copytree(cached_tiny_model(TinyModelSpec()), base)
    (base / "chat_template.jinja").write_text(template)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    return base


def test_preflight_refuses_masked_end_of_turn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _base_with_template(tmp_path, BROKEN_TEMPLATE)
    recipe = _raw_base_recipe(tmp_path, _messages_jsonl(tmp_path / "d.jsonl"), base)
    out = tmp_path / "run"
    assert loragate_main(["train", "--config", str(recipe), "--output-dir", str(out)]) == 2
    error = _error_line(capsys)
    assert error.startswith("error: example 0: the assistant's end-of-turn token is masked out of the loss")
    assert "REFUSED:" in (out / "preflight.txt").read_text()
    assert not (out / "adapter").exists() and not list(out.glob("checkpoints/checkpoint-*"))


def test_preflight_accepts_the_good_template_and_refuses_a_trained_prompt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _base_with_template(tmp_path, CHAT_TEMPLATE)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in task_rows("topic", 40, seed=6)) + "\n")
    recipe = _raw_base_recipe(tmp_path, data, base)
    out = tmp_path / "run"
    status = loragate_main(
        ["train", "--config", str(recipe), "--output-dir", str(out), "--set", "sft.completion_only_loss=false"]
    )
    assert status == 2
    error = _error_line(capsys)
    assert error.startswith("error: example 0: ") and "prompt token(s) are trained on" in error
    assert not (out / "adapter").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.use_dora=true"], "serving lint: DoRA (lora.use_dora) cannot be hot-loaded by vLLM"),
        (["lora.modules_to_save=[lm_head]"], "serving lint: modules_to_save ['lm_head'] trains full module copies"),
        (["lora.r=64"], "serving lint: rank 64 is above the engines' max_lora_rank 16"),
        (["lora.target_modules=[q_proj, w_gate]"], "serving lint: target modules ['w_gate'] do not exist on the base"),
    ],
)
def test_serving_lint_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    sets = [x for o in [*overrides, "base.tiny.pretrain_steps=0"] for x in ("--set", o)]
    argv = ["train", "--config", str(RECIPES / "tiny.yaml"), "--output-dir", str(tmp_path / "run"), *sets]
    assert loragate_main(argv) == 2
    assert _error_line(capsys).startswith(f"error: {message}")
    assert not (tmp_path / "run" / "adapter").exists()


def test_constrained_generation_follows_the_contract(tiny_model: Path, tmp_path: Path) -> None:
    """outlines-constrained generation on a random adapter: every output complies, whatever the weights say."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.evaluate import complies, generate_constrained
    from training.recipe import EvalSpec
    from training.tasks import action_json
    from training.tiny_model import build_random_adapter

    adapter = build_random_adapter(tiny_model, tmp_path / "adapter", seed=3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = action_json(3, seed=0)
    for contract in (
        {"type": "json_schema", "schema": SCHEMA},
        {"type": "choice", "choice": ["yes", "no"]},
        {"type": "regex", "regex": "[a-c]{2}-[0-9]"},
    ):
        texts = generate_constrained(model, tokenizer, rows, EvalSpec(max_new_tokens=24), contract)
        assert len(texts) == 3
        assert all(complies(text, contract) for text in texts), (contract, texts)
