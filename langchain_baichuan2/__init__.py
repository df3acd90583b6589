"""LangChain integration for the open Baichuan2 models, run locally."""

from importlib import metadata

from langchain_baichuan2 import modeling  # noqa: F401  (registers "baichuan" with transformers)
from langchain_baichuan2.chat_models import ChatBaichuan2
from langchain_baichuan2.embeddings import Baichuan2Embeddings
from langchain_baichuan2.errors import EngineStoppedError
from langchain_baichuan2.loading import CheckpointError, DownloadError

try:
    __version__ = metadata.version(__package__ or "langchain-baichuan2")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = ""

__all__ = [
    "Baichuan2Embeddings",
    "ChatBaichuan2",
    "CheckpointError",
    "DownloadError",
    "EngineStoppedError",
    "__version__",
]
