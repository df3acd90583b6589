"""Embedding throughput: length-sorted batches vs the same batch size unsorted vs one by one.

Builds a random Baichuan2 checkpoint big enough to measure (default width 256, 4 layers),
a corpus of mixed-length texts (default 2,000 texts of 5-500 tokens, Chinese and
English words), and times three ways of embedding it with ``Baichuan2Embeddings``:

- sorted: ``embed_documents`` (texts sorted by token count, then cut into batches);
- unsorted: the same tokenization and batch size, batches taken in input order;
- one by one: ``embed_documents([text])`` per text, on a random subset of the corpus
  (``--single-texts``; texts/s is a rate, and the subset has the same length mix).

Peak memory is the largest growth of the resident set size during a run, sampled
every 5 ms. Targets on CPU: sorted >= 1.5x unsorted and >= 4x one by one. The second
holds where per-forward overhead dominates (narrow models, short texts, GPUs); a CPU
running a wide model on long texts is bound by matmuls either way, so batching gains
little there (``--threads 1`` gives steadier numbers on a shared machine).

python benchmarks/bench_embeddings.py
python benchmarks/bench_embeddings.py --texts 500 --hidden-size 128 --layers 2
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from langchain_baichuan2.embeddings import Baichuan2Embeddings
from langchain_baichuan2.testing import make_tiny_checkpoint

WORDS = (
    "the model reads every document and answers questions about retrieval embeddings "
    "vectors search index language 温故而知新 可以为师 长城 熊猫 春节 茶 数据 模型 检索 向量"
).split()


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0
    line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def measure(run: Callable[[], object]) -> tuple[float, int]:
    """Seconds taken by ``run`` and its peak RSS growth in bytes, sampled every 5 ms."""
    base = peak = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, max(peak, rss_bytes()) - base


def make_corpus(
    emb: Baichuan2Embeddings, count: int, low: int, high: int, rng: random.Random
) -> list[str]:
    """``count`` texts whose token counts spread roughly uniformly over [low, high]."""
    tokenizer = emb.loaded_model().tokenizer
    sample = " ".join(rng.choices(WORDS, k=300))
    per_word = len(tokenizer.encode(sample, add_special_tokens=False)) / 300
    return [
        " ".join(rng.choices(WORDS, k=max(1, round(rng.randint(low, high) / per_word))))
        for _ in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--min-tokens", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=500)
    parser.add_argument("--single-texts", type=int, default=200, help="subset for one by one")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--variant", choices=["7b", "13b"], default="7b")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = make_tiny_checkpoint(
        tempfile.mkdtemp(prefix="bench-emb-"),
        args.variant,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate_size,
    )
    emb = Baichuan2Embeddings(model=str(folder), batch_size=args.batch_size, show_progress=False)
    loaded = emb.loaded_model()
    rng = random.Random(args.seed)
    texts = make_corpus(emb, args.texts, args.min_tokens, args.max_tokens, rng)
    singles = rng.sample(texts, min(args.single_texts, len(texts)))
    lengths = [len(ids) for ids in emb._tokenize(loaded, texts)]
    emb.embed_documents(texts[: args.batch_size])  # warm up kernels and allocator

    def unsorted() -> None:
        ids = emb._tokenize(loaded, texts)
        for start in range(0, len(ids), args.batch_size):
            emb._embed_batch(loaded, ids[start : start + args.batch_size])

    def one_by_one() -> None:
        for text in singles:
            emb.embed_documents([text])

    runs = {
        "sorted batches": (len(texts), measure(lambda: emb.embed_documents(texts))),
        "unsorted batches": (len(texts), measure(unsorted)),
        "one by one": (len(singles), measure(one_by_one)),
    }

    print(
        f"model: {args.variant} width {args.hidden_size}, {args.layers} layers, "
        f"{sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M params, "
        f"{torch.get_num_threads()} torch threads, batch size {args.batch_size}"
    )
    print(
        f"corpus: {len(texts)} texts, {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f})"
    )
    print(f"{'mode':<18}{'texts':>7}{'seconds':>10}{'texts/s':>10}{'peak RSS MiB':>14}")
    rates = {}
    for name, (count, (seconds, peak)) in runs.items():
        rates[name] = count / seconds
        print(f"{name:<18}{count:>7}{seconds:>10.2f}{rates[name]:>10.1f}{peak / 2**20:>14.1f}")
    print(
        f"sorted / unsorted: {rates['sorted batches'] / rates['unsorted batches']:.2f}x "
        "(target >= 1.5x)"
    )
    print(
        f"sorted / one by one: {rates['sorted batches'] / rates['one by one']:.2f}x (target >= 4x)"
    )


if __name__ == "__main__":
    main()
