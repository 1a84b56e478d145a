"""`loragate registry ...` through the real argument parser, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters_registry.layout import blob_key
from adapters_registry.registry import Registry
from loragate.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_show_list_promote_rollback_rm(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loc = ["--registry", registry.location]
    contract = tmp_path / "contract.json"
    contract.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}}))
    code, out, _ = _run(
        capsys, "push", str(adapter_dirs[0]), "--name", "support", "--base", "tiny", "--contract", str(contract),
        "--label", "team=cx", "--description", "first", *loc,
    )  # fmt: skip
    first = registry.resolve("support@1")
    assert (code, out) == (0, f"support@1 {first.digest}\n")
    assert first.labels == {"team": "cx"} and first.contract is not None and first.contract["type"] == "json_schema"

    code, out, _ = _run(capsys, "push", str(adapter_dirs[1]), "--name", "support", "--base", "tiny", "--json", *loc)
    assert code == 0 and json.loads(out)["ref"] == "support@2"

    code, out, _ = _run(capsys, "show", "support@1", "--json", *loc)
    shown = json.loads(out)
    assert code == 0
    assert (shown["name"], shown["version"], shown["digest"], shown["serving"]) == ("support", 1, first.digest, "lora")
    assert (shown["engine_name"], shown["aliases"]) == (first.engine_name, [])

    assert _run(capsys, "promote", "support@2", "--alias", "prod", "--who", "alice", *loc)[:2] == (
        0,
        "support:prod -> support@2\n",
    )
    assert _run(capsys, "promote", "support@1", "--alias", "prod", *loc)[0] == 0
    assert _run(capsys, "rollback", "support", "--alias", "prod", *loc)[:2] == (0, "support:prod -> support@2\n")

    code, out, _ = _run(capsys, "list", "--json", *loc)
    assert [(m["ref"], m["aliases"]) for m in json.loads(out)] == [("support@1", []), ("support@2", ["prod"])]
    code, out, _ = _run(capsys, "list", *loc)
    assert out.splitlines()[0].split() == ["REF", "DIGEST", "BASE", "RANK", "SERVING", "ALIASES", "CREATED"]
    assert out.splitlines()[2].split()[:6] == ["support@2", registry.resolve("support@2").digest_hex[:12], "tiny",
                                               "8", "lora", "prod"]  # fmt: skip

    code, out, _ = _run(capsys, "aliases", "support", "--json", *loc)
    moves = json.loads(out)["prod"]["history"]
    assert [(m["action"], m["from_version"], m["to_version"]) for m in moves] == [
        ("promote", None, 2),
        ("promote", 2, 1),
        ("rollback", 1, 2),
    ]

    code, _, err = _run(capsys, "rm", "support@2", *loc)
    assert (code, err) == (2, "error: support@2 is the target of alias prod; promote another version there first\n")
    assert _run(capsys, "rm", "support@1", *loc)[:2] == (0, "removed support@1\n")
    code, _, err = _run(capsys, "show", "support@1", *loc)
    assert code == 2 and err.startswith("error: support@1 was removed at ")


def test_push_errors_are_one_line(
    registry: Registry,
    adapter_dirs: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAGATE_REGISTRY", registry.location)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    (bad / "run.sh").write_text("rm -rf /")
    code, out, err = _run(capsys, "push", str(bad), "--name", "x", "--base", "tiny")
    assert (code, out, err) == (2, "", f"error: {bad / 'run.sh'}: code files are refused in an adapter\n")
    code, _, err = _run(capsys, "push", str(adapter_dirs[0]), "--name", "x", "--base", "tiny", "--label", "oops")
    assert (code, err) == (2, "error: --label 'oops': expected KEY=VALUE\n")
    code, _, err = _run(capsys, "push", str(adapter_dirs[0]), "--name", "x", "--base", "nope")
    assert (code, err) == (
        2,
        "error: base model 'nope' is not registered (loragate registry base add DIR --name nope)\n",
    )
    assert registry.store.list_keys("adapters/") == []


def test_verify_exit_status(registry: Registry, adapter_dirs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    m = registry.push(adapter_dirs[0], "support", "tiny")
    assert _run(capsys, "verify", "--registry", registry.location) == (0, "", "ok\n")
    path = registry.store.local_path(blob_key(m.files["adapter_config.json"]))
    assert path is not None
    path.write_text("{}")
    code, out, _ = _run(capsys, "verify", "support", "--json", "--registry", registry.location)
    assert code == 1
    assert json.loads(out) == {
        "ok": False,
        "problems": [
            "support@1: adapter_config.json: corrupted: sha256 is 44136fa355b3..., expected "
            f"{m.files['adapter_config.json'][:12]}..."
        ],
    }


def test_base_commands(registry: Registry, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loc = ["--registry", registry.location]
    code, out, _ = _run(capsys, "base", "add", str(tiny_model), "--name", "tiny", *loc)
    assert (code, out) == (0, f"tiny {registry.get_base('tiny').fingerprint}\n")
    code, out, _ = _run(capsys, "base", "list", "--json", *loc)
    (only,) = json.loads(out)
    assert (only["name"], only["architecture"], only["hidden_size"], only["path"]) == (
        "tiny",
        "LlamaForCausalLM",
        128,
        str(tiny_model.resolve()),
    )
    code, _, err = _run(capsys, "base", "show", "llama", *loc)
    assert (code, err) == (
        2,
        "error: base model 'llama' is not registered (loragate registry base add DIR --name llama)\n",
    )


def test_s3_location(s3_registry: Registry, adapter_dirs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert s3_registry.location.startswith("s3://")
    code, out, _ = _run(capsys, "push", str(adapter_dirs[0]), "--name", "support", "--base", "tiny",
                        "--registry", s3_registry.location)  # fmt: skip
    assert (code, out) == (0, f"support@1 {s3_registry.resolve('support').digest}\n")
    code, out, _ = _run(capsys, "show", "support:latest", "--json", "--registry", s3_registry.location)
    assert json.loads(out)["version"] == 1


def test_cli_writes_are_audited(
    registry: Registry,
    adapter_dirs: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAGATE_AUDIT_FILE", str(tmp_path / "audit.jsonl"))
    assert _run(capsys, "push", str(adapter_dirs[0]), "--name", "support", "--base", "tiny",
                "--registry", registry.location)[0] == 0  # fmt: skip
    assert (
        _run(capsys, "rm", "support:nope", "--registry", registry.location)[0] == 2
    )  # a failed attempt is audited too
    assert _run(capsys, "promote", "support@1", "--alias", "prod", "--registry", registry.location)[0] == 0
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["action"], r["target"], r["result"]) for r in lines] == [
        ("registry.push", "support@1", "ok"),
        ("registry.remove", "support:nope", "error"),
        ("registry.promote", "support:prod", "ok"),
    ]
