"""The runnable examples: offline with --demo, tidy afterwards, a help text per option."""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = ["quickstart.py", "agent.py", "rag.py", "lora.py"]

_NO_FAISS = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None,
    reason='faiss-cpu is not installed (pip install ".[rag]")',
)


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("quickstart.py", "Baichuan 2："),
        ("agent.py", "[ai]"),
        pytest.param("rag.py", "回答 / Answer: ", marks=_NO_FAISS),
        # lora.py: test_lora_demo_gives_an_adapter_one_answer_however_it_is_chosen
    ],
)
def test_example_runs_offline_and_removes_its_checkpoint(script, expected, tmp_path):
    # The demo's temporary checkpoint goes to TMPDIR: each run used to leave one behind.
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert result.stdout.split(expected, 1)[1].splitlines()[0].strip(), "nothing after it"
    assert not list(tmp_path.glob("baichuan2-*")), "the demo checkpoint was left behind"


def test_lora_demo_gives_an_adapter_one_answer_however_it_is_chosen(tmp_path):
    # Per call, bound and merged are three ways to one adapter: one greedy answer. The
    # base model and the other adapter answer differently (their weights differ).
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "lora.py"), "--demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    answers = dict(
        line[1:].split("] ", 1) for line in result.stdout.splitlines() if line.startswith("[")
    )
    assert list(answers) == [
        "base model",
        "adapter='sql', per call",
        "adapter='law', per call",
        "bind(adapter='sql')",
        "'sql' merged into the weights",
    ]
    sql = answers["adapter='sql', per call"]
    assert answers["bind(adapter='sql')"] == sql
    assert answers["'sql' merged into the weights"] == sql
    assert len({answers["base model"], sql, answers["adapter='law', per call"]}) == 3
    assert not list(tmp_path.glob("baichuan2-*")), "the demo checkpoint was left behind"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_option(script):
    parser = _load(script).build_parser()
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert {"--model", "--demo"} <= {a.option_strings[-1] for a in options}
    for option in options:
        assert option.help and option.help.strip(), f"{script}: {option.option_strings} has no help"
    shown = parser.format_help()  # what --help prints
    for option in options:
        assert option.option_strings[-1] in shown


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_model_id_offline_without_a_cache_is_one_message_not_a_traceback(script, tmp_path):
    # With no copy in either cache and the offline variable set, nothing can be fetched:
    # the example used to print a ~50-line traceback.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "MODELSCOPE_CACHE": str(tmp_path / "ms"),
    }
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--model", "baichuan-inc/Baichuan2-7B-Chat"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr
