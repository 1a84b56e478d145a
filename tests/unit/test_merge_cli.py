"""`loragate merge` on a real local registry: resolve, merge, register as a base, write deployment snippets; and
its one-line errors (unknown ref, taken base name, refused merge) that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adapters_registry.errors import NotFoundError
from adapters_registry.registry import Registry
from loragate.cli import main
from training.merge import MANIFEST_NAME
from training.tiny_model import build_random_adapter


@pytest.fixture
def pushed(registry: Registry, tiny_model: Path, tmp_path: Path) -> Registry:
    adapter = build_random_adapter(tiny_model, tmp_path / "src-adapter", seed=31)
    registry.push(adapter, "bot", base="tiny")
    return registry


def test_merge_registers_base_and_writes_snippets(
    pushed: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.settings import load_settings

    out = tmp_path / "export" / "bot-merged"
    assert main(["merge", "bot@1", "--out", str(out), "--register", "bot-merged", "--registry", pushed.location]) == 0
    printed = capsys.readouterr().out
    assert "equivalence vs base + adapter (PEFT): greedy agreement" in printed
    assert "registered base 'bot-merged'" in printed

    adapter = pushed.resolve("bot@1")
    tiny = pushed.get_base("tiny")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"] == {
        "adapter": "bot",
        "version": 1,
        "ref": "bot@1",
        "digest": adapter.digest,
        "serving": "lora",
        "base": "tiny",
        "base_fingerprint": tiny.fingerprint,
    }

    merged = pushed.get_base("bot-merged")
    assert merged.merged_from is not None
    assert merged.merged_from["ref"] == "bot@1"
    assert merged.merged_from["equivalence"] == manifest["equivalence"]
    assert pushed.base_dir("bot-merged") == out.resolve()
    assert merged.chat_template_hash == tiny.chat_template_hash

    gateway_yaml = out.parent / "bot-merged.gateway.yaml"
    settings = load_settings(gateway_yaml)
    assert (settings.base, settings.base_name, settings.registry) == ("bot-merged", "bot", pushed.location)
    assert settings.engines.enable_lora is False
    values = yaml.safe_load((out.parent / "bot-merged.helm-values.yaml").read_text())
    assert values["baseModel"] == {"servedName": "bot"}
    assert values["engine"]["model"] == "/models/bot-merged"


def test_unknown_ref_is_one_line_error(pushed: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    assert main(["merge", "nobody", "--out", str(out), "--registry", pushed.location]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nobody" in err and "\n" not in err
    assert not out.exists()


def test_taken_base_name_is_refused_before_merging(
    pushed: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m"
    argv = ["merge", "bot", "--out", str(out), "--register", "tiny", "--registry", pushed.location]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: base 'tiny' already exists in the registry"
    assert not out.exists()


def test_refused_merge_leaves_nothing(pushed: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export" / "m"
    argv = ["merge", "bot", "--out", str(out), "--min-agreement", "1", "--register", "bot-m"]
    assert main([*argv, "--registry", pushed.location]) == 2
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].endswith("FAILED")
    last = captured.err.splitlines()[-1]  # stderr also carries transformers' loading bars
    assert last.startswith("error: merged model disagrees with base + adapter on 0.8% of greedy tokens")
    assert last.endswith("nothing written (--force to export anyway)")
    assert list((tmp_path / "export").iterdir()) == []
    with pytest.raises(NotFoundError):
        pushed.get_base("bot-m")
