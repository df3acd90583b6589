"""Rows (requests decoding at once) the native engine holds per GPU, computed, not measured.

For each card, model (7B/13B, bf16 and the official 4-bit checkpoints) and request
length (prompt + max_tokens): the weights' bytes (the model built on the meta device),
then the engine's own default key/value budget (``default_kv_cache_bytes``, asked with
the card's memory in place of the CUDA queries: the total less the CUDA context less
the weights is free after loading), then the slot storage the engine fixes with it
(``SlotCache.fix`` on the meta device: what ``ChatBaichuan2``'s default prefix-cache
cap leaves, at least one full-context row) and ``min(max_rows, storage // length)``:
slots sized by what admission reserved.
No GPU needed:

    python benchmarks/rows_per_card.py
"""

from __future__ import annotations

import argparse
import inspect
from unittest import mock

import torch
from common import real_config

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines.native import DEFAULT_MAX_ROWS, NativeEngine
from langchain_baichuan2.engines.native.budget import default_kv_cache_bytes
from langchain_baichuan2.engines.native.slots import SlotCache
from langchain_baichuan2.modeling import BaichuanConfig, BaichuanForCausalLM

GIB = 2**30
# What torch reports as each card's total memory (L4 / A10-class, A100-40GB, H100-80GB).
CARDS = {"24 GB": 22.0 * GIB, "40 GB": 39.4 * GIB, "80 GB": 79.2 * GIB}
# Taken by the CUDA context and libraries before any tensor (outside torch's counts).
CUDA_CONTEXT = GIB // 2
# Bytes per parameter of a bitsandbytes NF4 linear with double quantization: 4 bits, an
# 8-bit scale per 64 weights and an fp32 scale per 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Positions the slot storage leaves the prefix cache (ChatBaichuan2's default cap).
PREFIX_TOKENS = ChatBaichuan2.model_fields["prefix_cache_tokens"].default


def weight_bytes(config: BaichuanConfig, four_bit: bool) -> int:
    """Bytes of the weights in bf16, or with the decoder's linears in NF4 (4-bit)."""
    with torch.device("meta"):
        model = BaichuanForCausalLM(config)
    total = 0.0
    for name, parameter in model.named_parameters():
        quantized = four_bit and ".layers." in name and parameter.dim() == 2
        total += parameter.numel() * (NF4_BYTES if quantized else 2)
    return int(total)


def position_bytes(config: BaichuanConfig) -> int:
    """Key/value bytes of one token over all layers in bf16 (layers x 2 x hidden x 2)."""
    return config.num_hidden_layers * 2 * config.hidden_size * 2


def engine_defaults() -> dict:
    """What a default ``NativeEngine`` passes its budget: its rows and prefill chunk.

    Only the arguments ``default_kv_cache_bytes`` takes (older engines took neither).
    """
    engine = inspect.signature(NativeEngine).parameters
    budget = inspect.signature(default_kv_cache_bytes).parameters
    defaults = {}
    if "rows" in budget:
        defaults["rows"] = engine["max_rows"].default
    if "prefill_tokens" in budget and "prefill_chunk_tokens" in engine:
        defaults["prefill_tokens"] = engine["prefill_chunk_tokens"].default
    return defaults


def kv_budget(config: BaichuanConfig, free: int) -> int:
    """The engine's default key/value budget on a GPU with ``free`` bytes after loading."""
    devices = [torch.device("cuda")] * config.num_hidden_layers
    with (
        mock.patch.object(torch.cuda, "mem_get_info", return_value=(free, free)),
        mock.patch.object(torch.cuda, "memory_reserved", return_value=0),
        mock.patch.object(torch.cuda, "memory_allocated", return_value=0),
    ):
        return default_kv_cache_bytes(
            devices, position_bytes(config), config, config.context_length, **engine_defaults()
        )


def storage_positions(config: BaichuanConfig, budget: int) -> int:
    """Positions the engine's fixed slot storage holds with this budget (``SlotCache.fix``).

    Built on the meta device: the engine's own sizing, no memory taken.
    """
    if budget < position_bytes(config):
        return 0
    cache = SlotCache(
        [torch.device("meta")] * config.num_hidden_layers,
        config.num_attention_heads,
        config.head_dim,
        torch.bfloat16,
        max_length=config.context_length,
        max_bytes=budget,
        max_rows=DEFAULT_MAX_ROWS,
    )
    cache.budget.prefix.grow_to(PREFIX_TOKENS)
    cache.fix()
    return cache.capacity


def rows_table(lengths: tuple[int, ...] = (1024, 4096)) -> list[dict]:
    """One row per card and model: weights, budget and rows at each request length."""
    table = []
    for card, total in CARDS.items():
        for name in ("7B", "13B"):
            config = real_config(name)
            for four_bit in (False, True):
                weights = weight_bytes(config, four_bit)
                free = int(total) - CUDA_CONTEXT - weights
                budget = kv_budget(config, free) if free > 0 else 0
                row = {
                    "card": card,
                    "model": f"{name} {'4-bit' if four_bit else 'bf16'}",
                    "weights GiB": weights / GIB,
                    "KV budget GiB": budget / GIB,
                }
                for length in lengths:
                    fits = storage_positions(config, budget) // length
                    rows = min(DEFAULT_MAX_ROWS, fits) if free > 0 else "does not fit"
                    row[f"rows at {length // 1024}k"] = rows
                table.append(row)
    return table


def main(argv: list[str] | None = None) -> None:
    """Print the table in Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    table = rows_table()
    columns = list(table[0])
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for row in table:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
