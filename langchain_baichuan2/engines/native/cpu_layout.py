"""How the native engine stores and multiplies its weights on a CPU: the one place that decides.

Decode multiplies one row per sequence by every weight, so on a CPU a step is bound by
how fast the weights are read, and the vocabulary projection (125,696 x H) is most of
them. The kernels BLAS picks for these shapes read the weights at a fraction of the
memory bandwidth; ``lay_out`` and ``HeadProjection`` pick kernels measured faster
(``benchmarks/bench_cpu_decode.py``). Only memory order and summation order change,
never the values. GPUs, fp16 and quantized layers keep the plain modules.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from langchain_baichuan2.modeling import BaichuanForCausalLM

logger = logging.getLogger(__name__)

# oneDNN packs a weight for a row count it is told; measured best for 1-16 rows (the
# speeds differ by ~5%).
_PACK_ROWS = {torch.float32: 16, torch.bfloat16: 1}


def cpu_fp32(weight: torch.Tensor | None) -> bool:
    """Whether ``weight`` is a plain fp32 tensor on a CPU."""
    return weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32


def _store_transposed(weight: torch.Tensor) -> None:
    """Make ``weight`` a view of its contiguous transpose (same values, ``[in, out]`` order)."""
    if weight.is_contiguous():
        weight.data = weight.data.t().contiguous().t()


def lay_out(model: BaichuanForCausalLM) -> None:
    """Re-store ``model``'s fp32 CPU linears (decoder layers and head) as ``[in, out]``.

    BLAS reads an ``[in, out]`` matrix for one row of input faster than an ``[out,
    in]`` one (decode is one row per sequence; the head ~1.2x, decoder linears alike),
    and prefill is no slower. The values (and every result of ``linear``) are unchanged
    and no memory is added. Other devices, dtypes and quantized layers are left alone.
    """
    linears = [*model.model.layers.modules(), model.lm_head]
    for module in linears:
        if type(module) is nn.Linear and cpu_fp32(module.weight):
            _store_transposed(module.weight)


class HeadProjection:
    """The language-model head with the CPU kernel measured fastest for its dtype and rows.

    On a CPU (``benchmarks/bench_cpu_decode.py``, 125,696 x 512): fp32, one row:
    ``x @ W.T`` with ``W`` stored ``[in, out]`` (``lay_out``), at about the memory
    bandwidth; fp32, 2-16 rows, and bf16, any rows: oneDNN's ``linear`` on a weight
    packed once for it (one more copy of the head, made on first use), which reads
    the head once whatever the row count (BLAS reads it once per row or repacks it
    per call: 2-3x slower at 8 rows). bf16 gives the same values as ``linear``. If
    packing fails (a torch without oneDNN), fp32 several rows run ``W @ x.T`` and bf16
    the plain module; elsewhere (GPU, fp16, quantized heads) the plain module runs.
    ``kernel`` names the choice.
    """

    def __init__(self, lm_head: nn.Module) -> None:
        self.module = lm_head
        weight = lm_head.weight if type(lm_head) is nn.Linear else None
        on_cpu = weight is not None and weight.device.type == "cpu"
        packable = on_cpu and weight is not None and weight.dtype in _PACK_ROWS
        self.weight: torch.Tensor | None = weight if packable else None
        self.kernel = "packed" if packable else "linear"
        self._packed: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` (contiguous, the head's dtype) of hidden states ``[B, H]``."""
        weight = self.weight
        if weight is None or hidden.device != weight.device:  # (a split model's hook moves it)
            return self.module(hidden)
        if weight.dtype == torch.float32 and hidden.shape[0] == 1:
            _store_transposed(weight)  # done already where ``lay_out`` ran
            return hidden @ weight.t()
        if self.kernel == "packed" and self._packed is None:
            self._packed = self._pack(weight)
        if self._packed is not None:
            packed = torch.ops.mkldnn._linear_pointwise
            return packed(hidden.contiguous(), self._packed, None, "none", [], "")
        if weight.dtype == torch.float32:  # contiguous: xgrammar's mask wants row-major
            return (weight @ hidden.T).T.contiguous()
        return self.module(hidden)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        """OneDNN's packed copy of ``weight``; None (logged once) where it cannot."""
        try:
            rows = _PACK_ROWS[weight.dtype]
            return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)
        except Exception as e:  # a torch built without oneDNN
            logger.warning("Packing the head for oneDNN failed (%s); using BLAS", e)
            self.kernel = "blas" if weight.dtype == torch.float32 else "linear"
            return None
