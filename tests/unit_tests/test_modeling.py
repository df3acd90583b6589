"""The native Baichuan2 network against independent computations."""

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from langchain_baichuan2.modeling import BaichuanConfig, BaichuanForCausalLM, alibi_slopes
from langchain_baichuan2.modeling.modeling import BaichuanRotaryEmbedding, apply_rotary_pos_emb

VOCAB = 300


def tiny_model(position_embedding: str, heads: int = 4, head_dim: int = 16, seed: int = 0):
    config = BaichuanConfig(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=256 if position_embedding == "rope" else None,
        position_embedding=position_embedding,
    )
    torch.manual_seed(seed)
    model = BaichuanForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model


VARIANTS = [("rope", 4), ("alibi", 4), ("alibi", 5)]


@pytest.mark.parametrize(("pe", "heads"), VARIANTS)
def test_cached_step_by_step_decoding_equals_full_forward(pe, heads):
    model = tiny_model(pe, heads)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("pe", "heads"), VARIANTS)
def test_chunked_prefill_equals_full_forward(pe, heads):
    model = tiny_model(pe, heads)
    ids = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        parts = [
            model(ids[:, a:b], cache=cache, use_cache=True).logits
            for a, b in ((0, 4), (4, 9), (9, 13))
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("pe", "heads"), VARIANTS)
def test_left_padded_batch_equals_each_row_alone(pe, heads):
    model = tiny_model(pe, heads)
    gen = torch.Generator().manual_seed(3)
    long_ids = torch.randint(3, VOCAB, (1, 9), generator=gen)
    short_ids = torch.randint(3, VOCAB, (1, 4), generator=gen)
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 5, dtype=torch.long), short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        batched = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(batched[0], model(long_ids).logits[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(batched[1, 5:], model(short_ids).logits[0], rtol=0, atol=1e-4)
        together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
        alone = [
            model.generate(x, max_new_tokens=8, do_sample=False) for x in (long_ids, short_ids)
        ]
    assert together[0, -8:].tolist() == alone[0][0, -8:].tolist()
    assert together[1, -8:].tolist() == alone[1][0, -8:].tolist()


def test_generate_with_sampling_is_reproducible_with_a_seed():
    model = tiny_model("alibi", 4)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9))
    assert outs[0].tolist() == outs[1].tolist()
    assert outs[0].shape[1] == 11


@pytest.mark.parametrize(
    ("heads", "expected"),
    [
        (4, [2**-2, 2**-4, 2**-6, 2**-8]),
        (8, [2**-k for k in range(1, 9)]),
        (5, [2**-2, 2**-4, 2**-6, 2**-8, 2**-1]),
        # 40 heads: 32 slopes 2^(-(h+1)/4), then 2^(-(2k+1)/8) for k < 8.
        (
            40,
            [2 ** (-(h + 1) / 4) for h in range(32)] + [2 ** (-(2 * k + 1) / 8) for k in range(8)],
        ),
    ],
)
def test_alibi_slopes_match_closed_form(heads, expected):
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(expected), rtol=1e-6, atol=0)


def test_rope_matches_complex_rotation():
    head_dim, seq = 8, 6
    rope = BaichuanRotaryEmbedding(head_dim)
    q = torch.randn(1, 2, seq, head_dim, generator=torch.Generator().manual_seed(5))
    k = torch.randn(1, 2, seq, head_dim, generator=torch.Generator().manual_seed(6))
    positions = torch.arange(seq)[None]
    cos, sin = rope(q, positions)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)

    def rotate(x):
        half = head_dim // 2
        freqs = [10000 ** (-2 * i / head_dim) for i in range(half)]
        out = torch.empty_like(x)
        for p in range(seq):
            for i in range(half):
                z = complex(1, 0) * torch.complex(x[..., p, i], x[..., p, i + half])
                z = z * complex(math.cos(p * freqs[i]), math.sin(p * freqs[i]))
                out[..., p, i], out[..., p, i + half] = z.real, z.imag
        return out

    torch.testing.assert_close(q_rot, rotate(q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rot, rotate(k), rtol=1e-5, atol=1e-5)


def test_rope_variant_equals_transformers_llama_with_same_weights():
    model = tiny_model("rope", 4)
    model.normalize_head()
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
            q, k, v = tensor.chunk(3, dim=0)
            for part, t in zip("qkv", (q, k, v), strict=True):
                state[name.replace("W_pack", f"{part}_proj")] = t
        else:
            state[name] = tensor
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
        ours = model.generate(ids, max_new_tokens=10, do_sample=False)
        theirs = llama.generate(ids, max_new_tokens=10, do_sample=False)
    assert ours.tolist() == theirs.tolist()


def reference_alibi_logits(model: BaichuanForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Spell out the 13B forward pass from SPEC with plain tensor ops (batch of one)."""
    cfg = model.config
    sd = {k: v.float() for k, v in model.state_dict().items()}
    heads, hd, n = cfg.num_attention_heads, cfg.head_dim, ids.shape[1]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    slopes = alibi_slopes(heads)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    bias = slopes[:, None, None] * (j - i)
    bias = bias.masked_fill(j > i, float("-inf"))
    x = sd["model.embed_tokens.weight"][ids[0]]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q, k, v = (h @ sd[p + "self_attn.W_pack.weight"].T).split(cfg.hidden_size, dim=-1)
        q, k, v = (t.view(n, heads, hd).transpose(0, 1) for t in (q, k, v))
        att = (q @ k.transpose(1, 2) / math.sqrt(hd) + bias).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(n, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    head = torch.nn.functional.normalize(sd["lm_head.weight"], dim=-1)
    return (x @ head.T)[None]


@pytest.mark.parametrize("heads", [4, 5])
def test_alibi_variant_equals_reference_forward(heads):
    model = tiny_model("alibi", heads)
    model.normalize_head()
    ids = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, reference_alibi_logits(model, ids), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_sdpa_and_eager_attention_agree(pe):
    model = tiny_model(pe, 4)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        sdpa = model(ids, attention_mask=mask).logits
        model.config._attn_implementation = "eager"
        eager = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[0], eager[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sdpa[1, 3:], eager[1, 3:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_half_precision_stays_close_to_fp32(pe, dtype):
    model = tiny_model(pe, 4)
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        reference = model(ids).logits
        half = model.to(dtype)(ids).logits
    assert half.dtype == dtype
    assert torch.isfinite(half).all()
    torch.testing.assert_close(
        half.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item()
    )


def test_normalize_head_makes_unit_rows_in_fp32():
    model = tiny_model("rope", 4)
    model.normalize_head()
    norms = model.lm_head.weight.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-6, atol=1e-6)


def test_config_rejects_an_unknown_position_scheme():
    with pytest.raises(Exception, match="position_embedding must be 'rope'"):
        BaichuanConfig(position_embedding="learned")


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_left_padding_stays_finite(attention, dtype):
    model = tiny_model("alibi", 4).to(dtype)
    model.config._attn_implementation = attention
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 4:]).logits
    assert torch.isfinite(logits[1, 4:]).all() and torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[1, 4:].float(), alone[0].float(), rtol=0, atol=0.1)


def test_a_7b_sized_config_without_a_rope_key_warns(caplog):
    with caplog.at_level("WARNING"):
        config = BaichuanConfig(hidden_size=4096, num_attention_heads=32)
    assert config.position_embedding == "alibi"
    assert "position_embedding='rope'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert BaichuanConfig().position_embedding == "alibi"  # the 13B defaults
        seven = BaichuanConfig(
            hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096
        )
        assert seven.position_embedding == "rope"
    assert not caplog.text
