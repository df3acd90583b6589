"""Baichuan2 model configuration, reading the official ``config.json`` unchanged."""

from __future__ import annotations

import logging
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

logger = logging.getLogger(__name__)

PositionEmbedding = Literal["rope", "alibi"]

# The 7B release uses rotary positions with this fixed base; it has no key for it.
ROPE_THETA = 10000.0
# The vocabulary of both Baichuan-1 releases, whose head is not normalized.
BAICHUAN1_VOCAB_SIZE = 64000


@strict
class BaichuanConfig(PreTrainedConfig):
    """Configuration of a Baichuan2 decoder (7B: RoPE, 13B: ALiBi).

    The position scheme is explicit: ``position_embedding`` may be set to ``"rope"``
    or ``"alibi"``. When it is absent, as in the official files, it is derived from
    the keys the official configs carry: the 7B ``config.json`` has
    ``max_position_embeddings`` (RoPE), the 13B one has no position key (ALiBi).
    This reads the file's own declaration instead of guessing from ``hidden_size``.

    Example:
        ```python
        from langchain_baichuan2.modeling import BaichuanConfig

        config = BaichuanConfig(hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                position_embedding="alibi")
        ```
    """

    model_type = "baichuan"

    # Defaults are the 13B's: with no position key, a default config is ALiBi (13B).
    vocab_size: int = 125696
    hidden_size: int = 5120
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    hidden_act: str = "silu"
    max_position_embeddings: int | None = None
    model_max_length: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    position_embedding: str | None = None
    attention_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        if self.position_embedding is None:
            self.position_embedding = "rope" if self.max_position_embeddings else "alibi"
            if self.position_embedding == "alibi" and self.hidden_size == 4096:
                logger.warning(
                    "This Baichuan2 config has the 7B's hidden_size (4096) but no "
                    "max_position_embeddings, so it is read as ALiBi (13B). If it is a 7B "
                    "checkpoint, set position_embedding='rope' (or add the key)."
                )
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Reject shapes and position schemes that fit neither Baichuan2 variant."""
        if self.position_embedding not in ("rope", "alibi"):
            msg = (
                f"position_embedding must be 'rope' (7B) or 'alibi' (13B), "
                f"got {self.position_embedding!r}"
            )
            raise ValueError(msg)
        if self.hidden_size % self.num_attention_heads != 0:
            msg = (
                f"hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
            raise ValueError(msg)
        if self.position_embedding == "rope" and (self.hidden_size // self.num_attention_heads) % 2:
            msg = "RoPE needs an even head dimension (hidden_size / num_attention_heads)"
            raise ValueError(msg)

    @property
    def context_length(self) -> int:
        """Longest sequence the model takes: ``model_max_length``, within RoPE's positions."""
        positions = self.max_position_embeddings
        return min(self.model_max_length, positions or self.model_max_length)

    @property
    def norm_head(self) -> bool:
        """Whether the head rows are L2-normalized (Baichuan2's NormHead).

        Baichuan-1 (Baichuan-7B, Baichuan-13B: a vocabulary of 64,000 pieces) has the
        same network with a plain head; any other vocabulary is Baichuan2's, fine-tunes
        with added pieces included.
        """
        return self.vocab_size != BAICHUAN1_VOCAB_SIZE

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_attention_heads
