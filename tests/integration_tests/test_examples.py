"""The runnable examples work offline with --demo."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(("script", "expected"), [("agent.py", "[ai]")])
def test_example_runs_offline(script, expected):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--demo"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
