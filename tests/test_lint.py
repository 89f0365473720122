"""The lint check of the test command: pyflakes' rules (unused imports and names, undefined names,
redefinitions) over everything we ship and run, through ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ruff_pyflakes_rules_pass():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--output-format", "concise",
                        "core", "eagle_tui", "tests", "bench", "scripts"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
