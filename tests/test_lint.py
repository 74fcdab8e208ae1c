"""The code is formatted and linted as pyproject.toml's [tool.ruff] says (ruff comes with the dev extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    done = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"ruff {' '.join(command)} (fix with: .venv/bin/ruff {command[0]} .):\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    )
