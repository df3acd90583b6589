"""The grammar's view of the vocabulary: which ids may end a finished grammar."""

import pytest
import xgrammar as xgr

from langchain_baichuan2.grammar import GrammarCompiler, tokenizer_info
from langchain_baichuan2.modeling import BaichuanTokenizer
from langchain_baichuan2.prompt import eos_token_ids
from langchain_baichuan2.testing import make_tiny_checkpoint
from langchain_baichuan2.tools import Constraint
from langchain_baichuan2.vllm_plugin import _use_native_tokenizer_info


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("grammar"), "7b")
    return BaichuanTokenizer.from_pretrained(folder)


def test_every_eos_of_the_generation_config_may_end_a_grammar(tokenizer):
    eos = eos_token_ids({"eos_token_id": [7, 2]}, tokenizer)
    info = tokenizer_info(tokenizer, len(tokenizer), eos)
    assert sorted(info.stop_token_ids) == [2, 7]


def test_the_compiler_takes_the_eos_ids(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [2])
    assert compiler.info.stop_token_ids == [2]
    assert compiler.compile(Constraint("json")) is compiler.compile(Constraint("json"))


def test_vllms_xgrammar_hook_resolves_eos_as_the_package_does(tokenizer):
    _use_native_tokenizer_info()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    assert info.stop_token_ids == eos_token_ids(None, tokenizer) == [2]
    assert not info.add_prefix_space
    given = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=[5, 2])
    assert sorted(given.stop_token_ids) == [2, 5]
