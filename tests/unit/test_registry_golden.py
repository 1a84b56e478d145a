"""Golden prompts and parity thresholds in the registry: the forms a golden row is read from, each bad row refused
with one line naming it; a version's golden set stored beside its files (kept by gc, checked when read, part of
what makes a re-push the same version); the alias's thresholds kept across moves; and the CLI, which has no engine
to run the gate on, refusing a promote that needs one unless it goes through a gateway or is forced (audited)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from adapters_registry.audit import AuditLog
from adapters_registry.errors import ValidationError
from adapters_registry.gc import collect_garbage
from adapters_registry.golden import GoldenInput, normalize_rows, read_golden_file
from adapters_registry.layout import blob_key
from adapters_registry.manifest import ParityGate
from adapters_registry.registry import Registry, open_registry
from loragate.cli import main

USER = {"role": "user", "content": "Topic: the match ended 2-1"}
ROWS = [
    {"messages": [USER, {"role": "assistant", "content": "sports"}]},
    {"prompt": [USER], "completion": [{"role": "assistant", "content": "sports"}]},
    {"prompt": "Topic: the vote passed", "completion": "politics"},
    {"messages": [{"role": "system", "content": "Be brief."}, USER], "reference": "sports"},
    {"messages": [USER]},  # no reference: judged against the current version's answer
]


def test_golden_rows_are_read_from_the_training_formats_into_one_form() -> None:
    assert normalize_rows(ROWS, "g") == [
        {"messages": [USER], "reference": "sports"},
        {"messages": [USER], "reference": "sports"},
        {"messages": [{"role": "user", "content": "Topic: the vote passed"}], "reference": "politics"},
        {"messages": [{"role": "system", "content": "Be brief."}, USER], "reference": "sports"},
        {"messages": [USER], "reference": None},
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "g: golden prompts are a non-empty list of rows"),
        ({"messages": [USER]}, "g: golden prompts are a non-empty list of rows"),
        ([USER, "text"], "g row 1: a golden row needs `messages` or `prompt`"),
        ([{"messages": [USER]}, "text"], "g row 2: a golden row is a JSON object, not str"),
        ([{"messages": []}], "g row 1: `messages` must be a non-empty list"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "g row 1: every message needs a role"),
        ([{"messages": [{"role": "user", "content": 3}]}], "g row 1: every message's content must be a string"),
        ([{"messages": [USER], "answer": "x"}], "g row 1: unexpected key(s) answer"),
        ([{"messages": [USER], "reference": 7}], "g row 1: the reference answer must be a string"),
        ([{"messages": [{"role": "assistant", "content": "x"}]}], "g row 1: no prompt before the assistant's answer"),
        (
            [{"messages": [USER, {"role": "assistant", "content": "a"}], "reference": "b"}],
            "g row 1: a reference and a final assistant turn; give one of them",
        ),
        ([{"messages": [USER]}] * 1001, "g: 1001 golden rows, more than the 1000 a gate runs"),
    ],
)
def test_a_bad_golden_row_is_refused_with_one_line_naming_it(rows: Any, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        normalize_rows(rows, "g")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_golden_files_are_jsonl_or_a_json_list(tmp_path: Path) -> None:
    jsonl, listed, broken = tmp_path / "g.jsonl", tmp_path / "g.json", tmp_path / "bad.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in ROWS[:2]) + "\n\n")
    listed.write_text(json.dumps(ROWS[:2]))
    assert read_golden_file(jsonl) == read_golden_file(listed) == normalize_rows(ROWS[:2], "g")
    broken.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(ValidationError, match=r"^.*bad\.jsonl line 2: not valid JSON: "):
        read_golden_file(broken)
    with pytest.raises(ValidationError, match="cannot read golden prompts"):
        read_golden_file(tmp_path / "missing.jsonl")


def test_a_versions_golden_set_is_stored_beside_it_kept_by_gc_and_checked_when_read(
    registry: Registry, adapter_dirs: list[Path]
) -> None:
    golden = GoldenInput(ROWS, "golden.jsonl", max_tokens=8)
    manifest = registry.push(adapter_dirs[0], "support", "tiny", golden=golden)
    assert manifest.golden is not None
    assert (manifest.golden.rows, manifest.golden.references, manifest.golden.max_tokens) == (5, 4, 8)
    assert registry.golden_rows(manifest) == normalize_rows(ROWS, "g")
    assert registry.golden_rows(registry.push(adapter_dirs[1], "support", "tiny")) == []
    # the same files with the same golden set are the same version; another golden set makes another version
    assert registry.push(adapter_dirs[0], "support", "tiny", golden=golden).version == 1
    assert registry.push(adapter_dirs[0], "support", "tiny", golden=GoldenInput(ROWS[:1], "other")).version == 3
    assert registry.push(adapter_dirs[0], "support", "tiny").version == 4
    # gc keeps the golden blob of a live version
    collect_garbage(registry, min_age_s=0)
    assert registry.golden_rows(registry.resolve("support@1")) == normalize_rows(ROWS, "g")
    # a corrupted or missing blob is refused when read, not served
    path = registry.store.local_path(blob_key(manifest.golden.sha256))
    assert path is not None
    path.write_text('{"messages": [], "reference": null}\n')
    with pytest.raises(ValidationError, match=r"^support@1's golden prompts are corrupted"):
        registry.golden_rows(manifest)
    path.unlink()
    with pytest.raises(Exception, match=r"^support@1's golden prompts \(blob [0-9a-f]{12}\) are missing"):
        registry.golden_rows(manifest)


def test_a_bad_golden_set_refuses_the_push_and_stores_nothing(registry: Registry, adapter_dirs: list[Path]) -> None:
    with pytest.raises(ValidationError, match=r"^golden.jsonl row 1: `messages` must be a non-empty list$"):
        registry.push(adapter_dirs[0], "support", "tiny", golden=GoldenInput([{"messages": []}], "golden.jsonl"))
    with pytest.raises(ValidationError, match=r"^golden max_tokens must be 1-4096, not 0$"):
        registry.push(adapter_dirs[0], "support", "tiny", golden=GoldenInput(ROWS, "g", max_tokens=0))
    assert registry.list_adapters() == []
    assert registry.store.list_keys("blobs/") == []


def test_the_alias_keeps_its_parity_thresholds_across_moves(registry: Registry, adapter_dirs: list[Path]) -> None:
    for directory in adapter_dirs:
        registry.push(directory, "support", "tiny")
    gate = ParityGate(min_agreement=0.8, max_agreement_drop=0.02)
    registry.promote("support@1", "prod", gate=gate)
    registry.promote("support@2", "prod", weight=10)
    registry.promote("support@2", "prod", weight=100)
    registry.rollback("support", "prod")
    assert registry.alias_records("support")["prod"].gate == gate
    registry.promote("support@1", "prod", gate=ParityGate(max_agreement_drop=0.1))
    assert registry.alias_records("support")["prod"].gate == ParityGate(max_agreement_drop=0.1)
    with pytest.raises(ValidationError, match=r"^a parity gate's min contract validity is a fraction, 0-1, not 1.5$"):
        registry.promote("support@2", "prod", weight=5, gate=ParityGate(min_contract_validity=1.5))
    assert registry.alias_records("support")["prod"].split is None


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_refuses_a_promote_whose_gate_needs_an_engine_unless_forced(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    golden = tmp_path / "golden.jsonl"
    golden.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    loc = ("--registry", registry.location)
    code, out, _ = _run(capsys, "push", str(adapter_dirs[0]), "--name", "support", "--base", "tiny", *loc)
    assert code == 0
    with_golden = tmp_path / "v2"
    shutil.copytree(adapter_dirs[1], with_golden)
    push = ("push", str(with_golden), "--name", "support", "--base", "tiny", "--golden", str(golden), *loc)
    assert _run(capsys, *push, "--golden-max-tokens", "8")[0] == 0
    assert _run(capsys, "promote", "support@1", "--alias", "prod", *loc)[0] == 0  # nothing has golden prompts

    code, out, err = _run(capsys, "promote", "support@2", "--alias", "prod", "--weight", "10", *loc)
    assert (code, out) == (2, "")
    assert err == (
        "error: the parity gate runs 5 golden prompts (support@2) through an engine before support@2 gets traffic on "
        "support:prod: promote through a gateway (--gateway URL), or skip the gate with --force (audited)\n"
    )
    assert registry.alias_records("support")["prod"].split is None
    # --golden for a version without its own: the same refusal; stopping a rollout needs no gate
    code, _, err = _run(capsys, "promote", "support@1", "--alias", "other", "--golden", str(golden), *loc)
    assert code == 2 and f"5 golden prompts ({golden})" in err

    code, out, _ = _run(capsys, "promote", "support@2", "--alias", "prod", "--weight", "10", "--force", *loc)
    assert (code, out) == (0, "support:prod -> support@1 (90%), support@2 (10%)\n")
    audit = [e for e in AuditLog(store=registry.store).read() if e["action"] == "registry.promote"]
    assert audit[-1]["details"]["parity"] == {"forced": True}
    assert _run(capsys, "promote", "support@2", "--alias", "prod", "--weight", "0", *loc)[0] == 0


def test_cli_golden_and_gate_flags_are_checked_before_anything_moves(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loc = ("--registry", registry.location)
    push = ("push", str(adapter_dirs[0]), "--name", "support", "--base", "tiny", *loc)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"messages": "x"}\n')
    assert _run(capsys, *push, "--golden", str(bad))[::2] == (
        2,
        f"error: {bad} row 2: `messages` must be a non-empty list\n",
    )
    assert _run(capsys, *push, "--golden-max-tokens", "8")[::2] == (
        2,
        "error: --golden-max-tokens shapes golden prompts: give them with --golden FILE\n",
    )
    assert open_registry(registry.location).list_adapters() == []
    assert _run(capsys, *push)[0] == 0
    code, _, err = _run(capsys, "promote", "support@1", "--alias", "prod", "--gate-max-drop", "5", *loc)
    assert (code, err) == (2, "error: a parity gate's max agreement drop is a fraction, 0-1, not 5\n")
    code, _, err = _run(capsys, "promote", "support@1", "--alias", "prod", "--gateway", "http://127.0.0.1:9", *loc)
    assert code == 2 and err.startswith("error: cannot reach the gateway at http://127.0.0.1:9: ")
    assert registry.alias_records("support") == {}
