"""vLLM's per-architecture config hook for Baichuan: checks the folder, picks the renderer.

vLLM runs ``verify_and_update_model_config`` of the class registered for a model's
architecture in ``MODELS_CONFIG_MAP`` while it builds the ``ModelConfig``: in the process
that called ``LLM(...)`` or ``vllm serve``, before any engine process starts or weights
load. So a broken local checkpoint fails there with its :class:`CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from langchain_baichuan2.loading import check_checkpoint
from langchain_baichuan2.vllm_plugin import TOKENIZER_MODE

if TYPE_CHECKING:
    from vllm.config import ModelConfig


class BaichuanModelConfig(VerifyAndUpdateConfig):
    """Checks a local checkpoint folder and selects the Baichuan2 chat renderer."""

    @staticmethod
    def verify_and_update_model_config(model_config: ModelConfig) -> None:
        """Run ``check_checkpoint`` on a local folder; default to the ids renderer.

        Raises:
            CheckpointError: If the local folder is not a usable checkpoint.
        """
        folder = Path(model_config.model)
        if folder.is_dir():
            check_checkpoint(folder)
        if model_config.tokenizer_mode == "auto":
            model_config.tokenizer_mode = TOKENIZER_MODE
