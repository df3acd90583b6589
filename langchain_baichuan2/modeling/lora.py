"""LoRA adapters on Baichuan2's linear layers: per-row (multi-adapter) deltas and merging.

A LoRA adds ``scale * B(A(x))`` to a linear layer ``y = W x`` (PEFT's ``LoraLayer``,
computed in fp32 as PEFT does on half-precision models, then cast back). ``LoraStack``
holds every adapter's ``A``/``B`` stacked per layer and module, so rows of one batch
with different adapters (and rows with none: index 0, all zeros) each get their own
delta from gathered weights, as S-LoRA/Punica do. ``merge_adapter`` folds one adapter
into the weights; ``applied`` adds one to a plain forward pass (forward hooks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from langchain_baichuan2.modeling.modeling import BaichuanMLP

# The linear layers an adapter may target, and the submodule of a decoder layer each is in.
TARGET_MODULES = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {
    "W_pack": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclass(frozen=True, eq=False)
class Adapter:
    """One LoRA adapter's weights, checked against a model.

    Attributes:
        name: Where it came from (its resolved folder): adapters are equal by name.
        scale: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
        rank: ``r``.
        weights: ``(layer, module) -> (A [r, in], B [out, r])``, fp32.
        base_model_name_or_path: The base model named in its ``adapter_config.json``.
    """

    name: str
    scale: float
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    base_model_name_or_path: str | None = None

    @property
    def modules(self) -> list[str]:
        """The module names it targets, in ``TARGET_MODULES`` order."""
        targeted = {module for _, module in self.weights}
        return [module for module in TARGET_MODULES if module in targeted]


def linear_of(model: nn.Module, layer: int, module: str) -> nn.Module:
    """The decoder layer's linear ``module`` (``W_pack``, ``o_proj``, ...)."""
    decoder_layer = model.model.layers[layer]  # type: ignore[index,union-attr]
    return getattr(getattr(decoder_layer, PARENT[module]), module)


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Fold ``adapter`` into the model's weights: ``W += scale * B @ A`` (in fp32).

    Raises:
        ValueError: A targeted layer is quantized (its weights cannot take the sum).
    """
    for (layer, module), (a, b) in adapter.weights.items():
        linear = linear_of(model, layer, module)
        if type(linear) is not nn.Linear:
            msg = (
                f"Cannot merge adapter {adapter.name} into a quantized model "
                f"({type(linear).__name__}); load the base unquantized, or do not merge"
            )
            raise ValueError(msg)
        weight = linear.weight
        delta = (b.to(weight.device) @ a.to(weight.device)) * adapter.scale
        weight.copy_((weight.float() + delta).to(weight.dtype))


def _delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return (x.float() @ a.T.to(x.device)) @ b.T.to(x.device) * scale


@contextmanager
def applied(model: nn.Module, adapter: Adapter | None) -> Iterator[None]:
    """Run the model's ordinary forward pass with ``adapter`` on every row (hooks)."""
    if adapter is None:
        yield
        return
    handles = []
    for (layer, module), (a, b) in adapter.weights.items():

        def hook(
            _: nn.Module,
            inputs: tuple[torch.Tensor, ...],
            output: torch.Tensor,
            a: torch.Tensor = a,
            b: torch.Tensor = b,
        ) -> torch.Tensor:
            return (output + _delta(inputs[0], a, b, adapter.scale)).to(output.dtype)

        handles.append(linear_of(model, layer, module).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LoraStack:
    """Every adapter a model serves, stacked per (layer, module) for per-row deltas.

    Index 0 is "no adapter" (zeros); each added adapter gets the next index, for good.
    A module no adapter targets costs nothing; ranks below the largest are padded with
    zeros (which add exactly nothing).

    Args:
        devices: Each decoder layer's device.
    """

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = devices
        self.adapters: list[Adapter] = []
        self.rank = 0
        # (layer, module) -> A [N+1, in, rank], B [N+1, rank, out]
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.scales: list[torch.Tensor] = [torch.zeros(1, device=d) for d in devices]

    def index_of(self, name: str | None) -> int:
        """The index of the adapter named ``name`` (0 for None)."""
        if name is None:
            return 0
        for index, adapter in enumerate(self.adapters, start=1):
            if adapter.name == name:
                return index
        raise KeyError(f"Adapter {name} is not loaded")

    def add(self, adapter: Adapter, shapes: dict[str, tuple[int, int]]) -> int:
        """Stack ``adapter`` (once); return its index.

        Args:
            adapter: The adapter.
            shapes: Each module's ``(out, in)``.
        """
        known = [i for i, a in enumerate(self.adapters, start=1) if a.name == adapter.name]
        if known:
            return known[0]
        self.adapters.append(adapter)
        count = len(self.adapters) + 1
        self.rank = max(self.rank, adapter.rank)
        keys = sorted({key for a in self.adapters for key in a.weights})
        stacks = {}
        for layer, module in keys:
            out_features, in_features = shapes[module]
            device = self.devices[layer]
            a_stack = torch.zeros(count, in_features, self.rank, device=device)
            b_stack = torch.zeros(count, self.rank, out_features, device=device)
            for index, each in enumerate(self.adapters, start=1):
                if (layer, module) in each.weights:
                    a, b = each.weights[layer, module]
                    a_stack[index, :, : each.rank] = a.T.to(device)
                    b_stack[index, : each.rank] = b.T.to(device)
            stacks[layer, module] = (a_stack, b_stack)
        self.stacks = stacks
        scales = torch.tensor([0.0, *(a.scale for a in self.adapters)])
        self.scales = [scales.to(d) for d in self.devices]
        return count - 1

    def rows(self, index: torch.Tensor | int) -> LoraRows | None:
        """The per-row view for a batch whose rows use adapters ``index`` (None: all base)."""
        if isinstance(index, int) and index == 0:
            return None
        return LoraRows(self, index)


class LoraRows:
    """The adapters of one batch's rows: ``index`` is one int (every row) or ``[B]``."""

    def __init__(self, stack: LoraStack, index: torch.Tensor | int) -> None:
        self.stacks = stack.stacks
        self.scales = stack.scales
        self.index = index

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """``y`` (the base layer's output for ``x``, ``[B, T, *]``) plus each row's delta."""
        stacked = self.stacks.get((layer, module))
        if stacked is None:
            return y
        a_stack, b_stack = stacked
        index = self.index
        if isinstance(index, int):
            a, b, scale = a_stack[index], b_stack[index], self.scales[layer][index]
        else:
            index = index.to(a_stack.device)
            a, b = a_stack[index], b_stack[index]  # [B, in, r], [B, r, out]
            scale = self.scales[layer][index][:, None, None]
        delta = torch.matmul(torch.matmul(x.float(), a), b) * scale
        return (y + delta).to(y.dtype)

    def linear(self, linear: nn.Module, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """``linear(x)`` with each row's adapter."""
        return self.add(linear(x), x, layer, module)

    def mlp(self, mlp: BaichuanMLP, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The SwiGLU block of ``mlp`` with each row's adapter on its three linears."""
        gate = self.linear(mlp.gate_proj, x, layer, "gate_proj")
        up = self.linear(mlp.up_proj, x, layer, "up_proj")
        return self.linear(mlp.down_proj, mlp.act_fn(gate) * up, layer, "down_proj")
