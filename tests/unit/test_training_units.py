"""Pure parts of training/: recipe defaults and overrides, stable splits and dedupe, serving lint, mask checks,
scoring, and the SFTConfig arguments the tool decides."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from training.data import DataError, dataset_hash, dedupe, make_splits, normalise, read_file, split_of
from training.evaluate import Generation, complies, score
from training.model import sft_kwargs
from training.preflight import MaskedExample, check_example, common_prefix
from training.recipe import DataSpec, LoraSpec, RecipeError, apply_overrides, load_recipe, recipe_from_dict
from training.serving_lint import lint, missing_targets
from training.tasks import ACTION_JSON_CONTRACT, task_rows

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
MINIMAL = {"base": {"path": "/models/x"}, "data": {"path": "/data/x.jsonl"}}


def _pc(prompt: str, answer: str) -> dict[str, object]:
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


# --- recipe -------------------------------------------------------------------------------------------------------


def test_recipe_defaults_are_the_articles() -> None:
    recipe = recipe_from_dict(MINIMAL)
    assert recipe.lora.model_dump() == {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    assert recipe.sft["learning_rate"] == 2e-4
    assert recipe.sft["lr_scheduler_type"] == "cosine"
    assert recipe.sft["warmup_steps"] == 0.03
    assert recipe.sft["num_train_epochs"] == 3
    assert recipe.quantization.model_dump() == {
        "enabled": False,
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
        "upcast_non_quantized": True,
    }


@pytest.mark.parametrize(
    ("overrides", "path", "expected"),
    [
        (["lora.r=8"], ("lora", "r"), 8),
        (["sft.learning_rate=1e-4"], ("sft", "learning_rate"), 1e-4),
        (["lora.target_modules=[q_proj, v_proj]"], ("lora", "target_modules"), ["q_proj", "v_proj"]),
        (["early_stopping.patience=2"], ("early_stopping", "patience"), 2),
        (["name=run one"], ("name",), "run one"),
        (["sft.packing=true"], ("sft", "packing"), True),
    ],
)
def test_overrides(overrides: list[str], path: tuple[str, ...], expected: object) -> None:
    recipe = recipe_from_dict(apply_overrides(MINIMAL, overrides)).model_dump()
    for key in path:
        recipe = recipe[key]
    assert recipe == expected


@pytest.mark.parametrize(
    ("raw", "overrides", "message"),
    [
        (MINIMAL, ["lora.r"], "expected KEY=VALUE"),
        (MINIMAL, ["lora.r=8", "lora.r.x=1"], "'r' is not a section"),
        (MINIMAL, ["lora.rank=4"], "lora.rank: Extra inputs are not permitted"),
        (MINIMAL, ["lora.r=0"], "lora.r: Input should be greater than or equal to 1"),
        ({"base": {"path": "/m"}, "data": {}}, [], "data: Value error, data: give exactly one of `path` or `generate`"),
        ({"base": {"hub": "not a hub id"}, "data": {"path": "/d"}}, [], "base.hub 'not a hub id' is not a hub id"),
        ({"data": {"path": "/d"}}, [], "base: Field required"),
    ],
)
def test_bad_recipes_are_one_line_errors(raw: dict[str, object], overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(apply_overrides(raw, overrides))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_shipped_recipes_load_and_make_their_data() -> None:
    for name in ("tiny.yaml", "tiny-json.yaml"):
        recipe = load_recipe(RECIPES / name)
        assert recipe.base.tiny is not None and recipe.data.generate is not None
        assert recipe.lora.r == 16 and recipe.lora.target_modules == "all-linear"
    json_recipe = load_recipe(RECIPES / "tiny-json.yaml")
    assert json_recipe.evaluation.contract == ACTION_JSON_CONTRACT


def test_load_recipe_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("base: {path: model}\ndata: {path: data/train.jsonl}\n")
    recipe = load_recipe(tmp_path / "r.yaml", ["seed=7"])
    assert recipe.base.path == str(tmp_path / "model")
    assert recipe.data.path == str(tmp_path / "data" / "train.jsonl")
    assert recipe.seed == 7


def test_load_recipe_refuses_non_mapping(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe is a YAML mapping"):
        load_recipe(tmp_path / "r.yaml")


# --- data ---------------------------------------------------------------------------------------------------------


def test_split_is_stable_under_reordering_and_appending() -> None:
    rows = task_rows("topic", 400, seed=1)
    spec = DataSpec(path="/x.jsonl")
    first = {json.dumps(r, sort_keys=True): split_of(r, spec.split_salt, 0.1, 0.1) for r in rows}
    more = list(reversed(rows)) + task_rows("topic", 100, seed=2)
    again = {json.dumps(r, sort_keys=True): split_of(r, spec.split_salt, 0.1, 0.1) for r in more}
    assert all(again[k] == v for k, v in first.items())
    sizes = make_splits(rows, spec).sizes()
    assert sizes == make_splits(list(reversed(rows)), spec).sizes()
    assert sum(sizes.values()) == len({json.dumps(r, sort_keys=True) for r in rows})


def test_same_prompt_never_straddles_splits() -> None:
    spec = DataSpec(path="/x.jsonl")
    rows = [_pc(f"question {i}", answer) for i in range(200) for answer in ("a", "b")]
    splits = make_splits(rows, spec)
    seen: dict[str, set[str]] = {}
    for name in ("train", "eval", "test"):
        for row in getattr(splits, name):
            seen.setdefault(row["prompt"][0]["content"], set()).add(name)
    assert all(len(names) == 1 for names in seen.values())


def test_dedupe_within_splits_only() -> None:
    spec = DataSpec(path="/x.jsonl")
    rows = [_pc(f"q{i}", "a") for i in range(100)]
    splits = make_splits(rows + rows[:30], spec)
    assert sum(splits.sizes().values()) == 100
    assert sum(splits.duplicates_removed.values()) == 30
    kept, removed = dedupe([{"a": 1}, {"a": 1}, {"a": 2}])
    assert (kept, removed) == ([{"a": 1}, {"a": 2}], 1)
    no_dedupe = make_splits(rows + rows[:30], DataSpec(path="/x.jsonl", dedupe=False))
    assert sum(no_dedupe.sizes().values()) == 130


def test_dataset_hash_changes_with_content_only() -> None:
    spec = DataSpec(path="/x.jsonl")
    rows = task_rows("topic", 200, seed=3)
    assert dataset_hash(make_splits(rows, spec)) == dataset_hash(make_splits(list(reversed(rows)), spec))
    changed = [*rows[:-1], _pc("something new", "license")]
    assert dataset_hash(make_splits(rows, spec)) != dataset_hash(make_splits(changed, spec))


def test_small_eval_split_warns(caplog: pytest.LogCaptureFixture) -> None:
    make_splits(task_rows("topic", 200, seed=0), DataSpec(path="/x.jsonl"))
    assert "eval split has" in caplog.text and "< 200" in caplog.text


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"text": "hi"}, "messages", "expected `messages` or `prompt` + `completion`"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "the last message must be the assistant's"),
        ({"messages": "hi"}, "messages", "expected a non-empty list of messages"),
        ({"messages": [{"role": "user"}]}, "messages", "string `role` and `content`"),
        (_pc("a", "b"), "messages", "a prompt_completion row in a messages dataset"),
        ({"prompt": "a", "completion": [{"role": "user", "content": "b"}]}, "prompt_completion", "assistant's"),
    ],
)
def test_bad_rows(row: dict[str, object], fmt: str, message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        normalise(row, fmt, "train row 0")  # type: ignore[arg-type]


def test_plain_prompt_completion_is_wrapped() -> None:
    assert normalise({"prompt": "hi", "completion": "yo"}, "prompt_completion", "r") == _pc("hi", "yo")


def test_read_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        read_file(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n[1]\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: each line must be a JSON object"):
        read_file(path)
    with pytest.raises(DataError, match="no such file"):
        read_file(tmp_path / "missing.jsonl")


def test_read_local_datasets_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]))
    assert read_file(path) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


# --- serving lint -------------------------------------------------------------------------------------------------

MODULES = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"}


@pytest.mark.parametrize(
    ("lora", "merge_only", "expected"),
    [
        (LoraSpec(), False, []),
        (LoraSpec(use_dora=True), False, ["DoRA (lora.use_dora) cannot be hot-loaded by vLLM"]),
        (
            LoraSpec(modules_to_save=["lm_head"]),
            False,
            ["modules_to_save ['lm_head'] trains full module copies vLLM cannot load"],
        ),
        (LoraSpec(r=32), False, ["rank 32 is above the engines' max_lora_rank 16"]),
        (LoraSpec(bias="all"), False, ["lora.bias='all' trains biases vLLM's LoRA layers ignore"]),
        (LoraSpec(r=32, use_dora=True), True, []),
        (
            LoraSpec(target_modules=["q_proj", "gate_projx"]),
            False,
            ["target modules ['gate_projx'] do not exist on the base"],
        ),
        (LoraSpec(target_modules=["nope"]), True, ["target modules ['nope'] do not exist on the base"]),
    ],
)
def test_serving_lint(lora: LoraSpec, merge_only: bool, expected: list[str]) -> None:
    assert lint(lora, 16, MODULES, merge_only) == expected


def test_missing_targets_accepts_dotted_suffixes() -> None:
    assert missing_targets(["self_attn.q_proj", "up_proj"], MODULES) == []
    assert missing_targets("all-linear", set()) == []
    assert missing_targets("k_proj", MODULES) == ["k_proj"]


# --- preflight checks ---------------------------------------------------------------------------------------------

EOS = 9


@pytest.mark.parametrize(
    ("ids", "trained", "prompt_len", "expected"),
    [
        ([1, 2, 3, 4, EOS], [0, 0, 0, 1, 1], 3, []),
        ([1, 2, 3, 4, EOS], [0, 1, 0, 1, 1], 3, ["1 prompt token(s) are trained on"]),
        ([1, 2, 3, 4, EOS], [0, 0, 0, 1, 0], 3, ["end-of-turn token is masked out of the loss"]),
        ([1, 2, 3, 4, 5], [0, 0, 0, 1, 1], 3, ["emits no end-of-turn token"]),
        ([1, 2, 3, 4, EOS], [0, 0, 0, 0, 0], 3, ["no token of the assistant's answer", "end-of-turn token is masked"]),
    ],
)
def test_check_example(ids: list[int], trained: list[int], prompt_len: int, expected: list[str]) -> None:
    problems = check_example(MaskedExample(ids, [bool(t) for t in trained], prompt_len), {EOS}, 0)
    assert len(problems) == len(expected)
    for problem, fragment in zip(problems, expected, strict=True):
        assert problem.startswith("example 0: ") and fragment in problem


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


# --- scoring ------------------------------------------------------------------------------------------------------

SCHEMA = {"type": "json_schema", "schema": ACTION_JSON_CONTRACT}


@pytest.mark.parametrize(
    ("text", "contract", "ok"),
    [
        ('{"copy": true}', SCHEMA, True),
        ('{"steal": true}', SCHEMA, False),
        ('{"copy": false}', SCHEMA, False),
        ("{}", SCHEMA, False),
        ('{"copy": true, "modify": true}', SCHEMA, False),
        ('{"copy": true', SCHEMA, False),
        ("AB-12", {"type": "regex", "regex": "[A-Z]+-[0-9]+"}, True),
        ("AB-12x", {"type": "regex", "regex": "[A-Z]+-[0-9]+"}, False),
        ("yes", {"type": "choice", "choice": ["yes", "no"]}, True),
        ("maybe", {"type": "choice", "choice": ["yes", "no"]}, False),
    ],
)
def test_complies(text: str, contract: dict[str, object], ok: bool) -> None:
    assert complies(text, contract) is ok


def test_score() -> None:
    rows = [_pc("a", '{"copy": true}'), _pc("b", '{"modify": true}'), _pc("c", '{"publish": true}')]
    gens = [Generation('{"copy": true}', True), Generation('{"copy": true}', True), Generation("{", False)]
    assert score(gens, rows, SCHEMA) == {"exact_match": 1 / 3, "stop_rate": 2 / 3, "format_compliance": 2 / 3}
    assert score(gens, rows, None) == {"exact_match": 1 / 3, "stop_rate": 2 / 3}


# --- SFTConfig arguments ------------------------------------------------------------------------------------------


def test_sft_kwargs_cpu_and_early_stopping(tmp_path: Path) -> None:
    recipe = recipe_from_dict(
        apply_overrides(MINIMAL, ["early_stopping.patience=2", "early_stopping.metric=exact_match"])
    )
    kwargs = sft_kwargs(recipe, tmp_path, "messages", gpu=False)
    assert kwargs["use_cpu"] is True and kwargs["bf16"] is False
    assert kwargs["assistant_only_loss"] is True
    assert (kwargs["metric_for_best_model"], kwargs["greater_is_better"]) == ("eval_exact_match", True)
    assert kwargs["load_best_model_at_end"] is True
    assert kwargs["output_dir"] == str(tmp_path) and kwargs["report_to"] == []
    loss = sft_kwargs(recipe_from_dict(apply_overrides(MINIMAL, ["early_stopping.patience=1"])), tmp_path, "x", True)
    assert (loss["metric_for_best_model"], loss["greater_is_better"]) == ("eval_loss", False)
    assert "use_cpu" not in loss and "assistant_only_loss" not in loss


def test_sft_kwargs_refuse_managed_keys(tmp_path: Path) -> None:
    recipe = recipe_from_dict(apply_overrides(MINIMAL, ["sft.output_dir=/elsewhere"]))
    with pytest.raises(RecipeError, match=r"sft.output_dir is set by loragate train"):
        sft_kwargs(recipe, tmp_path, "messages", gpu=False)
