"""The runnable examples work offline with --demo."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

_NO_FAISS = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None,
    reason='faiss-cpu is not installed (pip install ".[rag]")',
)


@pytest.mark.parametrize(
    ("script", "expected"),
    [("agent.py", "[ai]"), pytest.param("rag.py", "回答 / Answer: ", marks=_NO_FAISS)],
)
def test_example_runs_offline(script, expected):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--demo"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert result.stdout.split(expected, 1)[1].splitlines()[0].strip(), "nothing after it"
