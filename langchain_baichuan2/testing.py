"""Tiny random Baichuan2 checkpoints in the official on-disk layout, for tests.

``make_tiny_checkpoint`` writes the same files an official release folder holds
(configs, ``tokenizer.model``, weights under the official names and shard names)
with a model small enough to run on a CPU in milliseconds. No Python file is
written into the folder. ``make_tiny_adapter`` writes a LoRA adapter for one in
PEFT's layout.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm
import torch
from safetensors.torch import save as safetensors_bytes

__all__ = [
    "make_tiny_adapter",
    "make_tiny_checkpoint",
    "make_tiny_legacy_4bit_checkpoint",
    "user_defined_pieces",
]

_AUTO_MAP = {
    "AutoConfig": "configuration_baichuan.BaichuanConfig",
    "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
}
_TRANSFORMERS_VERSION = "4.29.2"  # what the official files record

# The quantization_config of the official Chat-4bits config.json.
_LEGACY_4BIT_QUANTIZATION = {
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": True,
    "load_in_8bit": False,
}

# config.json key order of each official release (7B has RoPE, 13B has no position key).
_CONFIG_KEYS = {
    "7b": (
        "architectures", "auto_map", "tokenizer_class", "bos_token_id", "eos_token_id",
        "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
        "max_position_embeddings", "model_max_length", "model_type", "num_attention_heads",
        "num_hidden_layers", "pad_token_id", "rms_norm_eps", "_from_model_config",
        "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache", "vocab_size",
    ),
    "13b": (
        "_from_model_config", "architectures", "auto_map", "tokenizer_class", "bos_token_id",
        "eos_token_id", "gradient_checkpointing", "hidden_act", "hidden_size",
        "initializer_range", "intermediate_size", "model_max_length", "model_type",
        "num_attention_heads", "num_hidden_layers", "pad_token_id", "rms_norm_eps",
        "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache", "vocab_size",
    ),
}  # fmt: skip

_GENERATION_CONFIG = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "user_token_id": 195,
    "assistant_token_id": 196,
    "max_new_tokens": 2048,
    "temperature": 0.3,
    "top_k": 5,
    "top_p": 0.85,
    "repetition_penalty": 1.05,
    "do_sample": True,
    "transformers_version": _TRANSFORMERS_VERSION,
}

# The HTML tags of ids 7..51, each as <t>, <t/>, </t>.
_TAGS: tuple[str, ...] = ("img", "h2", "td", "strong", "table", "tr", "li", "b", "h3", "br")
_TAGS += ("h4", "h5", "p", "h1", "tbody")
# Ids 62..100: punctuation; the last 12 took the places of <reserved_0>..<reserved_11>.
_PUNCTUATION = (
    "+", "-", "=", "，", "。", "！", "？", "、", "：", "￥", ".", "!", "?", "...", "。。。",
    "。。。。。。", "《", "》", "【", "】", "『", "』", "```", "<!--", "-->", "---", "<!DOCTYPE>",
    "；", "．", "＝", "＜", "＞", "－", "＋", "％", "‼", "㊣", "／", "｜",
)  # fmt: skip
_FIRST_RESERVED = 12  # <reserved_N> is id N + 89, from <reserved_12> (101) to <reserved_999>
_LAST_RESERVED = 999

_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "Large language models read text as a sequence of tokens.",
    "Please write a short poem about the sea and the moon.",
    "What is the capital of France? It is Paris.",
    "She sells seashells by the seashore every summer morning.",
    "Explain how a transformer uses attention to mix information.",
    "I would like a cup of green tea, thank you very much!",
    "The weather today is sunny with a light breeze from the west.",
    "Can you translate this sentence into Chinese for me?",
    "Machine learning is the study of algorithms that improve with data.",
    "Once upon a time, there lived a wise old owl in the forest.",
    "Hello, world! How can I help you today?",
)
_CHINESE = (
    "今天天气很好，我们去公园散步吧。",
    "人工智能正在改变我们的生活和工作方式。",
    "请用一句话介绍一下你自己。",
    "北京是中国的首都，有很多名胜古迹。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "大型语言模型可以回答问题、写文章和翻译文本。",
    "我喜欢喝绿茶，也喜欢看书和听音乐。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "这个问题的答案是四十二。",
    "百川智能发布了新的开源大模型。",
    "请把下面的英文翻译成中文。",
    "你好，世界！欢迎使用百川大模型，有什么可以帮你的吗？",
)
_CODE = (
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n\tprint(i * i)",
    "import json\ndata = json.loads('{\"key\": [1, 2, 3]}')",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y",
    "if (x > 0 && y < 100) { return x % y; } else { return -1; }",
    "SELECT name, age FROM users WHERE age >= 18 ORDER BY name;",
    "<html><body><p>Hello</p><br/><table><tr><td>1</td></tr></table></body></html>",
    "$ pip install torch==2.4.0 --index-url https://example.com/simple",
)
_NUMBERS = (
    "3.14159 2.71828 1.41421 0.57721",
    "The year 2023 had 365 days and 8760 hours.",
    "订单号：20230915，金额：￥1,299.00元。",
    "Call 555-0123 or email test@example.org before 9:30 AM.",
    "１２３４５６７８９０ ＋ － ＝ ％",
)
_EMOJI = (
    "Good morning! 😀☀️ Have a nice day 🌟",
    "我们出发吧 🚀🚀 加油 💪",
    "I ❤️ cats 🐱 and dogs 🐶.",
)


def user_defined_pieces() -> list[str]:
    """The 1,086 user-defined pieces of ids 3..1088, laid out as in the release.

    Returns:
        ``<SEP>``, ``<CLS>``, newline, tab, the HTML tags, fullwidth digits,
        punctuation, then ``<reserved_12>``..``<reserved_999>``.
    """
    tags = [form.format(tag) for tag in _TAGS for form in ("<{}>", "<{}/>", "</{}>")]
    digits = [chr(ord("０") + d) for d in range(10)]
    reserved = [f"<reserved_{n}>" for n in range(_FIRST_RESERVED, _LAST_RESERVED + 1)]
    return ["<SEP>", "<CLS>", "\n", "\t", *tags, *digits, *_PUNCTUATION, *reserved]


def _corpus() -> list[str]:
    """A small deterministic bilingual training corpus, one sentence per item."""
    lines = [*_ENGLISH, *_CHINESE, *_CODE, *_NUMBERS, *_EMOJI]
    for i, (en, zh) in enumerate(zip(_ENGLISH, _CHINESE, strict=True)):
        lines.append(f"{en} {zh}")
        lines.append(f"{zh}{_ENGLISH[(i + 5) % len(_ENGLISH)].lower()}")
        lines.append(f"Q{i}: {en}\nA{i}: {_CHINESE[(i + 3) % len(_CHINESE)]}")
    lines.append("".join(chr(c) for c in range(33, 127)))  # every printable ASCII character
    return lines


def _train_tokenizer(vocab_size: int = 1800) -> bytes:
    """Train a tiny SentencePiece BPE model with the official Baichuan2 settings.

    Args:
        vocab_size: The piece count to aim for (reached when the corpus allows).

    Returns:
        The serialized ``ModelProto``.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=32,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        user_defined_symbols=user_defined_pieces(),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _random_state_dict(
    config: dict[str, Any], dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Random weights under the official names, scaled so logits are not degenerate.

    Linear layers use std ``1/sqrt(fan_in)`` so attention and MLP outputs are as
    large as the unit-variance embeddings (different prompts give different greedy
    tokens); norms are ~1; ``lm_head`` has std 0.02, so its rows are far from
    unit norm and the loader's NormHead normalization matters.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    inter = config["intermediate_size"]

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        tensor = torch.randn(shape, generator=generator) * std + mean
        return tensor.to(dtype).contiguous()

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return normal(out_features, in_features, std=in_features**-0.5)

    state = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    for n in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{n}."
        state[prefix + "self_attn.W_pack.weight"] = linear(3 * hidden, hidden)
        state[prefix + "self_attn.o_proj.weight"] = linear(hidden, hidden)
        state[prefix + "mlp.gate_proj.weight"] = linear(inter, hidden)
        state[prefix + "mlp.up_proj.weight"] = linear(inter, hidden)
        state[prefix + "mlp.down_proj.weight"] = linear(hidden, inter)
        state[prefix + "input_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        state[prefix + "post_attention_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
    state["model.norm.weight"] = normal(hidden, std=0.1, mean=1.0)
    state["lm_head.weight"] = normal(vocab, hidden, std=0.02)
    return state


def _shard_groups(names: list[str], num_shards: int) -> list[list[str]]:
    """Split tensor names into contiguous shards by layer, like the official files.

    The embeddings, each decoder layer, and the final norm with the head are the
    units; each shard takes a contiguous, near-equal run of them.
    """
    units: dict[str, list[str]] = {}
    for name in names:
        if name.startswith("model.layers."):
            key = ".".join(name.split(".")[:3])
        elif name.startswith("model.embed_tokens."):
            key = "embed"
        else:
            key = "head"
        units.setdefault(key, []).append(name)
    if num_shards > len(units):
        raise ValueError(f"num_shards={num_shards} exceeds the {len(units)} shardable units")
    ordered = list(units.values())
    bounds = [round(i * len(ordered) / num_shards) for i in range(num_shards + 1)]
    return [
        [name for unit in ordered[start:end] for name in unit] for start, end in pairwise(bounds)
    ]


def _write_weights(
    folder: Path,
    state: dict[str, torch.Tensor],
    weights: Literal["safetensors", "bin"],
    num_shards: int,
) -> None:
    """Save a state dict as one file or as official-style shards plus an index."""
    if weights == "safetensors":
        single, stem, ext = "model.safetensors", "model", "safetensors"

        def save(tensors: dict[str, torch.Tensor], file: Path) -> None:
            # Written as bytes, like every other file here: safetensors' save_file goes
            # through a private temporary file and leaves the weights mode 0600.
            file.write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))

    else:
        single, stem, ext = "pytorch_model.bin", "pytorch_model", "bin"

        def save(tensors: dict[str, torch.Tensor], file: Path) -> None:
            torch.save(tensors, file)

    if num_shards == 1:
        save(state, folder / single)
        return
    weight_map = {}
    for k, group in enumerate(_shard_groups(list(state), num_shards), start=1):
        file = f"{stem}-{k:05d}-of-{num_shards:05d}.{ext}"
        save({name: state[name] for name in group}, folder / file)
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(folder / f"{single}.index.json", index)


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_token(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": True,
    }


