"""One loaded model per resolved settings, shared by every object that asks for it."""

from __future__ import annotations

import atexit
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from langchain_baichuan2.loading.adapters import read_adapter, resolve_adapter_path
from langchain_baichuan2.loading.load import LoadedModel, load_model_and_tokenizer, resolve_dtype
from langchain_baichuan2.modeling.lora import Adapter, merge_adapter

# The settings that decide which loaded model an object gets (besides the model name).
LOAD_SETTINGS = ("revision", "source", "dtype", "device_map", "quantization")


def load_settings(obj: object) -> dict[str, Any]:
    """The ``LOAD_SETTINGS`` fields of a chat model or embeddings object."""
    return {name: getattr(obj, name) for name in LOAD_SETTINGS}


class ModelRegistry:
    """Shares one loaded model between every object that asks for the same settings."""

    def __init__(self) -> None:
        self._models: dict[tuple, LoadedModel] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    @staticmethod
    def key(name: str | Path, settings: Mapping[str, Any]) -> tuple:
        """The identity of a load request (equal keys share one model)."""
        path = Path(name).expanduser()
        where = str(path.resolve()) if path.is_dir() else str(name)
        quantization = settings.get("quantization")
        quant = (
            quantization.to_json_string()
            if isinstance(quantization, BitsAndBytesConfig)
            else quantization
        )
        device_map = settings.get("device_map")
        device = (
            json.dumps(device_map, sort_keys=True) if isinstance(device_map, dict) else device_map
        )
        return (
            where,
            settings.get("revision"),
            settings.get("source", "auto"),
            # "auto" and the dtype it resolves to are the same weights.
            str(resolve_dtype(settings.get("dtype", "auto"), on_gpu=torch.cuda.is_available())),
            device,
            quant,
            settings.get("merged_adapter"),
        )

    def get(
        self, name: str | Path, *, show_progress: bool | None = None, **settings: Any
    ) -> LoadedModel:
        """Return the shared model for these settings, loading it on first request.

        Args:
            name: A local folder or a model id.
            show_progress: Progress bars if it has to load (see ``load_model_and_tokenizer``).
            **settings: ``revision``, ``source``, ``dtype``, ``device_map``,
                ``quantization``, as for ``load_model_and_tokenizer``, and
                ``merged_adapter``: a LoRA adapter (folder or id) folded into the weights.
        """
        key = self.key(name, settings)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        merged = settings.pop("merged_adapter", None)
        with lock:  # one load per key, even when many threads ask at once
            if key not in self._models:
                loaded = load_model_and_tokenizer(name, show_progress=show_progress, **settings)
                if merged is not None:
                    folder = resolve_adapter_path(merged, source=settings.get("source", "auto"))
                    merge_adapter(loaded.model, read_adapter(folder, loaded.model.config))
                self._models[key] = loaded
            return self._models[key]

    def peek(self, name: str | Path, **settings: Any) -> LoadedModel | None:
        """Return the shared model for these settings if it is loaded; never loads it."""
        return self._models.get(self.key(name, settings))

    def unload(self, name: str | Path, **settings: Any) -> bool:
        """Forget the model loaded for these settings and stop its engine.

        Its memory is freed once no object holds it any more. Returns whether one was
        loaded.
        """
        with self._guard:
            loaded = self._models.pop(self.key(name, settings), None)
        if loaded is not None:
            loaded.close()
        return loaded is not None

    def clear(self) -> None:
        """Forget every loaded model and stop its engine (freed once nothing holds it)."""
        with self._guard:
            models, self._models = list(self._models.values()), {}
            self._locks.clear()
        for loaded in models:
            loaded.close()


registry = ModelRegistry()
# Stop worker threads before the interpreter tears native libraries down.
atexit.register(registry.clear)


def shared_adapter(loaded: LoadedModel, folder: str) -> Adapter:
    """The LoRA adapter in ``folder``, read and checked once per loaded model.

    Every object and engine of the model shares it; unloading the model frees it.

    Raises:
        CheckpointError: The adapter cannot be served on this model (named).
    """
    config = loaded.model.config
    return loaded.shared(f"adapter:{folder}", lambda: read_adapter(Path(folder), config))
