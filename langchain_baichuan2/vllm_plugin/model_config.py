"""vLLM's per-architecture config hook for Baichuan: checks the folder, picks the renderer.

vLLM runs the hooks of the class registered for a model's architecture in
``MODELS_CONFIG_MAP`` while it builds its configuration: in the process that called
``LLM(...)`` or ``vllm serve``, before any engine process starts or weights load. So a
broken local checkpoint fails there with its :class:`CheckpointError`, in the caller's
traceback (``vllm serve`` prints it and exits), not in a worker's log.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from langchain_baichuan2.loading.checkpoint import check_checkpoint
from langchain_baichuan2.vllm_plugin import TOKENIZER_MODE

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig

CHECKED = "baichuan2_checkpoint_checked"
"""An ``additional_config`` key: true when the caller ran ``check_checkpoint`` itself.

``backend="vllm"`` checks the folder before vLLM is imported and sets it, so a start
reads the checkpoint's headers once.
"""


class BaichuanModelConfig(VerifyAndUpdateConfig):
    """Checks a local checkpoint folder and selects the Baichuan2 chat renderer."""

    @staticmethod
    def verify_and_update_model_config(model_config: ModelConfig) -> None:
        """Default to the renderer whose chat prompts are ``ChatBaichuan2``'s ids."""
        if model_config.tokenizer_mode == "auto":
            model_config.tokenizer_mode = TOKENIZER_MODE

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        """Run ``check_checkpoint`` on a local folder, unless its caller already did.

        A model id is downloaded by the workers; their ``load_weights`` checks its
        tensors.

        Raises:
            CheckpointError: If the local folder is not a usable checkpoint.
        """
        extra = vllm_config.additional_config
        if isinstance(extra, dict) and extra.get(CHECKED):
            return
        folder = Path(vllm_config.model_config.model)
        if folder.is_dir():
            check_checkpoint(folder)
