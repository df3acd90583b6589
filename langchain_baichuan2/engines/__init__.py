"""Generation engines behind ``ChatBaichuan2``: one interface, two backends.

``base`` holds the interface and what every backend shares; ``native`` runs our model
in this process; ``vllm`` runs vLLM's engine (imported only when used).
"""

from langchain_baichuan2.engines.base import (
    Constraint,
    Engine,
    GenerationChunk,
    SamplingParams,
    check_sampling_values,
    merge_chunks,
)

__all__ = [
    "Constraint",
    "Engine",
    "GenerationChunk",
    "SamplingParams",
    "check_sampling_values",
    "merge_chunks",
]
