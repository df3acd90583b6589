"""CPU decode rates of the native engine (issue N), per dtype, against its baselines.

The 7B-shaped random model (hidden 512, 4 layers, the real 125,696-piece vocabulary when
``../shared`` has it), a ~1k-token prompt, greedy, ``--new-tokens`` per stream:

- ``engine``: tok/s of ``ChatBaichuan2.stream`` at batch 1 (per token after the first
  chunk) and of 8 concurrent streams (short prompts, wall clock), fp32 and bf16, against
  transformers ``generate()`` of our ``BaichuanForCausalLM`` on the same weights (batch
  1 after the same prompt; 8 rows of one short prompt), and against llama.cpp when
  ``llama_cpp`` is importable (else reported as skipped);
- ``head``: the vocabulary projection alone (125,696 x hidden) for 1 and 8 rows in the
  candidate layouts and kernels, and the one ``cpu_layout`` chooses; the decoder linears
  alike;
- ``bandwidth``: this machine's read bandwidth (1 and 2 threads) and the batch-1 decode
  ceiling it sets per dtype (the bytes a token reads over that bandwidth);
- ``threads``: one step's decoder products run in the main thread, in another thread
  while the main thread keeps its idle OpenMP pool (what the engine's worker met before
  ``cpu_layout.free_openmp_threads``), and in another thread after it was freed
  (``--pools-kept`` adds the engine as it ran before that fix to the engine part).

llama.cpp runs the same weights (``llama_cpp_contender.py``: a GGUF file written from
the checkpoint) where ``llama_cpp`` and ``gguf`` are importable, else it is reported as
skipped; its next-token logits after the prompt are checked against ours first.

Engines and ``generate()`` are timed in interleaved rounds (best of ``--repeats``), so a
loaded machine slows them alike. bf16's top-1 agreement with fp32 is reported along
fp32's greedy path.

Every table starts with the machine and its 1-minute load average.

    python benchmarks/bench_cpu_decode.py [--part head|bandwidth|threads|engine|all]
        [--pools-kept]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_fast_path import generate_rate, long_prompt
from common import bench_checkpoint, concurrent_throughput, decode_arguments, timed_stream
from llama_cpp_contender import LlamaCppContender, logits_gap, no_llama_layout, write_gguf

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines.native import scheduler
from langchain_baichuan2.engines.native.cpu_layout import free_openmp_threads
from langchain_baichuan2.loading.checkpoint import read_config
from langchain_baichuan2.modeling import BaichuanForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHORT = [f"Stream {i}: " + "tell me about the sea " * (i + 2) for i in range(8)]


def machine() -> str:
    """The CPU, its threads and the 1-minute load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"


def best_ms(function: Callable[[], object], repeats: int = 20) -> float:
    """Fastest of ``repeats`` calls, in milliseconds (after two warm-up calls)."""
    function()
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


