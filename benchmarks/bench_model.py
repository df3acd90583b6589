"""Prefill and decode speed of our Baichuan2 model vs transformers' Llama, same weights.

The 7B variant (RoPE) is Llama with a fused QKV projection and a normalized head, so
transformers' ``LlamaForCausalLM`` holding the same weights is the baseline. Also prints
the 13B variant (ALiBi) speed and peak memory at a 2048-token context.

    python benchmarks/bench_model.py [--hidden 1024 --layers 8 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from langchain_baichuan2.modeling import BaichuanConfig, BaichuanForCausalLM


def build(args: argparse.Namespace, position_embedding: str) -> BaichuanForCausalLM:
    config = BaichuanConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        max_position_embeddings=4096 if position_embedding == "rope" else None,
        position_embedding=position_embedding,
    )
    torch.manual_seed(0)
    model = BaichuanForCausalLM(config).eval()
    model.normalize_head()
    model.generation_config.eos_token_id = None  # always decode the full length
    return model


def as_llama(model: BaichuanForCausalLM) -> LlamaForCausalLM:
    cfg = model.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        )
    ).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if "W_pack" in name:
            for part, t in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                state[name.replace("W_pack", f"{part}_proj")] = t
        else:
            state[name] = tensor
    llama.load_state_dict(state, strict=False)
    llama.generation_config.eos_token_id = None
    return llama


@torch.inference_mode()
def speed(model, prompt_len: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` prefill and decode tokens/s through ``generate()``."""
    ids = torch.randint(
        3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1)
    )
    prefill, decode = [], []
    model.generate(ids[:, :8], max_new_tokens=2, do_sample=False)  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        prefill.append(prompt_len / (time.perf_counter() - start))
        start = time.perf_counter()
        model.generate(
            ids[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        decode.append(new_tokens / (time.perf_counter() - start))
    return max(prefill), max(decode)


def peak_rss_during(fn) -> tuple[float, int]:
    """Run ``fn``; return its seconds and the peak RSS growth in bytes (sampled)."""
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, peak[0] - base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=125696)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    ours = build(args, "rope")
    llama = as_llama(ours)
    rows = []
    for name, model in (("llama (baseline)", llama), ("baichuan2 7b-variant", ours)):
        rows.append((name, *speed(model, args.prompt, args.new_tokens, args.repeats)))
    del llama
    alibi = build(args, "alibi")
    rows.append(
        ("baichuan2 13b-variant", *speed(alibi, args.prompt, args.new_tokens, args.repeats))
    )

    print(
        f"hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}, fp32, "
        f"{torch.get_num_threads()} CPU threads, prompt {args.prompt}, {args.new_tokens} new tokens"
    )
    print(f"{'model':24s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name, prefill, decode in rows:
        print(f"{name:24s} {prefill:14.1f} {decode:13.2f}")
    base = rows[0]
    print(
        f"ratio 7b-variant / llama: prefill {rows[1][1] / base[1]:.3f}, "
        f"decode {rows[1][2] / base[2]:.3f} (target decode >= 0.95)"
    )

    ids = torch.randint(
        3, args.vocab, (1, args.context), generator=torch.Generator().manual_seed(2)
    )
    with torch.inference_mode():
        seconds, peak = peak_rss_during(lambda: alibi(ids, logits_to_keep=1))
    print(
        f"13b-variant prefill of {args.context} tokens: {seconds:.2f} s "
        f"({args.context / seconds:.1f} tok/s), peak memory growth {peak / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