def _tokenizer_files(model_max_length: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The official 13B ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
    tokenizer_config: dict[str, Any] = {
        "add_bos_token": False,
        "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": {"__type": "AddedToken", **_added_token("<s>")},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **_added_token("</s>")},
        "model_max_length": model_max_length,
        "pad_token": {"__type": "AddedToken", **_added_token("<unk>")},
        "sp_model_kwargs": {},
        "tokenizer_class": "BaichuanTokenizer",
        "unk_token": {"__type": "AddedToken", **_added_token("<unk>")},
    }
    order = ("bos_token", "eos_token", "unk_token", "pad_token")
    special_tokens_map = {key: _added_token(special[key]) for key in order}
    return tokenizer_config, special_tokens_map


def make_tiny_checkpoint(
    path: str | os.PathLike,
    variant: Literal["7b", "13b"] = "7b",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    model_max_length: int = 4096,
    weights: Literal["safetensors", "bin"] = "safetensors",
    num_shards: int = 1,
    tokenizer_model: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Path:
    """Write a random tiny Baichuan2 model in the official folder layout.

    The folder gets ``config.json`` (the official keys, in the official order, of
    the variant), ``generation_config.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``tokenizer.model`` and the weights. Nothing is
    cached: the same arguments always write the same bytes.

    Args:
        path: Folder to write into (created if missing).
        variant: ``"7b"`` (RoPE, has ``max_position_embeddings``) or ``"13b"`` (ALiBi).
        hidden_size: Model width.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of heads; need not be a power of two.
        intermediate_size: MLP width.
        model_max_length: Context length; the 7B config also stores it as
            ``max_position_embeddings``.
        weights: ``"safetensors"`` or ``"bin"`` (``torch.save``).
        num_shards: Above 1, writes official shard names plus an index json.
        tokenizer_model: A ``tokenizer.model`` to copy; ``None`` trains a tiny one
            with the official settings and the official ids 0..1344.
        dtype: Dtype of the stored weights (and of the config's ``torch_dtype``).
        seed: Seed of the random weights.
        vocab_size: Grow the tokenizer to this many pieces with unused ones (which
            encoding never gives but decoding shows as ``<unused_N>``), so that a model
            of the real vocabulary can run on the tiny tokenizer; None: as trained.

    Returns:
        The folder path.

    Raises:
        ValueError: On an unknown variant or weights format, sizes that do not
            fit, or more shards than layers + 2.
    """
    if variant not in _CONFIG_KEYS:
        raise ValueError(f"variant must be '7b' or '13b', not {variant!r}")
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights must be 'safetensors' or 'bin', not {weights!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, not {num_shards}")
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_attention_heads}")
    if variant == "7b" and (hidden_size // num_attention_heads) % 2:
        raise ValueError("RoPE (7b) needs an even head dimension")

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_model is None:
        (folder / "tokenizer.model").write_bytes(_train_tokenizer())
    else:
        shutil.copyfile(tokenizer_model, folder / "tokenizer.model")
    if vocab_size is not None:
        _pad_tokenizer(folder / "tokenizer.model", vocab_size)
    tokenizer = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab_size = tokenizer.get_piece_size()

    values: dict[str, Any] = {
        "_from_model_config": True,
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": _AUTO_MAP,
        "tokenizer_class": "BaichuanTokenizer",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "gradient_checkpointing": False,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": model_max_length,
        "model_max_length": model_max_length,
        "model_type": "baichuan",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    config = {key: values[key] for key in _CONFIG_KEYS[variant]}
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", _GENERATION_CONFIG)
    tokenizer_config, special_tokens_map = _tokenizer_files(model_max_length)
    _write_json(folder / "tokenizer_config.json", tokenizer_config)
    _write_json(folder / "special_tokens_map.json", special_tokens_map)
    _write_weights(folder, _random_state_dict(config, dtype, seed), weights, num_shards)
    return folder


def _pad_tokenizer(path: Path, pieces: int) -> None:
    """Grow the SentencePiece model at ``path`` to ``pieces`` pieces with unused ones."""
    from sentencepiece import sentencepiece_model_pb2

    proto: Any = sentencepiece_model_pb2  # generated by protobuf: no types for mypy
    model = proto.ModelProto()
    model.ParseFromString(path.read_bytes())
    unused = proto.ModelProto.SentencePiece.UNUSED
    for n in range(pieces - len(model.pieces)):
        model.pieces.add(piece=f"<unused_{n}>", score=-1e9, type=unused)
    path.write_bytes(model.SerializeToString())


def _legacy_quant_state(weight: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """Quantize a weight to NF4 (blocksize 64, double quant) with today's bitsandbytes.

    Returns:
        The packed bytes and the state as the bitsandbytes 0.41 list ``[absmax, shape,
        dtype, blocksize, [offset, (nested_absmax, nested_code)], "nf4", code]``.
    """
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    nested = [state.offset, (state.state2.absmax, state.state2.code)]
    legacy = [state.absmax, state.shape, state.dtype, state.blocksize, nested, "nf4", state.code]
    return packed, legacy


def make_tiny_legacy_4bit_checkpoint(
    path: str | os.PathLike,
    variant: Literal["7b", "13b"] = "13b",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    model_max_length: int = 4096,
    tokenizer_model: str | os.PathLike | None = None,
    seed: int = 0,
) -> Path:
    """Write a random tiny model in the layout of the official Chat-4bits releases.

    The bfloat16 weights of :func:`make_tiny_checkpoint` (same arguments, same seed)
    are quantized with bitsandbytes (NF4, blocksize 64, double quantization, as the
    releases were), and one ``pytorch_model.bin`` holds, for the five linear layers of
    each decoder layer, ``<name>.weight.data`` (the packed bytes) and
    ``<name>.weight.quant_state`` (the bitsandbytes 0.41 list); embeddings, norms and
    ``lm_head`` stay bfloat16. ``config.json`` gets the releases' ``quantization_config``.

    bitsandbytes' CPU kernel needs ``in_features % 64 == 0`` and
    ``out_features % 32 == 0``, so ``hidden_size`` and ``intermediate_size`` should be
    multiples of 64.

    Args:
        path: Folder to write into (created if missing).
        variant: ``"7b"`` (RoPE) or ``"13b"`` (ALiBi, as 13B-Chat-4bits).
        hidden_size: Model width.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of heads.
        intermediate_size: MLP width.
        model_max_length: Context length.
        tokenizer_model: A ``tokenizer.model`` to copy; ``None`` trains a tiny one.
        seed: Seed of the random weights.

    Returns:
        The folder path.
    """
    folder = make_tiny_checkpoint(
        path,
        variant,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        model_max_length=model_max_length,
        weights="bin",
        tokenizer_model=tokenizer_model,
        dtype=torch.bfloat16,
        seed=seed,
    )
    from langchain_baichuan2.loading.legacy_4bit import QUANTIZED_LINEARS

    quantized = {
        f"model.layers.{layer}.{linear}.weight"
        for layer in range(num_hidden_layers)
        for linear in QUANTIZED_LINEARS
    }
    weights = folder / "pytorch_model.bin"
    state: dict[str, Any] = {}
    for name, tensor in torch.load(weights, weights_only=True).items():
        if name in quantized:
            state[name + ".data"], state[name + ".quant_state"] = _legacy_quant_state(tensor)
        else:
            state[name] = tensor
    torch.save(state, weights)

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    keys = list(config)
    # The official file has quantization_config right after pad_token_id.
    keys.insert(keys.index("pad_token_id") + 1, "quantization_config")
    config["quantization_config"] = _LEGACY_4BIT_QUANTIZATION
    _write_json(folder / "config.json", {key: config[key] for key in keys})
    return folder


# The LoRA targets, with the submodule and (out, in) sizes of each (h: hidden, i: MLP).
_LORA_SHAPES = {
    "W_pack": ("self_attn", "3h", "h"),
    "o_proj": ("self_attn", "h", "h"),
    "gate_proj": ("mlp", "i", "h"),
    "up_proj": ("mlp", "i", "h"),
    "down_proj": ("mlp", "h", "i"),
}


def make_tiny_adapter(
    checkpoint: str | os.PathLike,
    path: str | os.PathLike,
    target_modules: tuple[str, ...] | list[str] = ("W_pack",),
    r: int = 1,
    *,
    lora_alpha: float = 32,
    use_rslora: bool = False,
    weights: Literal["safetensors", "bin"] = "safetensors",
    std: float = 0.05,
    seed: int = 0,
) -> Path:
    """Write a random LoRA adapter for ``checkpoint`` in PEFT's folder layout.

    ``adapter_config.json`` as PEFT writes it (``peft_type`` LORA, the checkpoint as
    ``base_model_name_or_path``) and ``adapter_model.safetensors`` (or ``.bin``) under
    PEFT's names (``base_model.model.model.layers.N.self_attn.W_pack.lora_A.weight``).
    Both ``A`` and ``B`` are random and non-zero, so the adapter changes the output.
    The defaults are the official fine-tune script's (``W_pack``, r=1, alpha 32).

    Returns:
        The adapter folder.
    """
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    sizes = {"h": config["hidden_size"], "3h": 3 * config["hidden_size"]}
    sizes["i"] = config["intermediate_size"]
    unknown = sorted(set(target_modules) - set(_LORA_SHAPES))
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; known: {list(_LORA_SHAPES)}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in target_modules:
            parent, out_size, in_size = _LORA_SHAPES[module]
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            for half, shape in (("A", (r, sizes[in_size])), ("B", (sizes[out_size], r))):
                tensor = torch.randn(shape, generator=generator) * std
                tensors[f"{prefix}.lora_{half}.weight"] = tensor
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if weights == "bin":
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes(tensors))
    adapter_config: dict[str, Any] = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": str(checkpoint),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.1,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": use_rslora,
    }
    _write_json(folder / "adapter_config.json", adapter_config)
    return folder
