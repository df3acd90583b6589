"""GPU check: random 7B- and 13B-shaped Baichuan2 on CUDA in bf16, through our engine.

No download: the models are built directly on the device with random weights (the
tokenizer is a tiny trained one; ids beyond it are suppressed). Prints one table:
prefill tokens/s; the engine's decode tokens/s at batch 1 (after a 2k-token prompt)
and batch 8 (prompts of 1k..4k tokens, so key length and admission matter),
uncompiled and compiled (``torch.compile``, CUDA graphs, warmed up before serving:
its time is reported apart); each number's share of the HBM-bandwidth bound
(weights plus the keys/values a step reads, over the measured copy bandwidth); 4-bit
(bitsandbytes NF4, uncompiled); plain ``generate()`` as the baseline; peak memory.
Then the goals for 7B bf16, each PASS or FAIL: batch 1 at >= 60% of the bound and
>= 2x ``generate()``, batch 8 >= 5x batch 1.

    python benchmarks/gpu_check.py                  # on a CUDA machine
    python benchmarks/gpu_check.py --models 7B --no-4bit   # the goals only, sooner
    python benchmarks/gpu_check.py --tiny --device cpu     # smoke test of the script
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


def build(
    shape: dict, vocab: int, context: int, dtype: torch.dtype, device: torch.device
) -> BaichuanForCausalLM:
    cfg = dict(shape)
    position = cfg.pop("position_embedding", "rope")
    config = BaichuanConfig(
        vocab_size=vocab,
        max_position_embeddings=context if position == "rope" else None,
        model_max_length=context,
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
    model: BaichuanForCausalLM, tokenizer: BaichuanTokenizer, compile: bool, max_rows: int
) -> NativeEngine:
    generation = GenerationConfig(eos_token_id=2, pad_token_id=0)
    loaded = LoadedModel(model, tokenizer, generation, path=None)  # type: ignore[arg-type]
    return NativeEngine(loaded, compile=compile, max_rows=max_rows)


def engine_decode(
    engine: NativeEngine, prompts: list[list[int]], n: int, suppress: list[int]
) -> float:
    """Stream every prompt from its own thread, as concurrent users would; decode tok/s.

    The rate is counted over the window in which every stream is decoding (after the
    last prefill, before the first stream ends), so prefills do not count.
    """
    params = SamplingParams(
        max_new_tokens=n, extra=(("min_new_tokens", n), ("suppress_tokens", suppress))
    )
    arrivals: list[list[tuple[float, int]]] = [[] for _ in prompts]

    def consume(i: int) -> None:
        for chunk in engine.stream(prompts[i], params):
            if chunk.token_ids:
                arrivals[i].append((time.perf_counter(), len(chunk.token_ids)))

    with engine.gather(len(prompts)):  # start together, as one batch
        # Each thread runs in a copy of this context, so its request counts for the gather.
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(consume, i))
            for i in range(len(prompts))
        ]
        for t in threads:
            t.start()
    for t in threads:
        t.join()
    start = max(times[0][0] for times in arrivals)
    end = min(times[-1][0] for times in arrivals)
    tokens = sum(count for times in arrivals for at, count in times if start < at <= end)
    return tokens / (end - start)


def kv_positions(prompts: list[list[int]], n: int) -> int:
    """Key/value positions a step reads on average over the decode (all rows)."""
    return sum(len(p) + n // 2 for p in prompts)


def measure(name: str, model, tokenizer, args, device, bandwidth: float) -> dict:
    """One model's row of the table (see the module docstring)."""
    vocab = model.config.vocab_size
    suppress = list(range(len(tokenizer), vocab))
    random = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(3, len(tokenizer), (length,), generator=random).tolist()

    n = args.new_tokens
    single = prompt(args.prompt_tokens)
    ids = torch.tensor([single], device=device)
    row: dict = {"model": name}
    with torch.inference_mode():
        model(ids[:, :16])
        row["prefill tok/s"] = len(single) / min(
            timed(lambda: model(ids, logits_to_keep=1), device) for _ in range(2)
        )
    weight_bytes = (
        sum(weight_bytes_by_dtype(model).values()) - model.model.embed_tokens.weight.numel() * 2
    )
    low, high = args.prompt_tokens // 2, args.context - n
    spread = [low + (high - low) * i // 7 for i in range(8)]  # 8 prompts of 1k..4k tokens
    batches = {1: [single], 8: [prompt(length) for length in spread]}
    for compile in (False, True) if args.compile else (False,):
        engine = engine_for_model(model, tokenizer, compile, args.max_rows)
        if compile:
            row["warm-up s"] = engine.warm_up()
        compiled = compile and not engine.slot_model.compile_failed
        label = " compiled" if compiled else ""
        if compile and not compiled:
            row["warm-up s"] = "fell back"
        position_bytes = engine.slot_model.cache.position_bytes
        engine_decode(engine, batches[1], 8, suppress)  # first use (uncompiled: buffers)
        for batch, prompts in batches.items():
            rate = engine_decode(engine, prompts, n, suppress)
            step_bytes = weight_bytes + kv_positions(prompts, n) * position_bytes
            row[f"b{batch}{label} tok/s"] = rate
            row[f"b{batch}{label} % HBM"] = 100 * rate * step_bytes / (batch * bandwidth)
        engine.shutdown()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next engine's budget reads the free memory
    gen_ids = torch.tensor([single], device=device)
    with torch.inference_mode():

        def generate(new_tokens: int) -> None:
            model.generate(
                gen_ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                suppress_tokens=suppress,
                pad_token_id=0,
            )

        generate(2)
        # Decode only: the time of n + 1 tokens less the time of 1 (prefill and first).
        rate = n / (timed(lambda: generate(n + 1), device) - timed(lambda: generate(1), device))
        row["generate() b1 tok/s"] = rate
    if device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def goals(row: dict) -> list[tuple[str, float, float]]:
    """The fast path's goals for a row: (what, measured, needed)."""
    label = " compiled" if "b1 compiled tok/s" in row else ""
    b1 = row[f"b1{label} tok/s"]
    return [
        (f"b1{label} share of the HBM-bandwidth bound (%)", row[f"b1{label} % HBM"], 60.0),
        (f"b1{label} / generate() b1", b1 / row["generate() b1 tok/s"], 2.0),
        (f"b8{label} / b1{label}", row[f"b8{label} tok/s"] / b1, 5.0),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--models", default="7B,13B", help="comma-separated: 7B, 13B")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="batch-1 prompt")
    parser.add_argument("--context", type=int, default=4096, help="longest batch-8 prompt + new")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-rows", type=int, default=8, help="engine rows (warm-up buckets)")
    parser.add_argument("--vocab", type=int, default=125696)
    parser.add_argument("--no-4bit", dest="four_bit", action="store_false")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tiny:  # a quarter of the lengths: fewer key-length buckets to compile
        args.prompt_tokens, args.context, args.vocab = 512, 1024, 4096
    tokenizer = BaichuanTokenizer.from_pretrained(make_tiny_checkpoint(tempfile.mkdtemp()))
    bandwidth = copy_bandwidth(device)
    rows = []
    for name in args.models.split(","):
        shape = {**SHAPES[name], **TINY} if args.tiny else SHAPES[name]
        model = build(shape, args.vocab, args.context, torch.bfloat16, device)
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
        f"{bandwidth / 1e12:.2f} TB/s — prefill {args.prompt_tokens} tokens; decode "
        f"{args.new_tokens} tokens after a {args.prompt_tokens}-token prompt (b1) and "
        f"after 8 prompts of {args.prompt_tokens // 2}..{args.context - args.new_tokens} (b8)"
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
    print("% HBM: decode tok/s x (weights + keys/values read per step) / (batch x bandwidth)")
    for r in rows:
        if r["model"] != "7B bf16":
            continue
        for what, measured, needed in goals(r):
            verdict = (
                "n/a (no GPU)"
                if device.type != "cuda"
                else ("PASS" if measured >= needed else "FAIL")
            )
            print(f"goal, {r['model']}: {what} = {measured:.2f} (needs >= {needed}): {verdict}")


if __name__ == "__main__":
    main()
