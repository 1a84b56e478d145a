"""`loragate registry push --contract FILE`: contracts normalised at push, broken ones refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters_registry.registry import Registry
from loragate.cli import main


def push(registry: Registry, adapter: Path, contract: Path, name: str) -> int:
    argv = ["registry", "push", str(adapter), "--name", name, "--base", "tiny", "--contract", str(contract)]
    return main([*argv, "--registry", str(registry.location)])


def test_push_with_a_contract_stores_it_normalised(
    registry: Registry, adapter_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contract = tmp_path / "contract.json"
    contract.write_text(json.dumps({"choice": ["pos", "neg"], "contract_retry": 1}))
    assert push(registry, adapter_dirs[0], contract, "sentiment") == 0
    assert registry.resolve("sentiment").contract == {"type": "choice", "choice": ["pos", "neg"], "contract_retry": 1}
    assert capsys.readouterr().out.startswith("sentiment@1 sha256:")


@pytest.mark.parametrize(
    ("contract", "reason"),
    [
        ({"type": "string", "format": "weird"}, "schema is not supported by the structured-generation backend"),
        ({"regex": "[a-z"}, "regex does not compile: unterminated character set at position 0"),
        ({"type": "object", "contract_retry": 5}, "contract_retry must be an integer from 0 to 3, got 5"),
    ],
    ids=["unsupported schema", "broken regex", "bad retry"],
)
def test_push_refuses_a_broken_contract_and_stores_nothing(
    registry: Registry,
    adapter_dirs: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    contract: dict[str, object],
    reason: str,
) -> None:
    path = tmp_path / "contract.json"
    path.write_text(json.dumps(contract))
    assert push(registry, adapter_dirs[0], path, "broken") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and reason in err
    assert err.count("\n") == 1
    assert registry.list_adapters("broken") == []
