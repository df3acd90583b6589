"""The native engine's fast path against its baselines, in one run on the same weights.

Decode goes through ``ChatBaichuan2.stream`` (per-token rate after the first chunk, so
prefill is excluded), greedy, a ~1k-token prompt, random fp32 weights of
``--hidden`` x ``--layers`` with the real 125,696-piece vocabulary when ``../shared``
has it:

- 7B shape (RoPE), batch 1 vs transformers' ``LlamaForCausalLM.generate()`` holding the
  same weights (target >= 1.5x);
- 13B shape (ALiBi), batch 1 vs the official Baichuan2-13B modeling code on the same
  weights (target >= 2x). Pass ``--official-code DIR``, a folder with the official
  ``modeling_baichuan.py``, ``configuration_baichuan.py`` and ``generation_utils.py``
  (from a Baichuan2-13B download); it runs only in this benchmark, as a greedy loop
  over its own forward and KV cache, which is what its ``generate()`` runs. Without the
  folder, the official number recorded below (measured on this kind of machine) is
  printed instead, labelled as such;
- 8 concurrent streams vs the engine before the fast path (target >= 1.3x): pass
  ``--baseline-ref REF``, a git ref of this repository; this script then runs its
  engine part once more against that ref's package from a temporary worktree;
- with ``--compile``, the compiled decode step too, and its compile time (first call).

    python benchmarks/bench_fast_path.py --baseline-ref 4a77506 --official-code DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_model import as_llama
from common import bench_checkpoint, concurrent_throughput, decode_arguments, timed_stream
from transformers import TextStreamer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.modeling import BaichuanForCausalLM

# The official 13B code on the 13B-shaped model (hidden 512 x 4 layers, vocab 125,696,
# fp32, ~1k prompt), measured on a 2-core x86 CPU like this one (issue 14).
RECORDED_OFFICIAL_13B = 16.2


def long_prompt(llm: ChatBaichuan2, tokens: int) -> str:
    """A prompt of about ``tokens`` tokens."""
    words = "tell me about the sea and the mountains of the north "
    per_copy = len(llm.loaded_model().tokenizer.encode(words))
    return words * (tokens // per_copy + 1)


def engine_rates(folder: Path, args: argparse.Namespace, **settings: object) -> dict:
    """Batch-1 decode tok/s after a long prompt and 8-stream tok/s through the engine."""
    llm = ChatBaichuan2(
        model=str(folder),
        backend="native",
        temperature=0,
        max_tokens=args.new_tokens,
        model_kwargs={"min_new_tokens": args.new_tokens},  # random weights: fixed length
        prefix_cache_tokens=0,
        dtype="float32",
        **settings,
    )
    started = time.perf_counter()
    llm.invoke("warm up")
    first_call = time.perf_counter() - started
    prompt = long_prompt(llm, args.prompt_tokens)
    runs = [timed_stream(llm, prompt) for _ in range(args.repeats)]
    short = [f"Stream {i}: " + "tell me about the sea " * (i + 2) for i in range(8)]
    concurrent_throughput(llm, short)  # warm-up (and, compiled, the batch-8 graph)
    eight = max(concurrent_throughput(llm, short)[0] for _ in range(args.repeats))
    slot_model = getattr(llm.engine(), "slot_model", None)  # absent before the fast path
    return {
        "decode": max((r[2] - 1) / r[1] for r in runs),
        "eight": eight,
        "first_call_s": first_call,
        "compile_s": slot_model.compile_seconds if slot_model is not None else 0.0,
        "text": runs[0][3],
    }


class _TokenTimes(TextStreamer):
    """Records when each generated token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate_rate(
    model: Any, ids: torch.Tensor, new_tokens: int, repeats: int, penalty: float
) -> float:
    """Best per-token decode rate of ``model.generate()`` (greedy), prefill excluded."""
    rates = []
    for _ in range(repeats):
        times = _TokenTimes()
        model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            repetition_penalty=penalty,
            streamer=times,
        )
        rates.append((len(times.times) - 2) / (times.times[-1] - times.times[1]))
    return max(rates)


@torch.inference_mode()
def official_rate(
    code: Path, folder: Path, ids: torch.Tensor, new_tokens: int, repeats: int, penalty: float
) -> float:
    """Decode rate of the official code, run as its ``generate()`` runs it (greedy).

    Its class predates transformers 5's ``generate()``, so the loop is written out: its
    forward with its own tuple KV cache, plus the logits processors ``generate()``
    applies for these settings (repetition penalty, min_new_tokens).
    """
    sys.path.insert(0, str(code.parent))
    modeling = importlib.import_module(f"{code.name}.modeling_baichuan")
    config_module = importlib.import_module(f"{code.name}.configuration_baichuan")
    config = config_module.BaichuanConfig(**json.loads((folder / "config.json").read_text()))
    model = modeling.BaichuanForCausalLM(config).eval()
    ours = BaichuanForCausalLM.from_pretrained(folder, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [m for m in missing if "future_mask" not in m], missing
    del ours
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(penalty),
            MinNewTokensLengthLogitsProcessor(ids.shape[1], new_tokens, [2]),
        ]
    )
    rates = []
    for _ in range(repeats):
        sequence = ids
        out = model(input_ids=ids, use_cache=True)
        start = time.perf_counter()
        for step in range(new_tokens):
            scores = processors(sequence, out.logits[:, -1].float())
            token = scores.argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=-1)
            if step == 0:
                start = time.perf_counter()  # from the first token on, as for the engine
            if step < new_tokens - 1:
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        rates.append((new_tokens - 1) / (time.perf_counter() - start))
    return max(rates)


