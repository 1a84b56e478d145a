"""An adapter trained on another base of the same shapes (a base and its instruct or fine-tuned variant): refused at
push with both names, by its config's `base_model_name_or_path` or by that model's fingerprint, unless accepted
explicitly, which the manifest records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adapters_registry.errors import ValidationError
from adapters_registry.registry import Registry
from loragate.cli import main

CONFIG = "adapter_config.json"
FIX = "or pass --allow-base-mismatch to accept it (recorded in the manifest)"


def _declaring(src: Path, dest: Path, declared: str) -> Path:
    """A copy of the adapter `src` whose adapter_config.json says it was trained on `declared`."""
    shutil.copytree(src, dest)
    config = json.loads((dest / CONFIG).read_text())
    config["base_model_name_or_path"] = declared
    (dest / CONFIG).write_text(json.dumps(config))
    return dest


@pytest.fixture
def instruct(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny base's "instruct variant": same architecture and shapes, another chat template."""
    out = tmp_path / "models" / "tiny-instruct"
    shutil.copytree(tiny_model, out)
    (out / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    return out


@pytest.fixture
def finetuned(tiny_model: Path, tmp_path: Path) -> Path:
    """A full fine-tune of the tiny base: config, tokenizer and template identical, weights different."""
    out = tmp_path / "models" / "tiny-ft"
    shutil.copytree(tiny_model, out)
    tensors = load_file(out / "model.safetensors")
    tensors = {k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture
def bases(registry: Registry, instruct: Path, finetuned: Path) -> Registry:
    registry.add_base(instruct, "tiny-instruct")  # registered by path
    registry.add_base(finetuned, "tiny-ft", copy=True)  # weights copied in: the registry keeps no path for it
    return registry


def _refusal(reg: Registry, adapter: Path, **kw: bool) -> str:
    with pytest.raises(ValidationError) as info:
        reg.push(adapter, "support", "tiny", **kw)
    assert reg.store.list_keys("adapters/") == []
    return str(info.value)


def test_a_config_naming_another_registered_base_is_refused_with_both_names(
    bases: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    by_name = _declaring(adapter_dirs[0], tmp_path / "by-name", "tiny-instruct")
    assert _refusal(bases, by_name) == (
        f"{by_name / CONFIG}: base_model_name_or_path 'tiny-instruct' names base 'tiny-instruct' (by its name), but "
        f"the push binds the adapter to base 'tiny' (same shapes, another model): push with --base tiny-instruct, {FIX}"
    )
    hub_id = _declaring(adapter_dirs[0], tmp_path / "hub-id", "someorg/TINY-FT")  # a hub id, another case
    assert _refusal(bases, hub_id) == (
        f"{hub_id / CONFIG}: base_model_name_or_path 'someorg/TINY-FT' names base 'tiny-ft' (by its name), but "
        f"the push binds the adapter to base 'tiny' (same shapes, another model): push with --base tiny-ft, {FIX}"
    )


def test_a_config_pointing_at_another_base_by_path_is_refused(
    bases: Registry, adapter_dirs: list[Path], instruct: Path, tmp_path: Path
) -> None:
    adapter = _declaring(adapter_dirs[0], tmp_path / "by-path", str(instruct))
    assert _refusal(bases, adapter, check_effect=True) == (  # --check-effect does not let it through either
        f"{adapter / CONFIG}: base_model_name_or_path '{instruct}' names base 'tiny-instruct' (by its path), but "
        f"the push binds the adapter to base 'tiny' (same shapes, another model): push with --base tiny-instruct, {FIX}"
    )
    assert bases.push(adapter, "support", "tiny-instruct").base == "tiny-instruct"  # on its own base it is fine


def test_the_fingerprint_of_the_declared_model_tells_variants_apart(
    bases: Registry, adapter_dirs: list[Path], instruct: Path, finetuned: Path, tmp_path: Path
) -> None:
    template_copy = tmp_path / "elsewhere" / "instruct-copy"  # a copy of the instruct model, under another path
    shutil.copytree(instruct, template_copy)
    adapter = _declaring(adapter_dirs[0], tmp_path / "a1", str(template_copy))
    assert _refusal(bases, adapter) == (
        f"{adapter / CONFIG}: base_model_name_or_path '{template_copy}' is a model directory with the fingerprint of "
        "base 'tiny-instruct' (chat template differ from base 'tiny'), but the push binds the adapter to base 'tiny' "
        f"(same shapes, another model): push with --base tiny-instruct, {FIX}"
    )
    weights_copy = tmp_path / "elsewhere" / "ft-copy"  # only the weights tell this one from the bound base
    shutil.copytree(finetuned, weights_copy)
    adapter = _declaring(adapter_dirs[0], tmp_path / "a2", str(weights_copy))
    assert _refusal(bases, adapter, check_effect=True) == (
        f"{adapter / CONFIG}: base_model_name_or_path '{weights_copy}' is a model directory with the fingerprint of "
        "base 'tiny-ft' (weights differ from base 'tiny'), but the push binds the adapter to base 'tiny' "
        f"(same shapes, another model): push with --base tiny-ft, {FIX}"
    )


def test_an_unregistered_model_of_the_same_shapes_is_refused(
    registry: Registry, adapter_dirs: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    other = tmp_path / "models" / "other"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    adapter = _declaring(adapter_dirs[0], tmp_path / "a", str(other))
    assert _refusal(registry, adapter) == (
        f"{adapter / CONFIG}: base_model_name_or_path '{other}' is a model directory that is not base 'tiny' "
        "(config differ from base 'tiny'), but the push binds the adapter to base 'tiny' (same shapes, another "
        f"model): register it (loragate registry base add {other} --name NAME) and push with --base NAME, {FIX}"
    )


def test_matching_or_uncheckable_declarations_pass(
    bases: Registry, adapter_dirs: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    assert bases.push(adapter_dirs[0], "own-path", "tiny").base_mismatch is None  # declares tiny's own path
    copy = tmp_path / "elsewhere" / "tiny-copy"  # the same model under another path: same fingerprint, weights too
    shutil.copytree(tiny_model, copy)
    assert bases.push(_declaring(adapter_dirs[0], tmp_path / "a", str(copy)), "copy", "tiny").base_mismatch is None
    hub = _declaring(adapter_dirs[0], tmp_path / "b", "meta-llama/Llama-3.1-8B")  # no registered base has that name
    assert bases.push(hub, "hub", "tiny").base_mismatch is None


def test_an_accepted_mismatch_is_recorded(
    bases: Registry, adapter_dirs: list[Path], instruct: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = _declaring(adapter_dirs[0], tmp_path / "a", str(instruct))
    loc = ["--registry", bases.location]
    assert main(["registry", "push", str(adapter), "--name", "support", "--base", "tiny", *loc]) == 2
    assert capsys.readouterr().err == (
        f"error: {adapter / CONFIG}: base_model_name_or_path '{instruct}' names base 'tiny-instruct' (by its path), "
        "but the push binds the adapter to base 'tiny' (same shapes, another model): push with --base "
        f"tiny-instruct, {FIX}\n"
    )
    argv = ["registry", "push", str(adapter), "--name", "support", "--base", "tiny", "--allow-base-mismatch", *loc]
    assert main(argv) == 0
    manifest = bases.resolve("support@1")
    assert capsys.readouterr().out == (
        f"support@1 {manifest.digest} (base mismatch accepted: adapter_config.json names '{instruct}')\n"
    )
    from adapters_registry.manifest import BaseMismatch

    assert manifest.base_mismatch == BaseMismatch(declared=str(instruct), evidence="path", names=["tiny-instruct"])
    assert main(["registry", "show", "support@1", "--json", *loc]) == 0
    shown = json.loads(capsys.readouterr().out)["base_mismatch"]
    assert shown == {"declared": str(instruct), "evidence": "path", "names": ["tiny-instruct"], "differs": []}


@pytest.mark.parametrize(
    ("declared", "names"),
    [
        ("tiny-instruct", ["tiny-instruct"]),
        ("Org/Tiny-Instruct", ["tiny-instruct"]),
        ("/mnt/other-machine/models/tiny-instruct/", ["tiny-instruct"]),
        ("/data/Llama-3-8B", ["llama"]),  # the last part of a registered path counts as its name
        ("tiny", ["tiny"]),
        ("tinyish", []),
        ("meta-llama/Llama-3-8B-Instruct", []),
    ],
)
def test_names_a_declaration_matches(declared: str, names: list[str], registry: Registry) -> None:
    from adapters_registry.provenance import named_by_name

    tiny = registry.get_base("tiny")
    llama = tiny.model_copy(update={"name": "llama", "path": "/models/Llama-3-8B"})
    instruct = tiny.model_copy(update={"name": "tiny-instruct", "path": None})
    assert named_by_name(declared, [tiny, llama, instruct]) == names


def test_differing_parts(registry: Registry) -> None:
    from adapters_registry.provenance import differing

    tiny = registry.get_base("tiny")
    assert differing(tiny, tiny) == []
    other = tiny.model_copy(update={"hidden_size": 256, "chat_template_hash": "sha256:00", "weights_hash": None})
    assert differing(other, tiny) == ["sizes", "chat template"]  # weights: one side lacks them, not compared
