"""The native engine: our model in this process, a worker thread, a batched decode loop.

``scheduler`` queues requests, admits them and runs the worker; ``batch`` holds the
running rows and advances them one token a step; ``budget`` is the one key/value memory
budget (slot buffers and the prefix cache); ``slots`` and ``slot_model`` keep the keys
and values and run the model on them; ``sampling`` picks tokens on the device;
``limits`` checks what a request asks for; ``warmup`` sizes buffers and compiles once.
"""

from langchain_baichuan2.engines.native.budget import DEFAULT_MAX_ROWS, KvBudget
from langchain_baichuan2.engines.native.limits import EXTRA_ARGUMENTS, check_extra_arguments
from langchain_baichuan2.engines.native.scheduler import NativeEngine, engine_for

__all__ = [
    "DEFAULT_MAX_ROWS",
    "EXTRA_ARGUMENTS",
    "KvBudget",
    "NativeEngine",
    "check_extra_arguments",
    "engine_for",
]
