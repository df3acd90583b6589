"""GPU check: random 7B- and 13B-shaped Baichuan2 on CUDA in bf16, through our engine.

No download: the models are built directly on the device with random weights (the
tokenizer is a tiny trained one; ids beyond it are suppressed). Prints one table:
prefill tokens/s at 2k; the engine's decode tokens/s at batch 1 and 8, uncompiled and
compiled (``torch.compile``, CUDA graphs; its compile time reported apart); the share
of the HBM-bandwidth bound each reaches at batch 1 (weight bytes read per step /
measured copy bandwidth); 4-bit (bitsandbytes NF4, uncompiled); plain ``generate()`` as
the baseline; peak memory.

    python benchmarks/gpu_check.py                  # on a CUDA machine, < 6 minutes
    python benchmarks/gpu_check.py --tiny --device cpu   # smoke test of the script
"""

from __future__ import annotations

import argparse
import contextvars
import datetime
import gc
import tempfile
import threading
import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig

from langchain_baichuan2.engines.base import SamplingParams
from langchain_baichuan2.engines.native import NativeEngine
from langchain_baichuan2.loading import LoadedModel, weight_bytes_by_dtype
from langchain_baichuan2.modeling import (
    BaichuanConfig,
    BaichuanForCausalLM,
    BaichuanTokenizer,
)
from langchain_baichuan2.testing import make_tiny_checkpoint

SHAPES = {
    "7B": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "position_embedding": "rope",
    },
    "13B": {
        "hidden_size": 5120,
        "intermediate_size": 13696,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "position_embedding": "alibi",
    },
}
TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(1 << 29, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = min(timed(lambda: y.copy_(x), device) for _ in range(5))
    return 2 * x.numel() / seconds


def build(shape: dict, vocab: int, dtype: torch.dtype, device: torch.device) -> BaichuanForCausalLM:
    cfg = dict(shape)
    position = cfg.pop("position_embedding", "rope")
    config = BaichuanConfig(
        vocab_size=vocab,
        max_position_embeddings=4096 if position == "rope" else None,
        position_embedding=position,
        **cfg,
    )
    with torch.device(device):
        model = BaichuanForCausalLM(config).to(dtype).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.normalize_head()
    return model


def quantize_4bit(model: BaichuanForCausalLM) -> None:
    """Swap the decoder's linear layers for bitsandbytes NF4 (double quant) in place."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=False,
                        compute_dtype=torch.bfloat16,
                        quant_type="nf4",
                        compress_statistics=True,
                    )
                    q.weight = bnb.nn.Params4bit(
                        child.weight.data.cpu(),
                        requires_grad=False,
                        quant_type="nf4",
                        compress_statistics=True,
                    ).to(child.weight.device)
                    setattr(parent, name, q)
    gc.collect()


def engine_for_model(
    model: BaichuanForCausalLM, tokenizer: BaichuanTokenizer, compile: bool
) -> NativeEngine:
    generation = GenerationConfig(eos_token_id=2, pad_token_id=0)
    loaded = LoadedModel(model, tokenizer, generation, path=None)  # type: ignore[arg-type]
    return NativeEngine(loaded, compile=compile)


def engine_decode(
    engine: NativeEngine, prompts: list[list[int]], n: int, suppress: list[int]
) -> None:
    """Stream every prompt from its own thread, as concurrent users would."""
    params = SamplingParams(
        max_new_tokens=n, extra=(("min_new_tokens", n), ("suppress_tokens", suppress))
    )
    with engine.gather(len(prompts)):  # start together, as one batch
        # Each thread runs in a copy of this context, so its request counts for the gather.
        threads = [
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(lambda p=p: list(engine.stream(p, params)),),
            )
            for p in prompts
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def measure(name: str, model, tokenizer, args, device, bandwidth: float) -> dict:
    vocab = model.config.vocab_size
    suppress = list(range(len(tokenizer), vocab))
    prompt = torch.randint(
        3, len(tokenizer), (args.prefill,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    ids = torch.tensor([prompt], device=device)
    row: dict = {"model": name}
    with torch.inference_mode():
        model(ids[:, :16])
        row["prefill tok/s"] = args.prefill / min(
            timed(lambda: model(ids, logits_to_keep=1), device) for _ in range(2)
        )
    short = prompt[:64]
    n = args.new_tokens
    step_bytes = (
        sum(weight_bytes_by_dtype(model).values()) - model.model.embed_tokens.weight.numel() * 2
    )
    batches = {batch: [short[i:] + short[:i] for i in range(batch)] for batch in (1, 8)}
    for compile in (False, True) if args.compile else (False,):
        label = " compiled" if compile else ""
        engine = engine_for_model(model, tokenizer, compile)
        for prompts in batches.values():  # warm-up (and, compiled, the graphs)
            engine_decode(engine, prompts, n, suppress)
        if compile:
            row["compile s"] = engine.slot_model.compile_seconds
            if not engine.slot_model.compile:
                row["compile s"] = "fell back"
        for batch, prompts in batches.items():
            seconds = timed(lambda e=engine, p=prompts: engine_decode(e, p, n, suppress), device)
            row[f"decode b{batch}{label} tok/s"] = batch * n / seconds
        row[f"HBM bound %{label}"] = 100 * row[f"decode b1{label} tok/s"] * step_bytes / bandwidth
        engine.shutdown()
    gen_ids = torch.tensor([short], device=device)
    with torch.inference_mode():

        def generate() -> None:
            model.generate(
                gen_ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                suppress_tokens=suppress,
                pad_token_id=0,
            )

        generate()
        row["generate() b1 tok/s"] = n / timed(generate, device)
    if device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=125696)
    parser.add_argument("--no-4bit", dest="four_bit", action="store_false")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.prefill, args.vocab = min(args.prefill, 256), 4096
    tokenizer = BaichuanTokenizer.from_pretrained(make_tiny_checkpoint(tempfile.mkdtemp()))
    bandwidth = copy_bandwidth(device)
    rows = []
    for name, shape in SHAPES.items():
        shape = {**shape, **TINY} if args.tiny else shape
        model = build(shape, args.vocab, torch.bfloat16, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows.append(measure(f"{name} bf16", model, tokenizer, args, device, bandwidth))
        if args.four_bit and name == "7B":
            quantize_4bit(model)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            args_4bit = argparse.Namespace(**{**vars(args), "compile": False})  # bnb: eager
            rows.append(measure(f"{name} nf4", model, tokenizer, args_4bit, device, bandwidth))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"GPU check — {gpu} — {datetime.date.today()} — copy bandwidth "
        f"{bandwidth / 1e12:.2f} TB/s — prefill {args.prefill} tokens, decode {args.new_tokens}"
    )
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "model"))
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for r in rows:
        cells = [r.get(c, "") for c in columns]
        print(
            f"| {r['model']} | "
            + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells)
            + " |"
        )
    for r in rows:
        for label in ("", " compiled"):
            if f"decode b1{label} tok/s" in r:
                print(
                    f"{r['model']}{label}: engine b1 / generate() = "
                    f"{r[f'decode b1{label} tok/s'] / r['generate() b1 tok/s']:.2f}x; "
                    f"{r[f'HBM bound %{label}']:.0f}% of the HBM-bandwidth bound"
                )


if __name__ == "__main__":
    main()