def baseline_engine(ref: str, folder: Path, args: argparse.Namespace) -> dict:
    """Run this script's engine part against the package as it was at ``ref``."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as worktree:
        subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "--detach", worktree, ref],
            check=True,
            capture_output=True,
        )
        try:
            command = [sys.executable, __file__, "--engine-only", str(folder), *sys.argv[1:]]
            result = subprocess.run(
                command,
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": worktree},
            )
        finally:
            subprocess.run(
                ["git", "-C", str(root), "worktree", "remove", "--force", worktree], check=True
            )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = decode_arguments(argparse.ArgumentParser())
    parser.add_argument("--compile", action="store_true", help="also measure compiled")
    parser.add_argument("--baseline-ref", help="git ref of the engine to compare with")
    parser.add_argument("--official-code", type=Path, help="folder of the official 13B code")
    parser.add_argument("--engine-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine_only:
        import langchain_baichuan2

        rates = engine_rates(args.engine_only, args)
        rates["package"] = langchain_baichuan2.__file__
        print(json.dumps(rates))
        return

    seven = bench_checkpoint(args, "fast-7b")
    thirteen = bench_checkpoint(args, "fast-13b", variant="13b")
    rows = {
        "7b fast path": engine_rates(seven, args, compile=False),
        "13b fast path": engine_rates(thirteen, args, compile=False),
    }
    if args.compile:
        rows["7b compiled"] = engine_rates(seven, args, compile=True)
        rows["13b compiled"] = engine_rates(thirteen, args, compile=True)
    if args.baseline_ref:
        rows[f"7b engine at {args.baseline_ref}"] = baseline_engine(args.baseline_ref, seven, args)

    probe = ChatBaichuan2(model=str(seven), dtype="float32")
    tokenizer = probe.loaded_model().tokenizer
    ids = torch.tensor([tokenizer.encode(long_prompt(probe, args.prompt_tokens))])
    ours = BaichuanForCausalLM.from_pretrained(seven, dtype=torch.float32)
    ours.generation_config.eos_token_id = None
    # Every baseline applies the checkpoint's repetition penalty, as the engine does.
    penalty = probe.loaded_model().generation_config.repetition_penalty
    timing = (args.new_tokens, args.repeats, penalty)
    baselines = {
        "7b: Llama generate()": generate_rate(as_llama(ours), ids, *timing),
        "7b: our model's generate()": generate_rate(ours, ids, *timing),
    }
    if args.official_code:
        baselines["13b: official code"] = official_rate(args.official_code, thirteen, ids, *timing)
    else:
        baselines["13b: official code (recorded, not measured)"] = RECORDED_OFFICIAL_13B

    device = "GPU" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"hidden {args.hidden}, layers {args.layers}, vocab {len(tokenizer)}, fp32, {device}; "
        f"prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, greedy, "
        f"repetition_penalty {penalty}"
    )
    header = f"{'engine':28s} {'b1 decode tok/s':>16s} {'8 streams tok/s':>16s}"
    print(f"{header} {'first call s':>13s} {'compiling s':>12s}")
    for name, r in rows.items():
        print(
            f"{name:28s} {r['decode']:16.2f} {r['eight']:16.2f} {r['first_call_s']:13.2f} "
            f"{r.get('compile_s', 0.0):12.2f}"
        )
    for name, rate in baselines.items():
        print(f"{name:45s} {rate:8.2f} tok/s")
    llama = baselines["7b: Llama generate()"]
    official = next(v for k, v in baselines.items() if k.startswith("13b"))
    for suffix in ("fast path", "compiled"):
        if f"7b {suffix}" in rows:
            print(
                f"{suffix}: 7b b1 / Llama generate() "
                f"{rows[f'7b {suffix}']['decode'] / llama:.2f}x (target >= 1.5x); 13b b1 / "
                f"official {rows[f'13b {suffix}']['decode'] / official:.2f}x (target >= 2x)"
            )
    if args.baseline_ref:
        before = rows[f"7b engine at {args.baseline_ref}"]
        now = rows["7b fast path"]
        print(
            f"fast path / engine at {args.baseline_ref}: "
            f"b1 {now['decode'] / before['decode']:.2f}x, "
            f"8 streams {now['eight'] / before['eight']:.2f}x (target >= 1.3x); "
            f"same greedy text: {now['text'] == before['text']} ({before['package']})"
        )


if __name__ == "__main__":
    main()
