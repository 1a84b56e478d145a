"""The local registry end to end: push, resolve, aliases, remove, verify, materialize, bases, effect check."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from adapters_registry.errors import ConflictError, IntegrityError, NotFoundError, ValidationError
from adapters_registry.layout import blob_key
from adapters_registry.push import PushStage
from adapters_registry.registry import Registry
from adapters_registry.verify import verify_registry


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _variant(src: Path, dest: Path, text: str) -> Path:
    """A copy of `src` whose content (its README) differs, so it is a distinct version."""
    shutil.copytree(src, dest)
    (dest / "README.md").write_text(text)
    return dest


def test_push_records_the_content_and_metadata(registry: Registry, adapter_dirs: list[Path]) -> None:
    src = adapter_dirs[0]
    m = registry.push(
        src,
        "support",
        "tiny",
        training={"dataset_hash": "sha256:00", "hyperparameters": {"lr": 0.0002}, "metrics": {"eval_loss": 1.5}},
        description="first",
        labels={"team": "cx"},
        contract={"choice": ["yes", "no"]},
    )
    files = sorted(p.name for p in src.iterdir())
    assert (m.name, m.version, m.ref, m.base) == ("support", 1, "support@1", "tiny")
    assert m.files == {f: _sha(src / f) for f in files}
    assert m.size_bytes == sum((src / f).stat().st_size for f in files)
    listing = json.dumps(sorted(m.files.items()), separators=(",", ":")).encode()
    assert m.digest == "sha256:" + hashlib.sha256(listing).hexdigest()
    assert m.engine_name == f"support@{m.digest_hex[:12]}"
    assert m.base_fingerprint == registry.get_base("tiny").fingerprint
    assert m.source == str(src.resolve())
    assert (m.description, m.labels, m.contract) == (
        "first",
        {"team": "cx"},
        {"type": "choice", "choice": ["yes", "no"]},
    )
    assert m.training == {"dataset_hash": "sha256:00", "hyperparameters": {"lr": 0.0002}, "metrics": {"eval_loss": 1.5}}
    assert registry.resolve("support@1") == m


def test_identical_content_reports_the_existing_version(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    first = registry.push(adapter_dirs[0], "support", "tiny")
    assert registry.push(adapter_dirs[0], "support", "tiny", description="again") == first
    second = registry.push(_variant(adapter_dirs[0], tmp_path / "v2", "changed"), "support", "tiny")
    with_contract = registry.push(adapter_dirs[0], "support", "tiny", contract={"regex": "[a-z]+"})
    assert [first.version, second.version, with_contract.version] == [1, 2, 3]
    assert with_contract.digest == first.digest


def test_references_resolve(registry: Registry, adapter_dirs: list[Path]) -> None:
    one = registry.push(adapter_dirs[0], "support", "tiny")
    two = registry.push(adapter_dirs[1], "support", "tiny")
    registry.promote("support@1", "prod")
    assert registry.resolve("support") == two
    assert registry.resolve("support:latest") == two
    assert registry.resolve("support@1") == one
    assert registry.resolve("support:prod") == one
    assert registry.resolve(f"support@sha256:{two.digest_hex[:10]}") == two
    assert registry.resolve(f"support@sha256:{one.digest_hex}") == one
    assert [m.ref for m in registry.list_adapters()] == ["support@1", "support@2"]


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nobody", "adapter 'nobody' not found in {root}"),
        ("support@9", "support@9 does not exist"),
        ("support:prod", "support:prod: 'support' has no alias 'prod'"),
        ("support@sha256:000000", "support@sha256:000000: no version of 'support' has that digest"),
    ],
)
def test_unknown_references(registry: Registry, adapter_dirs: list[Path], ref: str, message: str) -> None:
    registry.push(adapter_dirs[0], "support", "tiny")
    with pytest.raises(NotFoundError) as info:
        registry.resolve(ref)
    assert str(info.value) == message.format(root=registry.location)


def test_promote_and_rollback_record_every_move(registry: Registry, adapter_dirs: list[Path], tmp_path: Path) -> None:
    for i in range(3):
        registry.push(_variant(adapter_dirs[0], tmp_path / f"v{i}", f"v{i}"), "support", "tiny")
    registry.promote("support@1", "prod", who="alice")
    registry.promote("support@2", "prod", who="bob")
    registry.promote("support@3", "prod", who="carol")
    registry.promote("support@3", "canary", who="carol")
    assert registry.aliases("support") == {"canary": 3, "prod": 3}
    assert registry.rollback("support", "prod", who="dave").version == 2
    assert registry.rollback("support", "prod", who="dave").version == 1
    with pytest.raises(ConflictError) as info:
        registry.rollback("support", "prod")
    assert str(info.value) == "support:prod has no earlier version to roll back to"
    assert registry.resolve("support:prod").version == 1
    moves = [(m.action, m.who, m.from_version, m.to_version) for m in registry.alias_history("support", "prod")]
    assert moves == [
        ("promote", "alice", None, 1),
        ("promote", "bob", 1, 2),
        ("promote", "carol", 2, 3),
        ("rollback", "dave", 3, 2),
        ("rollback", "dave", 2, 1),
    ]
    with pytest.raises(NotFoundError):
        registry.rollback("support", "staging")


def test_remove_is_refused_while_aliased_and_numbers_are_not_reused(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    registry.push(adapter_dirs[0], "support", "tiny")
    registry.push(adapter_dirs[1], "support", "tiny")
    registry.promote("support@2", "prod")
    with pytest.raises(ConflictError) as info:
        registry.remove("support@2")
    assert str(info.value) == "support@2 is the target of alias prod; promote another version there first"
    registry.promote("support@1", "prod")
    with pytest.raises(ConflictError) as reached:  # a rollback of prod would go back to it
        registry.remove("support@2")
    assert str(reached.value) == (
        "support@2 is in the history of alias prod: the next `loragate registry rollback support --alias prod` "
        "would go back to it; removing it would break that rollback (--force removes it anyway)"
    )
    assert registry.remove("support@2", force=True).ref == "support@2"
    with pytest.raises(NotFoundError) as gone:
        registry.resolve("support@2")
    assert str(gone.value).startswith("support@2 was removed at ")
    assert registry.resolve("support").version == 1
    assert [m.ref for m in registry.list_adapters("support")] == ["support@1"]
    again = registry.push(adapter_dirs[1], "support", "tiny")
    assert again.version == 3


def test_verify_reports_corruption_and_missing_blobs(registry: Registry, adapter_dirs: list[Path]) -> None:
    m = registry.push(adapter_dirs[0], "support", "tiny")
    assert verify_registry(registry) == []
    weights = registry.store.local_path(blob_key(m.files["adapter_model.safetensors"]))
    assert weights is not None
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    actual = hashlib.sha256(data).hexdigest()
    expected = m.files["adapter_model.safetensors"]
    line = f"support@1: adapter_model.safetensors: corrupted: sha256 is {actual[:12]}..., expected {expected[:12]}..."
    assert verify_registry(registry, "support@1") == [line]
    assert verify_registry(registry) == [line]
    with pytest.raises(IntegrityError) as info:
        registry.materialize(m)
    assert str(info.value) == f"blob sha256:{expected} is corrupted in the store (content hash differs)"
    readme = registry.store.local_path(blob_key(m.files["README.md"]))
    assert readme is not None
    readme.unlink()
    assert verify_registry(registry, "support") == [
        f"support@1: README.md: blob sha256:{m.files['README.md'][:12]}... is missing",
        line,
    ]


def test_materialize_gives_the_exact_files(registry: Registry, adapter_dirs: list[Path]) -> None:
    m = registry.push(adapter_dirs[0], "support", "tiny")
    folder = registry.materialize(m)
    assert sorted(p.name for p in folder.iterdir()) == sorted(m.files)
    assert {p.name: _sha(p) for p in folder.iterdir()} == m.files
    assert registry.materialize(registry.resolve("support")) == folder


def test_bases(registry: Registry, tiny_model: Path, adapter_dirs: list[Path], tmp_path: Path) -> None:
    tiny = registry.get_base("tiny")
    assert (tiny.architecture, tiny.hidden_size, tiny.intermediate_size) == ("LlamaForCausalLM", 128, 256)
    assert (tiny.num_hidden_layers, tiny.vocab_size, tiny.path) == (2, 1024, str(tiny_model.resolve()))
    assert tiny.linear_shapes["model.layers.1.mlp.down_proj"] == (128, 256)
    assert tiny.embedding_shapes == {"model.embed_tokens": (1024, 128)}
    assert registry.base_dir("tiny") == tiny_model.resolve()
    assert registry.add_base(tiny_model, "tiny") == tiny  # idempotent

    changed = tmp_path / "changed"
    shutil.copytree(tiny_model, changed)
    (changed / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(ConflictError) as info:
        registry.add_base(changed, "tiny")
    assert str(info.value).startswith("base 'tiny' is already registered with another fingerprint")
    other = registry.add_base(changed, "tiny-chat", copy=True, merged_from={"adapter": "x@1"})
    assert other.fingerprint != tiny.fingerprint and other.chat_template_hash != tiny.chat_template_hash
    assert (other.config_hash, other.tokenizer_hash, other.weights_hash) == (
        tiny.config_hash,
        tiny.tokenizer_hash,
        tiny.weights_hash,
    )
    copied = registry.base_dir("tiny-chat")
    assert {p.name: _sha(p) for p in copied.iterdir()} == {p.name: _sha(p) for p in changed.iterdir()}
    assert [b.name for b in registry.list_bases()] == ["tiny", "tiny-chat"]

    registry.push(adapter_dirs[0], "support", "tiny")
    with pytest.raises(ValidationError) as taken:
        registry.add_base(tiny_model, "support")
    assert str(taken.value) == "base name 'support' is already an adapter name; pick another"
    with pytest.raises(NotFoundError) as missing:
        registry.push(adapter_dirs[0], "x", "llama")
    assert str(missing.value) == "base model 'llama' is not registered (loragate registry base add DIR --name llama)"

    (changed / "config.json").write_text(
        (changed / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    )
    registry.add_base(changed, "drifting")
    (changed / "config.json").write_text((tiny_model / "config.json").read_text().replace("1e-06", "1e-07"))
    assert verify_registry(registry) == [f"base drifting: {changed.resolve()} no longer matches its fingerprint"]


def test_check_effect_refuses_a_no_op_adapter(registry: Registry, tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=True)).save_pretrained(
        tmp_path / "noop"
    )
    with pytest.raises(ValidationError) as info:
        registry.push(tmp_path / "noop", "noop", "tiny", check_effect=True)
    assert str(info.value) == (
        f"{tmp_path / 'noop'}: the adapter does not change the base model's logits on 4 probe prompts (largest "
        "difference 0): it would be a silent no-op (were lora_B weights ever trained?)"
    )
    assert registry.store.list_keys("adapters/") == []
    assert registry.push(tmp_path / "noop", "noop", "tiny").version == 1  # without the check it is accepted


def test_check_effect_accepts_a_real_adapter(registry: Registry, adapter_dirs: list[Path]) -> None:
    assert registry.push(adapter_dirs[0], "support", "tiny", check_effect=True).version == 1


def test_every_write_is_reported_to_the_audit_hook(registry: Registry, adapter_dirs: list[Path]) -> None:
    seen: list[dict[str, object]] = []
    registry.audit = seen.append
    m = registry.push(adapter_dirs[0], "support", "tiny")
    registry.promote("support", "prod", who="alice")
    with pytest.raises(ConflictError):
        registry.remove("support@1", who="bob")
    registry.promote("support@1", "canary", who="alice")
    with pytest.raises(ConflictError):
        registry.rollback("support", "canary", who="carol")
    summary = [(r["action"], r["target"], r["result"], r["who"]) for r in seen]
    assert summary == [
        ("registry.push", "support@1", "ok", None),
        ("registry.promote", "support:prod", "ok", "alice"),
        ("registry.remove", "support@1", "error", "bob"),
        ("registry.promote", "support:canary", "ok", "alice"),
        ("registry.rollback", "support:canary", "error", "carol"),
    ]
    assert seen[0]["details"] == {
        "base": "tiny",
        "path": str(adapter_dirs[0]),
        "version": 1,
        "digest": m.digest,
        "serving": "lora",
    }
    assert seen[2]["error"] == "support@1 is the target of alias prod; promote another version there first"

    def broken(record: dict[str, object]) -> None:
        raise RuntimeError("audit sink down")

    registry.audit = broken
    assert registry.push(adapter_dirs[1], "support", "tiny").version == 2  # the write still happens


def test_a_file_changed_during_the_push_registers_nothing(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    adapter = _variant(adapter_dirs[0], tmp_path / "moving", "before")

    def trainer_still_writing(stage: PushStage) -> None:
        if stage == "hashed":
            (adapter / "README.md").write_text("after, and longer")

    with pytest.raises(ConflictError) as info:
        registry.push(adapter, "support", "tiny", on_stage=trainer_still_writing)
    assert str(info.value) == f"{adapter}: files changed during the push; nothing was registered, try again"
    assert registry.list_adapters() == []
    assert registry.push(adapter, "support", "tiny").files["README.md"] == _sha(adapter / "README.md")


@pytest.mark.parametrize("hint", [b"{garbage", b'{"version": "x"}', b'{"version": 99}', b'{"version": 0}'])
def test_a_bad_head_hint_changes_nothing(registry: Registry, adapter_dirs: list[Path], hint: bytes) -> None:
    registry.push(adapter_dirs[0], "support", "tiny")
    registry.push(adapter_dirs[1], "support", "tiny")
    registry.store.put_bytes("adapters/support/head.json", hint)
    assert registry.resolve("support").version == 2
    registry.store.put_bytes("adapters/support/head.json", hint)
    assert registry.push(adapter_dirs[0], "support", "tiny", description="same content").version == 1
    assert registry.push(adapter_dirs[0], "support", "tiny", contract={"regex": "x"}).version == 3
