"""How the native engine stores and multiplies its weights on a CPU: the one place that decides.

Decode multiplies one row per sequence by every weight, so on a CPU a step is bound by
how fast the weights are read, and the vocabulary projection (125,696 x H) is most of
them. The kernels BLAS picks for these shapes read the weights at a fraction of the
memory bandwidth; ``lay_out`` and ``HeadProjection`` pick kernels measured faster
(``benchmarks/bench_cpu_decode.py``), some on oneDNN-packed copies of the weights
(``Packed``). Only memory order and summation order change, never the values. GPUs,
fp16 and quantized layers keep the plain modules. ``free_openmp_threads`` keeps the
threads that hand work to the engine's worker from slowing its products down.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import nn

from langchain_baichuan2.modeling import BaichuanForCausalLM

logger = logging.getLogger(__name__)

# oneDNN packs a weight for a row count it is told; measured best for 1-16 rows (the
# speeds differ by ~5%).
_PACK_ROWS = {torch.float32: 16, torch.bfloat16: 1}


class Packed:
    """A weight's oneDNN-packed copy for ``linear``, remade whenever the weight changes.

    The copy is made on first use and again after the weight is changed in place
    (``merge_adapter``, ``normalize_head``: its version moves) or replaced (its
    storage moves), so it never serves stale values (an inference tensor has no
    version: one made under ``torch.inference_mode`` must not change in place).
    ``failed`` is set (and logged once) where packing cannot be done (a torch
    without oneDNN).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.failed = False
        self._copy: torch.Tensor | None = None
        self._stamp: tuple[int, int] | None = None

    def of(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of ``weight`` as it is now; None where packing failed."""
        stamp = (weight.data_ptr(), -1 if weight.is_inference() else weight._version)
        if stamp != self._stamp and not self.failed:
            self._copy = None  # the stale copy's memory goes before the new one is made
            try:
                rows = _PACK_ROWS[weight.dtype]
                self._copy = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)
                self._stamp = stamp
            except Exception as e:  # a torch built without oneDNN
                logger.warning("Packing %s for oneDNN failed (%s); using BLAS", self.what, e)
                self.failed = True
        return self._copy

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """``linear(x, weight)`` (``x`` ``[N, in]``) on the packed copy; None if none."""
        packed = self.of(weight)
        if packed is None:
            return None
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


def cpu_fp32(weight: torch.Tensor | None) -> bool:
    """Whether ``weight`` is a plain fp32 tensor on a CPU."""
    return weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32


def _store_transposed(weight: torch.Tensor) -> None:
    """Make ``weight`` a view of its contiguous transpose (same values, ``[in, out]`` order)."""
    if weight.is_contiguous():
        weight.data = weight.data.t().contiguous().t()


def lay_out(model: BaichuanForCausalLM) -> None:
    """Lay ``model``'s CPU linears out for decode (the head's kernel is ``HeadProjection``).

    fp32 linears (decoder layers and head) are re-stored as ``[in, out]``: BLAS reads
    that order for one row of input faster (the head ~1.2x, decoder linears alike), and
    prefill is no slower; no memory is added and the values are unchanged. bf16
    decoder linears keep ``linear``: oneDNN-packed copies ran them 1.3-1.7x faster
    alone, but no faster in the engine, at twice their memory (``bench_cpu_decode.py``).
    Other devices, dtypes and quantized layers are left alone.
    """
    for module in [*model.model.layers.modules(), model.lm_head]:
        if type(module) is nn.Linear and cpu_fp32(module.weight):
            _store_transposed(module.weight)


class HeadProjection:
    """The language-model head with the CPU kernel measured fastest for its dtype and rows.

    On a CPU (``benchmarks/bench_cpu_decode.py``, 125,696 x 512): fp32, one row:
    ``x @ W.T`` with ``W`` stored ``[in, out]`` (``lay_out``), at about the memory
    bandwidth; fp32, 2-16 rows, and bf16, any rows: oneDNN's ``linear`` on a packed
    copy of the head (``Packed``: one more copy, made on first use), which reads
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
        self._packed = Packed("the head")

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` (contiguous, the head's dtype) of hidden states ``[B, H]``."""
        weight = self.weight
        if weight is None or hidden.device != weight.device:  # (a split model's hook moves it)
            return self.module(hidden)
        if weight.dtype == torch.float32 and hidden.shape[0] == 1:
            _store_transposed(weight)  # done already where ``lay_out`` ran
            return hidden @ weight.t()
        if self.kernel == "packed":
            logits = self._packed(hidden, weight)
            if logits is not None:
                return logits
            self.kernel = "blas" if weight.dtype == torch.float32 else "linear"
        if weight.dtype == torch.float32:  # contiguous: xgrammar's mask wants row-major
            return (weight @ hidden.T).T.contiguous()
        return self.module(hidden)


@functools.cache
def _pause_openmp() -> Callable[[int], int] | None:
    """GNU OpenMP's ``omp_pause_resource_all`` where torch runs on it, else None.

    Only a copy already loaded is used (never another one): the system's name or the
    copy bundled with torch (some wheels rename it ``libgomp-<hash>.so.1``).
    """
    bundled = sorted(str(p) for p in (Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    for name in ["libgomp.so.1", *bundled]:
        try:
            gomp = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            pause = gomp.omp_pause_resource_all
        except (OSError, AttributeError):  # not loaded, too old, or not a POSIX system
            continue
        pause.argtypes = [ctypes.c_int]
        pause.restype = ctypes.c_int
        return cast(Callable[[int], int], pause)
    return None


def free_openmp_threads(device: torch.device) -> None:
    """Let the calling thread's idle OpenMP threads exit where the model runs on a CPU.

    GNU OpenMP keeps a pool of threads for every thread that ran a parallel region
    (loading a model, an embedding forward, the caller's own torch code). Once the
    process holds more of them than it has cores, every team waits for its threads by
    sleeping instead of spinning, and the engine worker's decode step, dozens of short
    products, ran 1.13-1.21x slower end to end on 2 cores (its decoder products ~2.4x
    slower; ``bench_cpu_decode.py --part threads`` and ``--pools-kept``). So each
    thread that hands the engine a request, or has just run an embedding forward,
    frees its pool, and so does the engine's worker whenever it goes idle (another
    engine may be serving); a pool is made again the next time its thread needs it.
    Nothing happens on other devices or without GNU OpenMP.
    """
    pause = _pause_openmp() if device.type == "cpu" else None
    if pause is not None:
        pause(1)  # omp_pause_soft: the pool's threads end, nothing else is undone