@torch.inference_mode()
def head_table(vocab: int, hidden: int) -> None:
    """Time the head product alone, per candidate, for 1 and 8 rows."""
    from langchain_baichuan2.engines.native.cpu_layout import HeadProjection  # not in old trees

    torch.manual_seed(0)
    weight = torch.nn.functional.normalize(torch.randn(vocab, hidden), dim=-1)
    transposed = weight.t().contiguous()
    half = weight.bfloat16()
    half_t = half.t().contiguous()

    def reduce_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :] * w.float()).sum(-1)

    reduction = torch.compile(reduce_rows, dynamic=False)
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32 x @ w.t() (linear, [out, in])": lambda x: torch.nn.functional.linear(x, weight),
        "fp32 x @ w_t ([in, out] copy)": lambda x: x @ transposed,
        "fp32 (w @ x.T).T ([out, in])": lambda x: (weight @ x.T).T.contiguous(),
        "fp32 compiled reduction": lambda x: reduction(x, weight),
        "bf16 linear (bf16 out)": lambda x: torch.nn.functional.linear(x.bfloat16(), half),
        "bf16 x @ w_t (bf16 out)": lambda x: x.bfloat16() @ half_t,
        "bf16 weights, compiled fp32 reduction": lambda x: reduction(x, half),
    }
    packs = {rows: torch.ops.mkl._mkl_reorder_linear_weight(weight, rows) for rows in (1, 8)}
    half_packs = {rows: torch.ops.mkldnn._reorder_linear_weight(half, rows) for rows in (1, 8)}
    candidates["fp32 MKL prepacked (per row count)"] = lambda x: torch.ops.mkl._mkl_linear(
        x, packs[x.shape[0]], weight, None, x.shape[0]
    )
    candidates["bf16 oneDNN prepacked (bf16 out)"] = lambda x: torch.ops.mkldnn._linear_pointwise(
        x.bfloat16(), half_packs[x.shape[0]], None, "none", [], ""
    )
    for name, dtype in DTYPES.items():
        model = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
        model.weight.data.copy_(weight)
        chosen = HeadProjection(model)
        candidates[f"{name} chosen ({chosen.kernel})"] = lambda x, h=chosen, d=dtype: h(x.to(d))
    print(f"head {vocab} x {hidden}; {machine()}")
    print(f"{'kernel':44s} {'1 row ms':>9s} {'8 rows ms':>10s}")
    one, eight = torch.randn(1, hidden), torch.randn(8, hidden)
    for name, function in candidates.items():
        try:
            times = [best_ms(lambda f=function, x=x: f(x)) for x in (one, eight)]
        except Exception as e:  # a compiler that cannot build the kernel here
            print(f"{name:44s} failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        print(f"{name:44s} {times[0]:9.2f} {times[1]:10.2f}")
    bound = weight.numel() * 4 / 23e9 * 1000
    print(f"(reading the fp32 head once at 23 GB/s takes {bound:.1f} ms; bf16 half that)")


def decoder_shapes(hidden: int, layers: int) -> tuple[list[tuple[int, int]], int]:
    """Every decoder linear's ``[out, in]`` of ``layers`` layers, and the MLP width.

    The width is ``bench_checkpoint``'s: 8/3 of ``hidden``, rounded down to 64.
    """
    inner = hidden * 8 // 3 // 64 * 64
    layer = [(3 * hidden, hidden), (hidden, hidden), (inner, hidden), (inner, hidden)]
    return (layer + [(hidden, inner)]) * layers, inner


@torch.inference_mode()
def linear_table(hidden: int, layers: int) -> None:
    """Time every decoder linear of ``layers`` layers (one step's products), per kernel."""
    shapes, inner = decoder_shapes(hidden, layers)
    torch.manual_seed(0)
    weights = [torch.randn(shape) / shape[1] ** 0.5 for shape in shapes]
    halves = [w.bfloat16() for w in weights]
    in_out = [w.t().contiguous().t() for w in weights]
    packs = {r: [torch.ops.mkl._mkl_reorder_linear_weight(w, r) for w in weights] for r in (1, 8)}
    half_packs = {
        r: [torch.ops.mkldnn._reorder_linear_weight(w, r) for w in halves] for r in (1, 8)
    }
    linear = torch.nn.functional.linear

    def each(function: Callable[[int, torch.Tensor], torch.Tensor]) -> Callable:
        return lambda x: [function(i, x[:, : w.shape[1]]) for i, w in enumerate(weights)]

    candidates = {
        "fp32 linear [out, in]": each(lambda i, x: linear(x, weights[i])),
        "fp32 linear [in, out] view": each(lambda i, x: linear(x, in_out[i])),
        "fp32 MKL prepacked": each(
            lambda i, x: torch.ops.mkl._mkl_linear(
                x, packs[x.shape[0]][i], weights[i], None, x.shape[0]
            )
        ),
        "bf16 linear": each(lambda i, x: linear(x, halves[i])),
        "bf16 oneDNN prepacked": each(
            lambda i, x: torch.ops.mkldnn._linear_pointwise(
                x, half_packs[x.shape[0]][i], None, "none", [], ""
            )
        ),
    }
    print(f"decoder linears, {layers} layers of hidden {hidden}; {machine()}")
    print(f"{'kernel':44s} {'1 row ms':>9s} {'8 rows ms':>10s}")
    for name, function in candidates.items():
        dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
        x1, x8 = (torch.randn(r, inner).to(dtype) for r in (1, 8))
        times = [best_ms(lambda f=function, x=x: f(x)) for x in (x1, x8)]
        print(f"{name:44s} {times[0]:9.2f} {times[1]:10.2f}")


def threads_table(hidden: int, layers: int) -> None:
    """One step's decoder products (1 row) by the thread that runs them, in ms."""
    shapes, inner = decoder_shapes(hidden, layers)
    torch.manual_seed(0)
    weights = [torch.randn(shape) for shape in shapes]
    inputs = {n: torch.randn(1, n) for n in (hidden, inner)}

    @torch.inference_mode()
    def products() -> None:
        for weight in weights:
            torch.nn.functional.linear(inputs[weight.shape[1]], weight)

    def in_a_thread() -> float:
        result = []
        thread = threading.Thread(target=lambda: result.append(best_ms(products)))
        thread.start()
        thread.join()
        return result[0]

    print(f"decoder products of one step ({layers} layers, 1 row) by thread; {machine()}")
    print(f"the main thread:                                  {best_ms(products):6.2f} ms")
    print(f"another thread, the main one holding its pool:    {in_a_thread():6.2f} ms")
    free_openmp_threads(torch.device("cpu"))
    print(f"another thread, the main one's pool freed:        {in_a_thread():6.2f} ms")


@torch.inference_mode()
def bandwidth_table(folder: Path, prompt_tokens: int) -> dict[str, float]:
    """This machine's read bandwidth, 1 and 2 threads, and the batch-1 decode ceilings.

    Bandwidth: the fastest of a plain sum and the head's matrix-vector kernels over the
    fp32 head (257 MB on the real vocabulary). Ceiling: that bandwidth over the bytes a
    step must read (every decoder linear and the head once, the keys/values of the
    prompt), per dtype. Returns the ceilings, ``{dtype: tok/s}``.
    """
    config = read_config(folder)
    vocab, hidden = config.vocab_size, config.hidden_size
    weight = torch.randn(vocab, hidden)
    transposed = weight.t().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    one = torch.randn(1, hidden)
    readers = {
        "sum": lambda: weight.sum(),
        "x @ w_t": lambda: one @ transposed,
        "oneDNN packed": lambda: torch.ops.mkldnn._linear_pointwise(
            one, packed, None, "none", [], ""
        ),
    }
    threads = torch.get_num_threads()
    rates = {}
    print(f"read bandwidth over {weight.numel() * 4 / 1e6:.0f} MB; {machine()}")
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        seconds = {name: best_ms(read) / 1000 for name, read in readers.items()}
        rates[count] = max(weight.numel() * 4 / t for t in seconds.values())
        shown = ", ".join(f"{name} {weight.numel() * 4e-9 / t:.1f}" for name, t in seconds.items())
        print(f"{count} thread(s): {shown} GB/s; load {os.getloadavg()[0]:.2f}")
    torch.set_num_threads(threads)
    inner, layers = config.intermediate_size, config.num_hidden_layers
    linears = layers * (4 * hidden * hidden + 3 * hidden * inner) + vocab * hidden
    ceilings = {}
    for name, dtype in DTYPES.items():
        size = dtype.itemsize
        step = size * (linears + layers * 2 * prompt_tokens * hidden)
        ceilings[name] = max(rates.values()) / step
        print(f"{name} batch 1: {step / 1e6:.0f} MB a token, ceiling {ceilings[name]:.1f} tok/s")
    return ceilings


def engine(folder: Path, dtype: str, args: argparse.Namespace) -> ChatBaichuan2:
    """The native engine on ``folder`` in ``dtype``, warmed up (its weights laid out)."""
    llm = ChatBaichuan2(
        model=str(folder),
        backend="native",
        temperature=0,
        max_tokens=args.new_tokens,
        model_kwargs={"min_new_tokens": args.new_tokens},  # random weights: fixed length
        prefix_cache_tokens=0,
        dtype="float32" if dtype == "fp32" else "bfloat16",
        compile=args.compile,
    )
    llm.invoke("warm up")
    concurrent_throughput(llm, SHORT)
    return llm


def engine_rounds(llm: ChatBaichuan2, prompt: str) -> Callable[[], tuple[float, float, str]]:
    """One measurement: batch-1 tok/s after ``prompt``, 8-stream tok/s, the greedy text."""

    def measure() -> tuple[float, float, str]:
        _, seconds, tokens, text = timed_stream(llm, prompt)
        return (tokens - 1) / seconds, concurrent_throughput(llm, SHORT)[0], text

    return measure


def pools_kept(
    measure: Callable[[], tuple[float, float, str]],
) -> Callable[[], tuple[float, float, str]]:
    """``measure`` as the engine ran before ``free_openmp_threads``.

    Nobody frees a pool, and this thread holds one, as it does after loading a model.
    """

    def kept() -> tuple[float, float, str]:
        free = scheduler.free_openmp_threads
        scheduler.free_openmp_threads = lambda device: None
        try:
            torch.ones(10_000_000).sum()  # a parallel region: this thread's pool starts
            return measure()
        finally:
            scheduler.free_openmp_threads = free

    return kept


def generate_rounds(
    folder: Path, dtype: str, ids: torch.Tensor, rows: torch.Tensor, args: argparse.Namespace
) -> Callable[[], tuple[float, float, str]]:
    """One measurement of transformers ``generate()``: batch 1 after the prompt, 8 rows."""
    model = BaichuanForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).eval()
    model.generation_config.eos_token_id = None
    penalty = model.generation_config.repetition_penalty
    n = args.new_tokens

    def measure() -> tuple[float, float, str]:
        b1 = generate_rate(model, ids, n, 1, penalty)
        return b1, 8 * generate_rate(model, rows, n, 1, penalty), ""

    return measure


