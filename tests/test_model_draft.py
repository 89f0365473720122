"""Draft network: export keys/shapes, config derivation, RoPE, one-step math, KV-cache decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import InputDataError, UsageError
from core.model import DraftConfig, DraftKVCache, Eagle3Draft


def smollm2_hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                       rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True)


def llama31_8b_hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                       max_position_embeddings=131072, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def expected_keys(H, Ht, V, Vd, nh, nkv, hd, inter):
    """Reference section 2, verbatim."""
    return {
        "embed_tokens.weight": (V, H), "fc.weight": (H, 3 * Ht),
        "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (nh * hd, 2 * H),
        "midlayer.self_attn.k_proj.weight": (nkv * hd, 2 * H),
        "midlayer.self_attn.v_proj.weight": (nkv * hd, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, nh * hd),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (inter, H), "midlayer.mlp.up_proj.weight": (inter, H),
        "midlayer.mlp.down_proj.weight": (H, inter),
        "norm.weight": (H,), "lm_head.weight": (Vd, H), "d2t": (Vd,), "t2d": (V,),
    }


def test_export_keys_smollm2_shapes():
    cfg = DraftConfig.from_target_config(smollm2_hf_config(), 8192)
    assert (cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.aux_layer_ids) == (64, 100000.0, None, [1, 14, 26])
    sd = Eagle3Draft(cfg).state_dict()
    want = expected_keys(576, 576, 49152, 8192, 9, 3, 64, 1536)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool


def test_export_keys_llama31_8b_on_meta():
    cfg = DraftConfig.from_target_config(llama31_8b_hf_config(), 32000)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.aux_layer_ids == [1, 15, 28] and cfg.default_aux_layer_ids
    with torch.device("meta"):
        draft = Eagle3Draft(cfg)
    got = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    assert got == expected_keys(4096, 4096, 128256, 32000, 32, 8, 128, 14336)
    assert not draft.embed_tokens.weight.requires_grad
    assert draft.lm_head.weight is not draft.embed_tokens.weight  # never tied


def test_deeper_draft_key_layout():
    cfg = DraftConfig.from_target_config(smollm2_hf_config(), 1024, num_layers=3)
    sd = Eagle3Draft(cfg).state_dict()
    assert "layers.1.self_attn.q_proj.weight" in sd and "layers.2.mlp.down_proj.weight" in sd
    assert sd["layers.1.self_attn.q_proj.weight"].shape == (576, 576)  # later layers take H
    assert not any(k.startswith("layers.") and "hidden_norm" in k for k in sd)
    assert not any(k.startswith("model.") for k in sd)


def test_config_reads_transformers5_and_classic_rope_forms():
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    classic = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
               "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 12345.0,
               "rope_scaling": {"type": "linear", "factor": 2.0}, "rms_norm_eps": 1e-6,
               "max_position_embeddings": 512}
    c = DraftConfig.from_target_config(classic, 100)
    assert c.rope_theta == 12345.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.head_dim == 16  # absent -> hidden // heads
    new = dict(classic, rope_scaling=None, rope_theta=None,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    c = DraftConfig.from_target_config(new, 100)
    assert c.rope_theta == 1e6 and c.rope_scaling is None
    for cls in (Qwen2Config, Qwen3Config, MistralConfig):
        hf = cls(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=54321.0, head_dim=32)
        c = DraftConfig.from_target_config(hf, 100)
        assert (c.rope_theta, c.head_dim, c.num_key_value_heads) == (54321.0, 32, 2), cls
    c2 = DraftConfig.from_dict(c.to_dict())
    assert c2 == c


def test_config_validation_errors():
    hf = smollm2_hf_config()
    with pytest.raises(UsageError, match="three distinct"):
        DraftConfig.from_target_config(hf, 8192, aux_layer_ids=[1, 1, 2])
    with pytest.raises(UsageError, match="out of range"):
        DraftConfig.from_target_config(hf, 8192, aux_layer_ids=[1, 2, 29])
    with pytest.raises(UsageError, match="exceeds the target vocab"):
        DraftConfig.from_target_config(hf, 50000)
    with pytest.raises(UsageError, match="unknown fields"):
        DraftConfig.from_dict({**DraftConfig.from_target_config(hf, 10).to_dict(), "bogus": 1})
    with pytest.raises(UsageError, match="lacks"):
        DraftConfig.from_target_config({"hidden_size": 8}, 10)
    with pytest.raises(UsageError, match="rope_scaling type"):
        DraftConfig.from_target_config({**smollm2_hf_config().to_dict(), "rope_parameters": None,
                                        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 10)


def test_llama3_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, num_hidden_layers=8, vocab_size=100,
                     intermediate_size=64, max_position_embeddings=131072, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg = DraftConfig.from_target_config(hf, 10)
    draft = Eagle3Draft(cfg)
    pos = torch.tensor([[0, 5, 100, 20000]])
    cos, sin = draft.rotary(pos, torch.float32)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf)(torch.zeros(1), pos)
    torch.testing.assert_close(cos[:, 0], ref_cos)
    torch.testing.assert_close(sin[:, 0], ref_sin)


def tiny_config(**kw):
    base = dict(vocab_size=97, draft_vocab_size=31, hidden_size=32, target_hidden_size=24,
                intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
                target_num_hidden_layers=8)
    base.update(kw)
    return DraftConfig(**base)


def manual_step(d: Eagle3Draft, ids, h_in, pos):
    """Reference section 2 written out with plain ops (one layer, full causal attention)."""
    m = d.midlayer

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + d.config.rms_norm_eps))

    x = torch.cat((rms(d.embed_tokens.weight[ids], m.input_layernorm.weight), rms(h_in, m.hidden_norm.weight)), -1)
    B, T, _ = x.shape
    nh, nkv, hd = 4, 2, 8
    q = (x @ m.self_attn.q_proj.weight.T).view(B, T, nh, hd).transpose(1, 2)
    k = (x @ m.self_attn.k_proj.weight.T).view(B, T, nkv, hd).transpose(1, 2)
    v = (x @ m.self_attn.v_proj.weight.T).view(B, T, nkv, hd).transpose(1, 2)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = pos[..., None].float() * inv
    cos, sin = torch.cat((ang, ang), -1).cos()[:, None], torch.cat((ang, ang), -1).sin()[:, None]

    def rot(t):
        return t * cos + torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1) * sin

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = q @ k.transpose(-1, -2) / hd ** 0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    h = h_in + a @ m.self_attn.o_proj.weight.T
    u = rms(h, m.post_attention_layernorm.weight)
    h = h + (F.silu(u @ m.mlp.gate_proj.weight.T) * (u @ m.mlp.up_proj.weight.T)) @ m.mlp.down_proj.weight.T
    return rms(h, d.norm.weight) @ d.lm_head.weight.T, h


def test_one_step_matches_reference_math():
    torch.manual_seed(0)
    d = Eagle3Draft(tiny_config())
    for p in d.parameters():  # non-trivial norms so a swapped norm would show
        torch.nn.init.normal_(p, 0.5 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else 0.1)
    ids = torch.randint(0, 97, (2, 7))
    aux = torch.randn(2, 7, 72)
    pos = torch.arange(7).expand(2, 7) + 3
    h_in = d.project_aux(aux)
    logits, h_out = d.decode_step(ids, h_in, pos)
    ref_logits, ref_h = manual_step(d, ids, h_in, pos)
    torch.testing.assert_close(h_out, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert logits.shape == (2, 7, 31)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_decode_with_cache_equals_full_pass(num_layers):
    torch.manual_seed(1)
    d = Eagle3Draft(tiny_config(num_hidden_layers=num_layers)).eval()
    B, T = 2, 9
    ids = torch.randint(0, 97, (B, T))
    h_in = d.project_aux(torch.randn(B, T, 72))
    pos = torch.arange(T).expand(B, T)
    full_logits, full_h = d.decode_step(ids, h_in, pos)
    # token by token
    cache = DraftKVCache()
    outs = [d.decode_step(ids[:, t:t + 1], h_in[:, t:t + 1], pos[:, t:t + 1], cache) for t in range(T)]
    assert cache.length == T
    torch.testing.assert_close(torch.cat([o[0] for o in outs], 1), full_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([o[1] for o in outs], 1), full_h, atol=1e-5, rtol=1e-5)
    # a prefix chunk, a rejected draft rolled back with crop, then the true continuation
    cache = DraftKVCache()
    d.decode_step(ids[:, :5], h_in[:, :5], pos[:, :5], cache)
    d.decode_step(torch.randint(0, 97, (B, 2)), torch.randn(B, 2, 32), pos[:, 5:7], cache)
    cache.crop(5)
    assert cache.length == 5
    logits, h = d.decode_step(ids[:, 5:], h_in[:, 5:], pos[:, 5:], cache)
    torch.testing.assert_close(logits, full_logits[:, 5:], atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError):
        cache.crop(99)


def test_from_target_copies_frozen_embeddings_and_vocab(tiny_target):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_target)
    V = model.config.vocab_size
    selected = torch.arange(0, V, 3)[:40]
    d2t = selected - torch.arange(40)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[selected] = True
    for source in (tiny_target, str(tiny_target), model):
        d = Eagle3Draft.from_target(source, (d2t, t2d), 40)
        torch.testing.assert_close(d.embed_tokens.weight, model.get_input_embeddings().weight)
        assert not d.embed_tokens.weight.requires_grad
        assert d.config.rope_theta == 100000.0 and d.config.aux_layer_ids == [0, 1, 2]
        assert torch.equal(d.draft_to_target(torch.tensor([0, 1, 39])), selected[[0, 1, 39]])
    # lm_head independent although the target ties its embeddings
    assert d.lm_head.weight.shape == (40, model.config.hidden_size)
    with pytest.raises(UsageError, match="inconsistent"):
        Eagle3Draft.from_target(model, (d2t + 1, t2d), 40)
    with pytest.raises(UsageError, match="does not match"):
        Eagle3Draft.from_target(model, (d2t, t2d), 41)


def test_from_target_bad_folder(tmp_path):
    with pytest.raises(InputDataError, match="config.json"):
        Eagle3Draft.from_target(tmp_path, (torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.bool)), 2)
