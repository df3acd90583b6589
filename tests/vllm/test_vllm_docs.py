"""The README's "Scale out with vLLM" Python blocks run as written, on tiny checkpoints."""

import re
from typing import Any

import pytest
from pydantic import model_validator

import langchain_baichuan2
from langchain_baichuan2 import ChatBaichuan2
from tests.integration_tests.test_docs import vllm_engine_blocks
from tests.vllm.conftest import VLLM_KWARGS


class _SmallVllmChat(ChatBaichuan2):
    """ChatBaichuan2 with short answers and a KV cache sized for a shared CPU machine."""

    @model_validator(mode="before")
    @classmethod
    def _small(cls, values: Any) -> Any:
        values = dict(values)
        values["max_tokens"] = 16
        if values.get("backend") == "vllm" or values.get("tensor_parallel_size", 1) > 1:
            values["vllm_kwargs"] = VLLM_KWARGS
        return values


def test_the_readme_has_vllm_blocks():
    assert len(vllm_engine_blocks()) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("line", [line for line, _ in vllm_engine_blocks()])
def test_readme_vllm_block_runs(line, vllm_folders, monkeypatch, cpu_threads_for_two_ranks):
    code = dict(vllm_engine_blocks())[line]
    # 13B stands in with 6 heads, so tensor_parallel_size=2 divides them.
    folders = {"7B": vllm_folders["7b"], "13B": vllm_folders["13b-tp"]}
    code = re.sub(
        r'"baichuan-inc/Baichuan2-(7B|13B)-Chat"',
        lambda m: repr(str(folders[m.group(1)])),
        code,
    )
    monkeypatch.setattr(langchain_baichuan2, "ChatBaichuan2", _SmallVllmChat)
    # Run as a script would be, so the code under `if __name__ == "__main__":` runs too.
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(code, f"README.md:{line}", "exec", dont_inherit=True), namespace)
    assert isinstance(namespace.get("llm"), _SmallVllmChat), "the block's main code did not run"
