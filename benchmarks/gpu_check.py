"""GPU check: random 7B- and 13B-shaped Baichuan2 on CUDA in bf16, through our engine.

No download: the models are built on the device with random weights and the real
vocabulary (125,696 ids); the tokenizer is the real one when ``../shared`` has it, else
the tiny trained one grown to the model's vocabulary with unused pieces, so every id
the model picks decodes and no id is suppressed (rows take the default sampling path).
The head's eos rows are zero, so greedy decoding never ends a row early.

Prints one table, a row per model:

- prefill tok/s: a ``max_tokens=1`` request through the engine, prompt tokens over
  the time to its first token (best of 3 fresh prompts, so no prefix is reused);
- decode tok/s of the engine at batch 1 (after a 2k-token prompt) and batch 8 (8
  prompts of 1k..4k tokens, started together), eager and compiled (``torch.compile``,
  CUDA graphs); each with its share of the bandwidth bound: tok/s x the bytes a step
  needs (the weights but the embedding, plus every row's keys/values at its actual
  length) / (batch x the measured copy bandwidth);
- the warm-up's seconds and what it gave: ``compiled (N graphs)``, or ``eager (...)``
  when compiling failed, a bucket ran uncompiled, a warning was logged or the warm-up
  ran past its timeout;
- plain ``generate()`` at batch 1 (the baseline), 4-bit (bitsandbytes NF4, eager);
- peak GiB the engine needed: the peak allocated (``torch.cuda.max_memory_allocated``
  over the engine's life; peak RSS on a CPU) less its key/value buffers, plus the
  keys/values its largest batch reserved (prompt + max_tokens per row); and the budget
  the buffers were given, apart.

Then the goals for 7B bf16 (compiled when it compiled), each PASS or FAIL: batch 1
and batch 8 at >= 60% of the bound, batch 1 >= 2x ``generate()``.

    python benchmarks/gpu_check.py                  # on a CUDA machine (< 8 min on an H100)
    python benchmarks/gpu_check.py --models 7B --no-4bit   # the goals only, sooner
    python benchmarks/gpu_check.py --tiny --device cpu --no-compile   # smoke test, ~1 min

On a CPU, ``--tiny`` without ``--no-compile`` compiles every step shape for real (about
a minute each); the tests simulate the compiler instead (``test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextvars
import datetime
import gc
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch
from common import REAL_TOKENIZER, real_config
from transformers import GenerationConfig

from langchain_baichuan2.engines.base import SamplingParams
from langchain_baichuan2.engines.native import NativeEngine
from langchain_baichuan2.loading import LoadedModel, weight_bytes_by_dtype
from langchain_baichuan2.modeling import BaichuanForCausalLM, BaichuanTokenizer
from langchain_baichuan2.testing import make_tiny_checkpoint

TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
GIB = 2**30


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
    """Bytes/s moved by a copy on the device (read + write counted); 512 MiB on a GPU."""
    x = torch.empty(1 << (29 if device.type == "cuda" else 24), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = min(timed(lambda: y.copy_(x), device) for _ in range(5))
    return 2 * x.numel() / seconds


def covering_tokenizer(vocab: int) -> BaichuanTokenizer:
    """A tokenizer with a piece for every id below ``vocab`` (see the module docstring)."""
    real = REAL_TOKENIZER if vocab == 125696 and REAL_TOKENIZER.is_file() else None
    folder = make_tiny_checkpoint(
        tempfile.mkdtemp(prefix="gpu-check-"),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
        tokenizer_model=real,
        vocab_size=vocab,
    )
    return BaichuanTokenizer.from_pretrained(folder)


def build(
    name: str, shape: dict, vocab: int, context: int, device: torch.device
) -> BaichuanForCausalLM:
    """A random bf16 model of ``name``'s shape (``shape`` overrides), built on ``device``."""
    config = real_config(name, vocab_size=vocab, model_max_length=context, **shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy first: 13B would need 52 GiB
    try:
        with torch.device(device):
            model = BaichuanForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        model.normalize_head()
        model.lm_head.weight[config.eos_token_id] = 0  # logit 0: never the greedy pick
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


class Warnings(logging.Handler):
    """Collects the package's warnings and errors while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Warnings:
        logging.getLogger("langchain_baichuan2").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("langchain_baichuan2").removeHandler(self)


def compiled_graphs(engine: NativeEngine) -> int:
    """Step graphs the engine has compiled: step classes, or shapes in older engines."""
    slot_model = engine.slot_model
    for name in ("compiled_classes", "_compiled_shapes"):
        if hasattr(slot_model, name):
            return len(getattr(slot_model, name))
    return 0


def compile_status(engine: NativeEngine, warnings: list[str]) -> str:
    """``compiled (N graphs)`` only when compiling worked everywhere; else ``eager`` and why.

    Any warning or error the package logged while warming up and measuring (a failed
    compile, a bucket out of memory, a failed warm-up) makes it ``eager (...)``.
    """
    slot_model = engine.slot_model
    if not slot_model.compile:
        return "eager (not compiled: quantized weights)"
    graphs = compiled_graphs(engine)
    failed = slot_model.compile_failed or slot_model.lora_compile_failed
    eager_buckets = sorted(getattr(slot_model, "eager_buckets", ()))
    if failed or not graphs or warnings or eager_buckets:
        reason = warnings[-1] if warnings else f"{graphs} graphs, eager buckets {eager_buckets}"
        return f"eager (compile failed: {reason[:120]})"
    return f"compiled ({graphs} graphs)"


def stream_all(
    engine: NativeEngine, prompts: list[list[int]], params: SamplingParams
) -> list[list[float]]:
    """Stream every prompt from its own thread, started together; each token's arrival."""
    arrivals: list[list[float]] = [[] for _ in prompts]

    def consume(i: int) -> None:
        for chunk in engine.stream(prompts[i], params):
            arrivals[i] += [time.perf_counter()] * len(chunk.token_ids)

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
    return arrivals


def decode_rate(engine: NativeEngine, prompts: list[list[int]], n: int) -> float:
    """Decode tok/s of the prompts streamed together (greedy, ``n`` tokens each).

    Every token after each stream's first, over the time from the last first token to
    the last token: the prefills do not count (the rows start in one step).
    """
    arrivals = stream_all(engine, prompts, SamplingParams(max_new_tokens=n))
    if any(len(times) != n for times in arrivals):
        raise RuntimeError(f"a stream ended early: {[len(times) for times in arrivals]} tokens")
    start = max(times[0] for times in arrivals)
    end = max(times[-1] for times in arrivals)
    return len(prompts) * (n - 1) / (end - start)


def engine_prefill(engine: NativeEngine, prompts: list[list[int]]) -> float:
    """Prefill tok/s: prompt tokens over the time to first token, best over ``prompts``."""
    best = float("inf")
    for prompt in prompts:
        start = time.perf_counter()
        first = None
        for chunk in engine.stream(prompt, SamplingParams(max_new_tokens=1)):
            if chunk.token_ids and first is None:
                first = time.perf_counter() - start
        best = min(best, first if first is not None else float("inf"))
    return len(prompts[0]) / best


def peak_allocated(device: torch.device) -> int:
    """Peak bytes allocated since the last reset (peak RSS of the process on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next engine's budget reads the free memory
        torch.cuda.reset_peak_memory_stats(device)


def engine_needed(engine: NativeEngine, device: torch.device, reserved_positions: int) -> float:
    """GiB the engine needed (see the module docstring): peak less unused key/value buffers."""
    cache = engine.slot_model.cache
    storages = [t.untyped_storage() for t in (*cache.keys, *cache.values)]  # views' whole
    buffers = sum({s.data_ptr(): s.nbytes() for s in storages}.values())
    return (peak_allocated(device) - buffers + reserved_positions * cache.position_bytes) / GIB


def measure_engine(
    row: dict, mode: str, engine: NativeEngine, batches: dict, args, bandwidth: float, weights: int
) -> None:
    """Decode at every batch size; fill ``row``'s ``b{batch} {mode}`` columns."""
    n = args.new_tokens
    position_bytes = engine.slot_model.cache.position_bytes
    for batch, prompts in batches.items():
        # First use of this batch's buckets untimed (a GPU records their CUDA graphs).
        decode_rate(engine, prompts, 4)
        rate = decode_rate(engine, prompts, n)
        # Mean keys/values a step reads: each row's prompt plus half the new tokens.
        positions = sum(len(p) + n // 2 for p in prompts)
        step_bytes = weights + positions * position_bytes
        row[f"b{batch} {mode} tok/s"] = rate
        row[f"b{batch} {mode} % bound"] = 100 * rate * step_bytes / (batch * bandwidth)


def measure(
    name: str, model, tokenizer, args, device, bandwidth: float, compile: bool = True
) -> dict:
    """One model's row of the table (see the module docstring); eager only if not ``compile``."""
    random = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(3, len(tokenizer), (length,), generator=random).tolist()

    n = args.new_tokens
    embedding = model.model.embed_tokens.weight
    weights = sum(weight_bytes_by_dtype(model).values()) - embedding.numel() * embedding.itemsize
    low, high = args.prompt_tokens // 2, args.context - n
    spread = [low + (high - low) * i // 7 for i in range(8)]  # 8 prompts of 1k..4k tokens
    batches = {1: [prompt(args.prompt_tokens)], 8: [prompt(length) for length in spread]}
    reserved = sum(len(p) + n for p in batches[8])
    row: dict = {"model": name}
    for compiled in (False, True) if compile and args.compile else (False,):
        reset_peak(device)
        generation = GenerationConfig(eos_token_id=2, pad_token_id=0)
        loaded = LoadedModel(model, tokenizer, generation, path=None)  # type: ignore[arg-type]
        engine = NativeEngine(loaded, compile=compiled, max_rows=args.max_rows)
        mode = "compiled" if compiled else "eager"
        try:
            with Warnings() as warnings:
                try:
                    seconds = engine.warm_up(args.warmup_timeout)
                    if compiled:  # eager, it only sizes the buffers
                        row["warm-up s"] = seconds
                except TimeoutError:
                    row["compile status"] = f"eager (warm-up not done in {args.warmup_timeout} s)"
                    row["stopped"] = True  # it cannot be cancelled: measure nothing more
                    return row
                if not compiled:
                    engine_prefill(engine, [prompt(16)])  # first use
                    row["prefill tok/s"] = engine_prefill(
                        engine, [prompt(args.prompt_tokens) for _ in range(3)]
                    )
                graphs = compiled_graphs(engine)
                measure_engine(row, mode, engine, batches, args, bandwidth, weights)
                if compiled:
                    status = compile_status(engine, warnings.messages)
                    grew = compiled_graphs(engine) - graphs
                    row["compile status"] = status + (f", {grew} more during the run" * bool(grew))
            row[f"{mode} peak GiB"] = engine_needed(engine, device, reserved)
            row["KV budget GiB"] = engine.kv_cache_bytes / GIB
        finally:
            engine.shutdown()
            del engine, loaded
            if compiled and not row.get("stopped"):
                torch._dynamo.reset()  # drop the compiled graphs: they hold the old buffers
    reset_peak(device)
    ids = torch.tensor(batches[1], device=device)
    with torch.inference_mode():

        def generate(new_tokens: int) -> None:
            model.generate(
                ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

        generate(2)
        # Decode only: the time of n + 1 tokens less the time of 1 (prefill and first).
        rate = n / (timed(lambda: generate(n + 1), device) - timed(lambda: generate(1), device))
        row["generate() b1 tok/s"] = rate
    return row


def goals(row: dict) -> list[tuple[str, float, float]]:
    """The fast path's goals for a row: (what, measured, needed)."""
    compiled = row.get("compile status", "").startswith("compiled")
    mode = "compiled" if compiled else "eager"
    return [
        (f"b1 {mode} share of the bandwidth bound (%)", row[f"b1 {mode} % bound"], 60.0),
        (f"b8 {mode} share of the bandwidth bound (%)", row[f"b8 {mode} % bound"], 60.0),
        (f"b1 {mode} / generate() b1", row[f"b1 {mode} tok/s"] / row["generate() b1 tok/s"], 2.0),
    ]


def print_table(rows: list[dict], args, bandwidth: float, device: torch.device) -> None:
    """The table, then the goals of 7B bf16."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"GPU check — {gpu} — {datetime.date.today()} — copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s — prefill {args.prompt_tokens} tokens; decode "
        f"{args.new_tokens} tokens after a {args.prompt_tokens}-token prompt (b1) and "
        f"after 8 prompts of {args.prompt_tokens // 2}..{args.context - args.new_tokens} (b8)"
    )
    columns = list(dict.fromkeys(k for r in rows for k in r if k not in ("model", "stopped")))
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for r in rows:
        cells = [r.get(c, "") for c in columns]
        print(
            f"| {r['model']} | "
            + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells)
            + " |"
        )
    print(
        "% bound: decode tok/s x (weights + every row's keys/values at its length) / "
        "(batch x copy bandwidth); peak GiB: what the engine needed (peak allocated less "
        "its key/value buffers, plus what its largest batch reserved)"
    )
    for r in rows:
        if r["model"] != "7B bf16" or "generate() b1 tok/s" not in r:
            continue
        for what, measured, needed in goals(r):
            verdict = "PASS" if measured >= needed else "FAIL"
            verdict = verdict if device.type == "cuda" else "n/a (no GPU)"
            print(f"goal, {r['model']}: {what} = {measured:.2f} (needs >= {needed}): {verdict}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the check, print its table; return the table's rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--models", default="7B,13B", help="comma-separated: 7B, 13B")
    parser.add_argument("--prompt-tokens", type=int, help="batch-1 prompt (2048; tiny 512)")
    parser.add_argument("--context", type=int, help="longest b8 prompt + new (4096; tiny 1024)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-rows", type=int, default=8, help="engine rows (warm-up buckets)")
    parser.add_argument("--vocab", type=int, help="vocabulary (125696; tiny 4096)")
    parser.add_argument("--warmup-timeout", type=float, default=150.0, help="seconds per model")
    parser.add_argument("--no-4bit", dest="four_bit", action="store_false")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    tiny = args.tiny  # a quarter of the lengths: fewer key-length buckets to compile
    args.prompt_tokens = args.prompt_tokens or (512 if tiny else 2048)
    args.context = args.context or (1024 if tiny else 4096)
    args.vocab = args.vocab or (4096 if tiny else 125696)
    device = torch.device(args.device)
    tokenizer = covering_tokenizer(args.vocab)
    bandwidth = copy_bandwidth(device)
    rows: list[dict] = []
    started = time.perf_counter()
    # The 4-bit 7B last (the least asked for): it is built again and quantized.
    runs = [(name, False) for name in args.models.split(",")]
    runs += [("7B", True)] if args.four_bit and "7B" in args.models.split(",") else []
    for name, four_bit in runs:
        model = build(name, TINY if tiny else {}, args.vocab, args.context, device)
        if four_bit:
            quantize_4bit(model)  # bitsandbytes layers run eager
        label = f"{name} {'nf4' if four_bit else 'bf16'}"
        rows.append(measure(label, model, tokenizer, args, device, bandwidth, not four_bit))
        done = f"{label} done at {time.perf_counter() - started:.0f} s"
        print(f"{done}: {rows[-1]}", file=sys.stderr)  # kept if a later model fails
        del model
        reset_peak(device)
        if rows[-1].get("stopped"):
            break
    print_table(rows, args, bandwidth, device)
    return rows


if __name__ == "__main__":
    if main()[-1].get("stopped"):
        sys.stdout.flush()
        os._exit(1)  # a warm-up still runs on the engine's thread: do not wait for it
