"""Generation engines: one interface, two backends, one front door.

``base`` holds the interface (``Engine``) and what every backend shares; ``settings``
the request settings and each backend's limits; ``lifecycle`` the front door
(``open``, ``release``, ``Attempts``); ``native`` runs our model in this process;
``vllm`` runs vLLM's engine (imported only when used).
"""

from langchain_baichuan2.engines.base import (
    Engine,
    EngineStoppedError,
    GenerationChunk,
    merge_chunks,
)
from langchain_baichuan2.engines.lifecycle import (
    Attempts,
    EngineSpec,
    loaded_model,
    open,
    release,
    tokenizer_and_defaults,
)
from langchain_baichuan2.engines.settings import SamplingParams
from langchain_baichuan2.tools import Constraint

__all__ = [
    "Attempts",
    "Constraint",
    "Engine",
    "EngineSpec",
    "EngineStoppedError",
    "GenerationChunk",
    "SamplingParams",
    "loaded_model",
    "merge_chunks",
    "open",
    "release",
    "tokenizer_and_defaults",
]