@torch.inference_mode()
def greedy_agreement(folder: Path, ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """How often bf16's next token is fp32's, along fp32's greedy continuation of ``ids``.

    Both dtypes of ``BaichuanForCausalLM`` read the same sequence (the prompt and fp32's
    ``new_tokens`` greedy tokens); returns the share of its positions whose arg-max
    agree, and the first decoded step where they do not (``new_tokens`` if none).
    """
    full = BaichuanForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    half = BaichuanForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    full.generation_config.eos_token_id = None
    sequence = full.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    same = full(sequence).logits[0].argmax(-1) == half(sequence).logits[0].argmax(-1)
    decoded = same[ids.shape[1] - 1 : -1]
    first = int((~decoded).nonzero()[0, 0]) if not bool(decoded.all()) else new_tokens
    return float(same.float().mean()), first


def llama_cpp_rounds(
    folder: Path, dtype: str, ids: torch.Tensor, rows: list[list[int]], args: argparse.Namespace
) -> Callable[[], tuple[float, float, str]]:
    """One measurement of llama.cpp on ``folder``'s weights in ``dtype``: b1, 8 streams."""
    path = write_gguf(folder, dtype, Path(tempfile.mkdtemp()) / f"model-{dtype}.gguf")
    prompt = ids[0].tolist()
    context = max(len(prompt) + args.new_tokens, sum(map(len, rows)) + 8 * args.new_tokens)
    contender = LlamaCppContender(path, (context // 64 + 2) * 64, torch.get_num_threads())
    if dtype == "fp32":
        gap, same = logits_gap(folder, contender, prompt)
        print(
            f"llama.cpp fp32 next-token logits after the prompt: max |diff| {gap:.2e}, "
            f"same arg-max: {same}"
        )

    def measure() -> tuple[float, float, str]:
        b1, tokens = contender.batch1(prompt, args.new_tokens)
        return b1, contender.streams(rows, args.new_tokens), str(tokens)

    return measure


def llama_cpp_skipped(folder: Path) -> str | None:
    """Why llama.cpp cannot run here (None when it can)."""
    missing = [name for name in ("llama_cpp", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        return f"llama.cpp: skipped ({' and '.join(missing)} not importable here)"
    problem = no_llama_layout(folder)
    return None if problem is None else f"llama.cpp: skipped ({problem})"


def engine_contenders(
    folder: Path, args: argparse.Namespace
) -> tuple[dict[str, Callable[[], tuple[float, float, str]]], torch.Tensor]:
    """Every engine and ``generate()`` to time, by name; the prompt's ids."""
    contenders = {}
    ids = torch.empty(0)
    for dtype in args.dtypes.split(","):
        llm = engine(folder, dtype, args)
        prompt = long_prompt(llm, args.prompt_tokens)
        tokenizer = llm.loaded_model().tokenizer
        ids = torch.tensor([tokenizer.encode(prompt)])
        rows = torch.tensor([tokenizer.encode(SHORT[3])] * 8)
        contenders[f"ours {dtype}"] = engine_rounds(llm, prompt)
        if args.pools_kept:
            contenders[f"ours {dtype}, pools kept"] = pools_kept(engine_rounds(llm, prompt))
        if not args.no_generate:
            contenders[f"generate() {dtype}"] = generate_rounds(folder, dtype, ids, rows, args)
        if llama_cpp_skipped(folder) is None:
            short = [tokenizer.encode(text) for text in SHORT]
            contenders[f"llama.cpp {dtype}"] = llama_cpp_rounds(folder, dtype, ids, short, args)
    return contenders, ids


def main() -> None:
    parser = decode_arguments(argparse.ArgumentParser())
    parser.add_argument(
        "--part", choices=["head", "bandwidth", "threads", "engine", "all"], default="all"
    )
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="engine: compiled step")
    parser.add_argument("--freezing", action="store_true", help="inductor freezing on")
    parser.add_argument("--no-generate", action="store_true", help="skip generate()")
    parser.add_argument(
        "--pools-kept", action="store_true", help="also ours with callers' OpenMP pools kept"
    )
    parser.add_argument("--texts", type=Path, help="write each dtype's greedy text here (json)")
    args = parser.parse_args()
    if args.freezing:  # weights as constants: inductor prepacks them for oneDNN/MKL
        torch._inductor.config.freezing = True
    folder = bench_checkpoint(args, "cpu-decode")
    if args.part in ("head", "all"):
        head_table(read_config(folder).vocab_size, args.hidden)
        linear_table(args.hidden, args.layers)
    if args.part in ("bandwidth", "all"):
        bandwidth_table(folder, args.prompt_tokens)
    if args.part in ("threads", "all"):
        threads_table(args.hidden, args.layers)
    if args.part in ("head", "bandwidth", "threads"):
        return
    print(
        f"engine, hidden {args.hidden}, layers {args.layers}, compile {args.compile}, "
        f"freezing {args.freezing}; prompt {args.prompt_tokens}, {args.new_tokens} new tokens; "
        f"best of {args.repeats} interleaved rounds"
    )
    contenders, ids = engine_contenders(folder, args)
    best: dict[str, tuple[float, float]] = {}
    texts: dict[str, str] = {}
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, measure in contenders.items():
            b1, b8, texts[name] = measure()
            old = best.get(name, (0.0, 0.0))
            best[name] = (max(old[0], b1), max(old[1], b8))
    now = os.getloadavg()[0]
    print(f"{'':22s} {'b1 tok/s':>9s} {'8 streams':>10s}  (load {load:.2f} to {now:.2f})")
    for name, (b1, b8) in best.items():
        print(f"{name:22s} {b1:9.2f} {b8:10.2f}")
    if "ours fp32" in texts and "ours bf16" in texts:
        print(f"bf16 greedy text equals fp32's: {texts['ours fp32'] == texts['ours bf16']}")
        share, first = greedy_agreement(folder, ids, args.new_tokens)
        print(
            f"bf16 top-1 agreement with fp32: {share:.3f} of {ids.shape[1] + args.new_tokens}"
            f" positions; first differing decoded step: {first}"
        )
    if args.texts:
        args.texts.write_text(json.dumps(texts))
    print(llama_cpp_skipped(folder) or "llama.cpp: llama-cpp-python on the same weights (GGUF)")
    print(machine())


if __name__ == "__main__":
    main()
