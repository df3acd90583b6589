"""Baichuan2 (7B: RoPE, 13B: ALiBi) written with vLLM's parallel layers.

Loaded by vLLM through the plugin in this package; it reads official checkpoints as
they are: the fused ``W_pack`` goes whole into a tensor-parallel QKV projection, whose
weight loader splits it into q, k and v (so quantized layouts, packed along either
dimension, split correctly too), the separate ``gate_proj``/``up_proj`` into one merged
projection, and the ``lm_head`` rows are L2-normalized in fp32 while loading
(Baichuan2's NormHead). Every tensor an unquantized checkpoint's config implies must
arrive, and no other, or loading raises the ``CheckpointError`` that the folder check
gives. The position scheme is ``config.position_embedding``, never guessed from the
hidden size. ALiBi slopes are computed for all heads and each tensor-parallel rank keeps
its own heads'.

Baichuan-1 (Baichuan-7B: RoPE, Baichuan-13B: ALiBi) is the same network without
NormHead: its head is used as stored. Its config has no key that says so; both of its
releases have the 64,000-piece vocabulary (Baichuan2's has 125,696), so that vocabulary
size is read as Baichuan-1 and logged. Any other size (fine-tunes with added pieces,
small test models) is Baichuan2's network, NormHead included.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from itertools import islice
from typing import Any, ClassVar, cast

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP, SupportsQuant
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from langchain_baichuan2.loading.checkpoint import (
    CheckpointError,
    check_tensor_names,
    weights_source,
)
from langchain_baichuan2.modeling.configuration import ROPE_THETA, BaichuanConfig
from langchain_baichuan2.modeling.modeling import alibi_slopes

logger = logging.getLogger(__name__)


# Checkpoint names stored separately but computed as one merged projection.
_MERGED = {".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}


class BaichuanMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up as one column-parallel matmul."""

    def __init__(
        self, config: BaichuanConfig, quant_config: QuantizationConfig | None, prefix: str
    ) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            msg = f"Baichuan2 uses hidden_act 'silu', got {config.hidden_act!r}"
            raise ValueError(msg)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, hidden]`` to ``[tokens, hidden]``."""
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class BaichuanAttention(nn.Module):
    """Multi-head attention over vLLM's paged KV cache, with RoPE or ALiBi."""

    def __init__(
        self,
        config: BaichuanConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        total_heads = config.num_attention_heads
        if total_heads % tp_size:
            msg = (
                f"num_attention_heads ({total_heads}) is not divisible by "
                f"tensor_parallel_size ({tp_size})"
            )
            raise ValueError(msg)
        self.num_heads = total_heads // tp_size
        self.head_dim = config.hidden_size // total_heads
        self.W_pack = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            total_heads,
            total_heads,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.W_pack",
        )
        self.o_proj = RowParallelLinear(
            config.hidden_size,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        slopes: list[float] | None = None
        self.rotary_emb: nn.Module | None = None
        if config.position_embedding == "rope":
            self.rotary_emb = get_rope(
                self.head_dim,
                max_position=config.max_position_embeddings or config.model_max_length,
                is_neox_style=True,  # Baichuan2 rotates the two halves (Llama layout)
                rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
            )
        else:
            first = get_tensor_model_parallel_rank() * self.num_heads
            slopes = alibi_slopes(total_heads)[first : first + self.num_heads].tolist()
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_heads,
            alibi_slopes=slopes,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Attend over this rank's heads; the output projection sums the ranks."""
        qkv, _ = self.W_pack(hidden_states)
        q, k, v = qkv.chunk(3, dim=-1)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class BaichuanDecoderLayer(nn.Module):
    """Pre-norm block: attention, then the MLP, each added to the residual stream."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = cast(BaichuanConfig, vllm_config.model_config.hf_config)
        quant_config = vllm_config.quant_config
        self.self_attn = BaichuanAttention(
            config, vllm_config.cache_config, quant_config, f"{prefix}.self_attn"
        )
        self.mlp = BaichuanMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the block's output and the residual stream (added by the next norm)."""
        # vLLM's RMSNorm adds the residual and normalizes in one step.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": -1,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class BaichuanModel(nn.Module):
    """The decoder stack; with pipeline parallelism, this rank's slice of it."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        pp = get_pp_group()
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size)
            if pp.is_first_rank
            else PPMissingLayer()
        )
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: BaichuanDecoderLayer(vllm_config, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if pp.is_last_rank
            else PPMissingLayer()
        )
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (vocabulary-parallel)."""
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """Final hidden states, or what the next pipeline stage needs."""
        pp = get_pp_group()
        residual: torch.Tensor | None
        if pp.is_first_rank:
            if inputs_embeds is None:
                assert input_ids is not None
                inputs_embeds = self.embed_input_ids(input_ids)
            hidden_states = inputs_embeds
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        assert residual is not None
        if not pp.is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class BaichuanForCausalLM(nn.Module, SupportsLoRA, SupportsPP, SupportsQuant):
    """Baichuan2 (NormHead) or Baichuan-1 (plain head), for vLLM (``architectures``).

    LoRA (``--enable-lora``): PEFT adapters on any of ``W_pack``, ``o_proj``,
    ``gate_proj``, ``up_proj``, ``down_proj``. ``W_pack`` is one packed module of one
    LoRA (B is ``[3 * hidden, r]``, split into q, k and v per rank); ``gate_proj`` and
    ``up_proj`` are two LoRAs on the merged ``gate_up_proj``. No embedding modules:
    vLLM refuses adapters on ``embed_tokens`` or ``lm_head`` (NormHead) by name.
    """

    packed_modules_mapping = {
        "W_pack": ["W_pack"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    embedding_modules: ClassVar[dict[str, str]] = {}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if not isinstance(config, BaichuanConfig):
            msg = f"expected a BaichuanConfig (model_type 'baichuan'), got {type(config).__name__}"
            raise TypeError(msg)
        config.validate_architecture()
        self.config = config
        self.model_name = vllm_config.model_config.model
        self.norm_head = config.norm_head
        if not self.norm_head:
            logger.info(
                "Vocabulary of %d pieces: a Baichuan-1 checkpoint, its head used as stored "
                "(no NormHead)",
                config.vocab_size,
            )
        self.model = BaichuanModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head: nn.Module
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (vocabulary-parallel)."""
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """Run this rank's part of the decoder."""
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary (gathered from the ranks)."""
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load official tensors into this rank's parameters; return the names loaded.

        An unquantized checkpoint's tensor names are checked as ``check_checkpoint``
        checks a folder's, with the same error: vLLM would leave a parameter no tensor
        reached uninitialised, and a model id downloaded by the workers was never
        checked as a folder. A merged ``gate_up_proj`` is loaded once both halves are.

        Raises:
            CheckpointError: Naming each missing or unexpected tensor (a quantized
                checkpoint: each unexpected one), or a tensor an unquantized checkpoint
                stores as integers.
        """
        params = dict(self.named_parameters())
        received: list[str] = []
        unknown: list[str] = []
        halves: dict[str, set[int]] = {}
        loaded: set[str] = set()
        for name, tensor in weights:
            received.append(name)
            if is_pp_missing_parameter(name, self):
                continue
            # W_pack stays whole: with no shard id, the QKV loader splits it into q, k, v.
            param_name, shard = name, None
            for part, (merged, index) in _MERGED.items():
                if part in name:
                    param_name, shard = name.replace(part, merged), index
            if param_name not in params:
                unknown.append(name)
                continue
            if self.quant_config is None and not tensor.is_floating_point():
                # Copying it into a float parameter would cast it silently.
                msg = (
                    f"Tensor {name!r} is stored as {tensor.dtype}, not a floating-point "
                    "type, and the checkpoint declares no quantization: the weights "
                    "file is not a usable Baichuan checkpoint"
                )
                raise CheckpointError(msg)
            if name == "lm_head.weight" and self.norm_head:
                # NormHead: normalize the stored rows in fp32 before any cast.
                tensor = nn.functional.normalize(tensor.float(), dim=-1, eps=1e-12)
            param = params[param_name]
            if shard is None:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(param_name)
            else:
                cast(Any, param).weight_loader(param, tensor, shard)  # vLLM sets it
                halves.setdefault(param_name, set()).add(shard)
                if len(halves[param_name]) == len(_MERGED):
                    loaded.add(param_name)
        if self.quant_config is None:
            # Also allows what the folder check allows (Baichuan-1's RoPE buffers).
            check_tensor_names(received, self.config, weights_source(self.model_name))
        elif unknown:
            msg = (
                f"The weights of {self.model_name} hold {len(unknown)} unexpected "
                f"tensor(s): {', '.join(unknown[:8])}"
            )
            raise CheckpointError(msg)
        return loaded
