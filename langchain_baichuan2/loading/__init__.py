"""From a folder or model id to a ready Baichuan2 model and tokenizer.

- :mod:`.checkpoint` — the leaf: ``CheckpointError`` and every check of a folder.
- :mod:`.sources` — local folder, ModelScope, Hugging Face Hub; offline variables.
- :mod:`.load` — dtype, device, quantization; the model and tokenizer.
- :mod:`.registry` — one shared loaded model per settings.
- :mod:`.legacy_4bit` — the Chat-4bits releases' bitsandbytes 0.41 layout.
"""

from langchain_baichuan2.errors import ModelUnloadedError
from langchain_baichuan2.loading.checkpoint import (
    CheckpointError,
    check_checkpoint,
    expected_shapes,
    read_config,
)
from langchain_baichuan2.loading.load import (
    DType,
    LoadedModel,
    Quantization,
    load_model_and_tokenizer,
    load_tokenizer,
    progress_enabled,
    quantization_config,
    resolve_dtype,
    weight_bytes_by_dtype,
)
from langchain_baichuan2.loading.registry import (
    LOAD_SETTINGS,
    ModelRegistry,
    load_settings,
    registry,
)
from langchain_baichuan2.loading.sources import (
    OFFLINE_VARIABLES,
    SOURCES,
    DownloadError,
    Source,
    resolve_model_path,
)

__all__ = [
    "LOAD_SETTINGS",
    "OFFLINE_VARIABLES",
    "SOURCES",
    "CheckpointError",
    "DType",
    "DownloadError",
    "LoadedModel",
    "ModelRegistry",
    "ModelUnloadedError",
    "Quantization",
    "Source",
    "check_checkpoint",
    "expected_shapes",
    "load_model_and_tokenizer",
    "load_settings",
    "load_tokenizer",
    "progress_enabled",
    "quantization_config",
    "read_config",
    "registry",
    "resolve_dtype",
    "resolve_model_path",
    "weight_bytes_by_dtype",
]
