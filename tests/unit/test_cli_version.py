"""`loragate --version`: the installed distribution's version, the one pyproject.toml declares."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from loragate.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_version_prints_the_projects_version(capsys: pytest.CaptureFixture[str]) -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"loragate {declared}\n"
    # The console script the venv installs says the same, and nothing else.
    script = Path(sys.executable).with_name("loragate")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"loragate {declared}\n", "")
