"""llama.cpp as a contender in ``bench_cpu_decode.py``: the same weights, its own engine.

``write_gguf`` converts a 7B-shaped (RoPE) checkpoint folder into a GGUF file of
llama.cpp's ``llama`` architecture, which Baichuan2-7B is once ``W_pack`` is split into
q/k/v and the NormHead is normalized: q and k rows are reordered per head for llama.cpp's
pairwise rotary embedding, so its logits are the model's (``logits_gap`` checks that).
``LlamaCppContender`` times it through ``llama-cpp-python``: batch 1 after a long prompt
(its high-level ``generate``) and 8 sequences decoded together in one llama.cpp batch
per step (its low-level batch API, as ``llama-batched-bench`` does). Needs the ``gguf``
and ``llama-cpp-python`` packages; the latter builds from source, ~30 minutes on 2 cores:
``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install gguf llama-cpp-python``.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from langchain_baichuan2.loading.checkpoint import read_config
from langchain_baichuan2.modeling import BaichuanForCausalLM


def _pairwise_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k rows per head from rotate-half order to llama.cpp's adjacent pairs."""
    out, inp = weight.shape
    half = out // heads // 2
    return weight.reshape(heads, 2, half, inp).transpose(1, 2).reshape(out, inp)


def _vocabulary(folder: Path, size: int) -> tuple[list[bytes], list[float], list[int]]:
    """The SentencePiece pieces, scores and llama.cpp token types, padded to ``size``."""
    import gguf
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    kinds = gguf.TokenType
    pieces, scores, types = [], [], []
    for i in range(processor.get_piece_size()):
        pieces.append(processor.id_to_piece(i).encode())
        scores.append(processor.get_score(i))
        if processor.is_unknown(i):
            types.append(kinds.UNKNOWN)
        elif processor.is_control(i):
            types.append(kinds.CONTROL)
        elif processor.is_byte(i):
            types.append(kinds.BYTE)
        elif processor.is_unused(i):
            types.append(kinds.UNUSED)
        else:
            types.append(kinds.NORMAL)
    for i in range(len(pieces), size):
        pieces.append(f"[PAD{i}]".encode())
        scores.append(0.0)
        types.append(kinds.UNUSED)
    return pieces, scores, types


def no_llama_layout(folder: Path) -> str | None:
    """Why ``folder``'s model has no llama.cpp ``llama`` layout (None when it has one)."""
    if read_config(folder).position_embedding != "rope":
        return "a 13B-shaped (ALiBi) checkpoint has no llama.cpp llama layout"
    return None


@torch.inference_mode()
def write_gguf(folder: Path, dtype: str, path: Path) -> Path:
    """Write ``folder``'s model as a llama.cpp GGUF file in ``dtype`` ("fp32"/"bf16").

    Raises:
        ValueError: The checkpoint is 13B-shaped (ALiBi), which the ``llama`` layout
            cannot express.
    """
    import gguf

    problem = no_llama_layout(folder)
    if problem is not None:
        raise ValueError(problem)
    config = read_config(folder)
    model = BaichuanForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    heads, hidden = config.num_attention_heads, config.hidden_size
    matrix_type = {"fp32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.model_max_length)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if dtype == "fp32" else gguf.LlamaFileType.MOSTLY_BF16
    )
    pieces, scores, types = _vocabulary(folder, config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)

    def add(name: str, tensor: torch.Tensor) -> None:
        data = tensor.float().contiguous().numpy()
        if tensor.dim() == 1 or dtype == "fp32":  # norms stay fp32, as llama.cpp wants
            writer.add_tensor(name, data)
            return
        kind = matrix_type[dtype]
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)

    inner = model.model
    add("token_embd.weight", inner.embed_tokens.weight)
    for i, layer in enumerate(inner.layers):
        q, k, v = layer.self_attn.W_pack.weight.chunk(3)
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        add(f"blk.{i}.attn_q.weight", _pairwise_rows(q, heads))
        add(f"blk.{i}.attn_k.weight", _pairwise_rows(k, heads))
        add(f"blk.{i}.attn_v.weight", v)
        add(f"blk.{i}.attn_output.weight", layer.self_attn.o_proj.weight)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        add(f"blk.{i}.ffn_gate.weight", layer.mlp.gate_proj.weight)
        add(f"blk.{i}.ffn_up.weight", layer.mlp.up_proj.weight)
        add(f"blk.{i}.ffn_down.weight", layer.mlp.down_proj.weight)
    add("output_norm.weight", inner.norm.weight)
    add("output.weight", F.normalize(model.lm_head.weight, dim=-1))  # the NormHead's use
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class LlamaCppContender:
    """llama.cpp on a GGUF file: batch-1 and 8-sequence greedy decode rates."""

    def __init__(self, path: Path, context: int, threads: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.context, self.threads = context, threads
        self.vocab = self.llm.n_vocab()

    def batch1(self, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
        """Greedy tok/s after ``ids`` (after the first token), and the tokens."""
        self.llm.reset()
        tokens, times = [], []
        for token in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        return (len(times) - 1) / (times[-1] - times[0]), tokens

    def streams(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Tokens a second of ``prompts`` decoded together, prefill included (wall clock)."""
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx = self.context
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = len(prompts)
        params.n_threads = params.n_threads_batch = self.threads
        ctx = lib.llama_init_from_model(self.llm._model.model, params)
        capacity = max(sum(len(p) for p in prompts), len(prompts))
        batch = lib.llama_batch_init(capacity, 0, 1)
        try:
            start = time.perf_counter()
            next_tokens = self._decode(ctx, batch, [(s, list(p), 0) for s, p in enumerate(prompts)])
            positions = [len(p) for p in prompts]
            for _ in range(new_tokens - 1):
                step = [(s, [t], positions[s]) for s, t in enumerate(next_tokens)]
                next_tokens = self._decode(ctx, batch, step)
                positions = [n + 1 for n in positions]
            seconds = time.perf_counter() - start
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
        return len(prompts) * new_tokens / seconds

    def _decode(self, ctx: Any, batch: Any, rows: list[tuple[int, list[int], int]]) -> list[int]:
        """One llama.cpp batch of ``(sequence, tokens, first position)``; each row's arg-max."""
        n = 0
        last = []
        for sequence, tokens, start in rows:
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = sequence
                batch.logits[n] = offset == len(tokens) - 1
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        if self.lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(self._logits(ctx, i).argmax()) for i in last]

    def _logits(self, ctx: Any, i: int) -> np.ndarray:
        """The logits of batch position ``i`` (-1: the last) of the last decode, in place."""
        floats = ctypes.cast(self.lib.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(floats, (self.vocab,))

    def next_logits(self, ids: list[int]) -> torch.Tensor:
        """llama.cpp's logits for the token after ``ids``."""
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self._logits(self.llm._ctx.ctx, -1).copy())


@torch.inference_mode()
def logits_gap(folder: Path, contender: LlamaCppContender, ids: list[int]) -> tuple[float, bool]:
    """Largest |logit| difference after ``ids`` against our fp32 model, and same arg-max."""
    model = BaichuanForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = model(torch.tensor([ids])).logits[0, -1]
    theirs = contender.next_logits(ids)
    return float((ours - theirs).abs().max()), int(ours.argmax()) == int(theirs.argmax())
