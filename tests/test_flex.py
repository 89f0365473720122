"""Flex attention without recompiles: length buckets, block masks built from document boundaries
(checked element by element against the TTT mask), and a compile count held small over varied
packed batches and TTT steps (CPU, forward)."""

from __future__ import annotations

import pytest
import torch

from core.model import attention as A
from core.model.attention import TTTAttention, bucket_length

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
NH, NKV, HD = 4, 2, 8


def packed_doc(lengths, pad=0):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])[None]


def test_buckets_are_few_and_waste_little():
    assert [bucket_length(t) for t in (1, 128, 129, 1000, 1025, 2048, 2049, 8000)] == \
        [128, 128, 256, 1024, 1152, 2048, 2304, 8192]
    ts = range(1, 8193)
    assert all(t <= bucket_length(t) <= max(128, 1.125 * t + 127) for t in ts)
    assert bucket_length(bucket_length(3000)) == bucket_length(3000)
    assert len({bucket_length(t) for t in range(6144, 8193)}) == 5  # packed rows near an 8k budget


@pytest.mark.parametrize("lengths, pad", [([100, 200, 37, 90], 0), ([300], 11), ([5] * 40 + [57], 3)])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_block_mask_covers_exactly_the_ttt_mask(lengths, pad, steps):
    attn = TTTAttention(packed_doc(lengths, pad), NH, NKV, HD, "flex", max_steps=4)
    t, p = attn.T, attn.padded
    bm = attn.block_mask(steps)
    assert bm.seq_lengths == (p, 4 * p)
    # the TTT mask over the real queries: causal & same document, then one diagonal per later step
    doc = attn.doc_ids[0]
    want = torch.zeros(t, 4 * p, dtype=torch.bool)
    want[:, :t] = causal = torch.ones(t, t, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :])
    for s in range(1, steps):
        want[:, s * p:s * p + t] = torch.eye(t, dtype=torch.bool)
    assert causal.any(-1).all()
    q, kv = torch.arange(t)[:, None], torch.arange(4 * p)[None, :]
    assert torch.equal(bm.mask_mod(0, 0, q, kv), want)
    # every allowed element lies in a listed block; every 'full' block is allowed throughout
    blocks = bm.to_dense()[0, 0].bool()  # partial | full, [nq, nk]
    listed = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)[:t]
    assert not (want & ~listed).any()
    full = torch.zeros_like(blocks)
    n_full = bm.full_kv_num_blocks[0, 0]
    for i in range(blocks.shape[0]):
        full[i, bm.full_kv_indices[0, 0, i, :n_full[i]].long()] = True
    full_el = full.repeat_interleave(128, 0).repeat_interleave(128, 1)[:t]
    assert not (full_el & ~want).any()
    assert full.any() == (max(lengths) > 256)  # long documents do get full blocks (skip mask_mod)


def run(backend, doc, steps, seed=0, max_steps=None):
    g = torch.Generator().manual_seed(seed)
    t = doc.shape[1]
    attn = TTTAttention(doc, NH, NKV, HD, backend, max_steps=max_steps)
    outs = []
    for s in range(steps):
        q = torch.randn(doc.shape[0], NH, t, HD, generator=g)
        k, v = (torch.randn(doc.shape[0], NKV, t, HD, generator=g) for _ in range(2))
        outs.append(attn.attend(s)(0, q, k, v))
    return outs


@pytest.mark.parametrize("lengths, pad", [([100, 60, 37], 3), ([140], 0)])
def test_padded_flex_equals_naive(lengths, pad):
    doc = packed_doc(lengths, pad)
    with torch.no_grad():
        for a, r in zip(run("flex", doc, 3, max_steps=5), run("naive", doc, 3)):
            torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


def test_compiles_once_per_bucket_across_batches_and_steps(monkeypatch):
    """Forward through the TTT unroll with a counting torch.compile backend: varied packed batches and
    every TTT step reuse one graph per length bucket (dynamic=False would compile per shape)."""
    import torch._dynamo

    from core.model import DraftConfig, Eagle3Draft
    from core.model.ttt import ttt_forward_loss

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setitem(A.COMPILE_FLEX_ON, "cpu", counting)
    monkeypatch.setattr(A, "_compiled_flex", {})
    cfg = DraftConfig(vocab_size=61, draft_vocab_size=23, hidden_size=32, target_hidden_size=24,
                      intermediate_size=48, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=HD,
                      rms_norm_eps=1e-5, max_position_embeddings=512, rope_theta=10000.0,
                      target_num_hidden_layers=8, num_hidden_layers=1)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    g = torch.Generator().manual_seed(1)
    batches = [[60, 70], [100, 41, 42], [200, 90], [17, 90, 200], [255]]  # buckets 256 and 384
    losses = []
    with torch.no_grad():
        for lengths in batches:
            doc = packed_doc(lengths)
            t = doc.shape[1]
            batch = {"input_ids": torch.randint(0, 61, (1, t), generator=g),
                     "aux_hidden": torch.randn(1, t, 72, generator=g),
                     "target_probs": torch.softmax(torch.randn(1, t, 23, generator=g), -1),
                     "position_mask": torch.ones(1, t, dtype=torch.bool),
                     "loss_mask": torch.ones(1, t, dtype=torch.bool), "doc_ids": doc,
                     "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
            out = ttt_forward_loss(draft, batch, ttt_length=3, attention_backend="flex")
            ref = ttt_forward_loss(draft, batch, ttt_length=3, attention_backend="naive")
            torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
            losses.append(out.loss)
    calls = len(batches) * 3  # 15 flex calls (one layer, 3 steps) over 5 distinct lengths
    buckets = {bucket_length(sum(b)) for b in batches}
    assert buckets == {256, 384}
    assert len(graphs) == len(buckets) < calls
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_flex_on_cpu_equals_naive(monkeypatch):
    """The real inductor kernel (which, unlike eager flex, skips unlisted blocks) on CPU."""
    monkeypatch.setitem(A.COMPILE_FLEX_ON, "cpu", "inductor")
    monkeypatch.setattr(A, "_compiled_flex", {})
    doc = packed_doc([100, 200, 37], 5)
    with torch.no_grad():
        for a, r in zip(run("flex", doc, 3, max_steps=3), run("naive", doc, 3)):
            torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention backward needs CUDA")
def test_compiled_flex_gradients_on_cuda_equal_naive():  # pragma: no cover - runs on GPU machines
    doc = packed_doc([100, 200, 37], 5).cuda()

    def grads(backend):
        g = torch.Generator(device="cuda").manual_seed(0)
        t = doc.shape[1]
        mk = lambda n: torch.randn(1, n, t, HD, generator=g, device="cuda", requires_grad=True)
        qs, ks, vs = [mk(NH) for _ in range(3)], [mk(NKV) for _ in range(3)], [mk(NKV) for _ in range(3)]
        attn = TTTAttention(doc, NH, NKV, HD, backend, max_steps=4)
        outs = [attn.attend(s)(0, qs[s], ks[s], vs[s]) for s in range(3)]
        return outs + list(torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(outs)), qs + ks + vs))

    for a, r in zip(grads("flex"), grads("naive")):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-3)
