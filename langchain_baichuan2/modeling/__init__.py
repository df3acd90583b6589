"""Native Baichuan2 model, configuration and tokenizer, registered with transformers.

Importing this package registers ``model_type: "baichuan"`` with ``AutoConfig``,
``AutoModel``, ``AutoModelForCausalLM`` and ``AutoTokenizer``, so official checkpoint
folders load without ``trust_remote_code`` and no Python file from a folder is run.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.tokenization_auto import REGISTERED_TOKENIZER_CLASSES

from langchain_baichuan2.modeling.configuration import BaichuanConfig
from langchain_baichuan2.modeling.modeling import (
    BaichuanForCausalLM,
    BaichuanModel,
    BaichuanPreTrainedModel,
    alibi_slopes,
)
from langchain_baichuan2.modeling.tokenization import BaichuanTokenizer

AutoConfig.register("baichuan", BaichuanConfig, exist_ok=True)
AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaichuanTokenizer, exist_ok=True)
# Baichuan-1 folders name the same SentencePiece tokenizer "BaiChuanTokenizer".
REGISTERED_TOKENIZER_CLASSES.setdefault("BaiChuanTokenizer", BaichuanTokenizer)

__all__ = [
    "BaichuanConfig",
    "BaichuanForCausalLM",
    "BaichuanModel",
    "BaichuanPreTrainedModel",
    "BaichuanTokenizer",
    "alibi_slopes",
]
