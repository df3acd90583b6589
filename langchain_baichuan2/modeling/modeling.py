"""The Baichuan2 decoder (7B: RoPE, 13B: ALiBi) as a native transformers model."""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg

from langchain_baichuan2.modeling.configuration import ROPE_THETA, BaichuanConfig

# transformers renamed the cache argument and output field from ``past_key_values`` to
# ``cache`` (5.2x); we support both, so the name in use is read off the installed version.
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)


def accepts_cache_names(forward: Callable) -> Callable:
    """Let ``forward(cache=...)`` also take the cache under its other name.

    Where transformers calls it ``cache``, the old name is deprecated as transformers
    does; where it still calls it ``past_key_values`` (``generate()`` passes that), the
    old name is simply mapped.
    """
    if CACHE_ARG == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def wrapper(self: nn.Module, *args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return forward(self, *args, **kwargs)

    return wrapper


# Baichuan2's RMSNorm is Llama's: fp32 statistics, cast back, times weight.
BaichuanRMSNorm = LlamaRMSNorm


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Return the per-head ALiBi slopes (BLOOM's rule), shape ``[num_heads]``, fp32.

    For a power of two ``n`` the slopes are ``2^(-8(h+1)/n)``; otherwise the slopes of
    the largest power of two ``P < n`` are followed by every other slope of ``2P``.
    """

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class BaichuanRotaryEmbedding(nn.Module):
    """Rotary cos/sin tables for the 7B variant (base 10000, half-split layout)."""

    def __init__(self, head_dim: int, base: float = ROPE_THETA) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies ``base^(-2i/head_dim)``, fp32."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.base**exponents)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(cos, sin)`` of shape ``[batch, seq, head_dim]`` in ``x``'s dtype."""
        # Angles in fp32: bf16 positions lose integer precision beyond 256.
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class BaichuanMLP(nn.Module):
    """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward block."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BaichuanAttention(nn.Module):
    """Multi-head attention with the fused ``W_pack`` projection (rows ``[Wq; Wk; Wv]``)."""

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.num_key_value_groups = 1  # no GQA; read by transformers' attention kernels
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    @accepts_cache_names
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attend over the cache plus the new tokens; returns ``[batch, seq, hidden]``."""
        batch, seq_len, _ = hidden_states.shape
        # [batch, seq, 3, heads, head_dim] -> three of [batch, heads, seq, head_dim]
        qkv = self.W_pack(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query.contiguous(),
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(batch, seq_len, self.hidden_size))


class BaichuanDecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention then SwiGLU, each with a residual."""

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = BaichuanMLP(config)
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @accepts_cache_names
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Run one decoder layer."""
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            **kwargs,
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanPreTrainedModel(PreTrainedModel):
    """Declares what Baichuan2 supports to transformers' loading machinery."""

    config_class = BaichuanConfig
    config: BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BaichuanDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # transformers builds models on the meta device; non-persistent buffers such
        # as the rotary frequencies must be recomputed when weights are materialized.
        if isinstance(module, BaichuanRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())


def alibi_bias(distance: torch.Tensor, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The causal ALiBi bias for key-minus-query distances ``[..., q, kv]``.

    ``m_h * (j - i)`` for key ``j`` at or before query ``i``, the dtype's finite minimum
    after it; returns ``[..., heads, q, kv]`` in ``dtype``.
    """
    distance = distance.float().unsqueeze(-3)
    bias = (slopes[:, None, None] * distance).to(dtype)
    return bias.masked_fill(distance > 0, torch.finfo(dtype).min)


def _alibi_mask(
    config: BaichuanConfig,
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Build the additive ALiBi mask ``[batch, heads, q_len, past_len + q_len]``.

    The bias is ``m_h * (j - i)`` for key ``j`` at or before query ``i``: relative, so it
    is the same for padded and unpadded rows, and small where it matters (near the
    diagonal) even in half precision. Masked entries get the dtype's finite minimum, so
    fully padded rows stay finite. Built directly in ``dtype``; without padding it is
    one ``[1, heads, q, kv]`` tensor expanded (not copied) over the batch.
    """
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    slopes = alibi_slopes(config.num_attention_heads).to(device)
    masked_value = torch.finfo(dtype).min
    mask = alibi_bias(k_pos[None, :] - q_pos[:, None], slopes, dtype)[None]  # [1, H, q, kv]
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            keep = attention_mask[:, None, None, -kv_len:].bool()
        elif attention_mask.dtype == torch.bool:
            keep = attention_mask
        else:  # a prepared additive 4D mask: 0 where allowed
            keep = attention_mask == 0
        if not bool(keep.all()):
            mask = mask.masked_fill(~keep, masked_value)
    return mask.expand(batch, -1, -1, -1)


class BaichuanModel(BaichuanPreTrainedModel):
    """The Baichuan2 decoder stack without the head."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            BaichuanDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = (
            BaichuanRotaryEmbedding(config.head_dim)
            if config.position_embedding == "rope"
            else None
        )
        self.post_init()

    @accepts_cache_names
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Run the decoder; ``attention_mask`` is 2D over past + new tokens (left padding)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, q_len = inputs_embeds.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0

        positions: torch.Tensor
        if position_ids is not None:
            positions = position_ids
        elif attention_mask is not None and attention_mask.dim() == 2:
            # Left padding: a row's first real token is position 0.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        else:
            positions = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)[None]

        if self.rotary_emb is not None:
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=positions,
                **cast(dict[str, Any], {CACHE_ARG: cache}),
            )
            position_embeddings = self.rotary_emb(inputs_embeds, positions)
        else:
            mask = _alibi_mask(
                self.config,
                attention_mask,
                batch,
                q_len,
                past_len,
                inputs_embeds.dtype,
                inputs_embeds.device,
            )
            position_embeddings = None

        hidden_states = inputs_embeds
        all_hidden_states: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(
                hidden_states,
                mask,
                position_embeddings=position_embeddings,
                cache=cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=cast(Any, tuple(all_hidden_states)) if output_hidden_states else None,
            **cast(dict[str, Any], {CACHE_ARG: cache}),
        )


def _is_legacy_4bit_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a Chat-4bits release (4-bit config, one ``.bin`` file)."""
    config = folder / "config.json"
    if not config.is_file() or not (folder / "pytorch_model.bin").is_file():
        return False
    try:
        quantization = json.loads(config.read_text()).get("quantization_config") or {}
    except ValueError:
        return False
    return bool(quantization.get("load_in_4bit"))


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    """Baichuan2 with its language-model head (NormHead: rows normalized at load).

    Example:
        ```python
        import langchain_baichuan2  # registers "baichuan" with the Auto classes
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained("/path/to/Baichuan2-7B-Chat")
        ```
    """

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> BaichuanForCausalLM:  # type: ignore[override]
        """Load weights as transformers does, then normalize the head rows once.

        Baichuan-1 checkpoints (``config.norm_head`` False) keep their head as stored.
        """
        folder = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if folder is not None and _is_legacy_4bit_folder(Path(folder)):
            msg = (
                f"{folder} is an official Chat-4bits checkpoint, saved by bitsandbytes 0.41 "
                "in a layout transformers cannot read; load it with "
                "langchain_baichuan2.loading.load_model_and_tokenizer (or ChatBaichuan2), "
                "which converts it"
            )
            raise ValueError(msg)
        result = super().from_pretrained(*args, **kwargs)
        # With output_loading_info=True transformers returns (model, info).
        model = result[0] if isinstance(result, tuple) else result
        if model.config.norm_head:
            model.normalize_head()
        return result

    @torch.no_grad()
    def normalize_head(self) -> None:
        """L2-normalize the rows of ``lm_head`` in fp32 (Baichuan2's NormHead).

        The official code normalizes in the forward pass; doing it once here is
        equivalent because normalization is idempotent.
        """
        weight = self.lm_head.weight
        if weight.device.type == "meta":
            raise ValueError("lm_head.weight is on the meta device; it cannot be normalized")
        normalized = nn.functional.normalize(weight.float(), dim=-1, eps=1e-12)
        weight.copy_(normalized.to(weight.dtype))

    @accepts_cache_names
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Return logits (and the loss when ``labels`` are given)."""
        kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
            hidden_states=outputs.hidden_states,
        )
