"""What ``backend="vllm"`` asks of vLLM: one checkpoint check per start, quiet logging.

vLLM's own configuration is the truth here: the ``VllmConfig`` it builds from our
arguments (built for real, in this process, with only the engine processes left out),
and what a real start prints.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines import vllm as vllm_engines
from langchain_baichuan2.loading import checkpoint
from langchain_baichuan2.testing import make_tiny_checkpoint
from langchain_baichuan2.vllm_plugin import model_config
from tests.vllm.conftest import VLLM_KWARGS

ROOT = Path(__file__).resolve().parents[2]


class Built(Exception):
    """Raised instead of starting vLLM's engine, once its configuration is built."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("config"), "13b", hidden_size=128, num_attention_heads=2
    )


def vllm_config(monkeypatch, folder, vllm_kwargs=None):
    """The ``VllmConfig`` a ``backend="vllm"`` call builds, hooks run; no engine starts."""
    from vllm.v1.engine.async_llm import AsyncLLM

    built = []

    def build_only(engine_args, *args, **kwargs):
        built.append(engine_args.create_engine_config())
        raise Built

    monkeypatch.setattr(AsyncLLM, "from_engine_args", build_only)
    model = ChatBaichuan2(
        model=str(folder), backend="vllm", vllm_kwargs={**VLLM_KWARGS, **(vllm_kwargs or {})}
    )
    with pytest.raises(Built):
        model.invoke("Hi")
    return built[0]


def test_a_start_checks_the_checkpoint_once(folder, monkeypatch):
    checked = []
    check = checkpoint.check_tensor_names

    def count(*args, **kwargs):
        checked.append(args[2])
        return check(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "check_tensor_names", count)
    config = vllm_config(monkeypatch, folder, {"max_model_len": 1000})  # a start of its own
    assert len(checked) == 1
    # The plugin's hook, which vLLM did run, was told so, in the key it reads.
    assert config.additional_config == {model_config.CHECKED: True}
    assert model_config.CHECKED == vllm_engines._CHECKED


def test_the_plugin_hook_checks_a_folder_no_caller_checked(folder, monkeypatch):
    checked = []
    monkeypatch.setattr(model_config, "check_checkpoint", checked.append)
    config = vllm_config(monkeypatch, folder, {"max_model_len": 1001})
    model_config.BaichuanModelConfig.verify_and_update_config(config)
    assert checked == []
    config.additional_config = {}
    model_config.BaichuanModelConfig.verify_and_update_config(config)
    assert checked == [folder]


def test_vllm_logs_only_warnings_unless_the_user_asks(folder, monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    from_environment = vllm_config(monkeypatch, folder, {"max_model_len": 1002})
    assert from_environment.logging_config.log_level == "INFO"
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    asked = vllm_config(monkeypatch, folder, {"max_model_len": 1003, "log_level": "DEBUG"})
    assert asked.logging_config.log_level == "DEBUG"
    # Last: building a config sets this process's vLLM logging as it says.
    quiet = vllm_config(monkeypatch, folder, {"max_model_len": 1004})
    # The engine processes configure their logging from this config.
    assert quiet.logging_config.log_level == "WARNING"


@pytest.mark.slow
def test_a_call_prints_no_vllm_info_and_no_deprecation(folder, tmp_path):
    script = tmp_path / "call.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from langchain_baichuan2 import ChatBaichuan2

            if __name__ == "__main__":
                llm = ChatBaichuan2(
                    model={str(folder)!r}, backend="vllm", temperature=0, max_tokens=4,
                    dtype="float32", vllm_kwargs={VLLM_KWARGS!r},
                )
                print("answer", repr(llm.invoke("Hi").content), flush=True)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VLLM_LOGGING_LEVEL", None)
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "answer" in run.stdout
    # vLLM's lines read "(EngineCore pid=123) INFO 12-07 02:29:07 [core.py:133] ...".
    info = [line for line in run.stderr.splitlines() if re.search(r"pid=\d+\) INFO ", line)]
    assert info == [], "\n".join(info[:20])
    assert "Passing raw prompts" not in run.stderr  # vLLM's deprecation of our old call
