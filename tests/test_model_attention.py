"""TTT attention backends agree with the naive full-mask reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from core.errors import UsageError
from core.model.attention import TTTAttention, causal_doc_mask, resolve_backend

B, NH, NKV, T, HD = 2, 4, 2, 23, 8
# row 0: three packed documents then padding; row 1: one document, no padding
DOC = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4 + [-1] * 3, [0] * T])


def run_backend(backend, doc, steps, seed=0, grad=True, **kw):
    g = torch.Generator().manual_seed(seed)
    qs = [torch.randn(B, NH, T, HD, generator=g, requires_grad=grad) for _ in range(steps)]
    ks = [torch.randn(B, NKV, T, HD, generator=g, requires_grad=grad) for _ in range(steps)]
    vs = [torch.randn(B, NKV, T, HD, generator=g, requires_grad=grad) for _ in range(steps)]
    attn = TTTAttention(doc, NH, NKV, HD, backend, **kw)
    outs = [attn.attend(s)(0, qs[s], ks[s], vs[s]) for s in range(steps)]
    if not grad:
        return outs, None
    w = torch.randn(T, HD, generator=torch.Generator().manual_seed(99))
    loss = sum(((o * w).sum() * (s + 1)) for s, o in enumerate(outs))
    grads = torch.autograd.grad(loss, qs + ks + vs)
    return outs, grads


@pytest.mark.parametrize("doc", [DOC, torch.zeros(B, T, dtype=torch.long),
                                 torch.tensor([[0] * 20 + [-1] * 3, [0] * T])],
                         ids=["packed", "single-doc", "single-doc-padded"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_backends_equal_naive_outputs_and_grads(backend, doc):
    ref_out, ref_grads = run_backend("naive", doc, steps=4)
    out, grads = run_backend(backend, doc, steps=4)
    for a, r in zip(out, ref_out):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


MANY = torch.tensor([[0] * 3 + [1] * 5 + [2] * 2 + [3] * 6 + [4] * 4 + [5] * 3,
                     [6] * 5 + [7] * 4 + [8] * 6 + [9] * 3 + [10] * 5])


@pytest.mark.parametrize("doc", [DOC, MANY], ids=["packed", "many-short-docs"])
@pytest.mark.parametrize("regroup", [True, False])
def test_sdpa_document_regrouping_equals_naive(doc, regroup):
    ref_out, ref_grads = run_backend("naive", doc, steps=3)
    out, grads = run_backend("sdpa", doc, steps=3, regroup=regroup)
    for a, r in zip(list(out) + list(grads), list(ref_out) + list(ref_grads)):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


def test_regrouping_chosen_when_it_cuts_work():
    assert TTTAttention(MANY, NH, NKV, HD, "sdpa").layout is not None  # 11 docs, longest 6
    assert TTTAttention(DOC, NH, NKV, HD, "sdpa").layout is None  # a 23-token document dominates
    lay = TTTAttention(MANY, NH, NKV, HD, "sdpa").layout
    x = torch.randn(B, 3, T, 5)
    assert torch.equal(lay.back(lay.to(x)), x)
    assert (lay.num_docs, lay.max_len) == (11, 6)


def test_sdpa_uses_plain_causal_only_for_single_document_rows():
    assert TTTAttention(torch.zeros(2, 5, dtype=torch.long), 2, 1, 4, "sdpa").plain_causal
    assert TTTAttention(torch.tensor([[0, 0, 0, -1, -1]]), 2, 1, 4, "sdpa").plain_causal
    assert not TTTAttention(torch.tensor([[0, 0, 1, 1, 1]]), 2, 1, 4, "sdpa").plain_causal
    assert not TTTAttention(torch.tensor([[-1, 0, 0, 0, 0]]), 2, 1, 4, "sdpa").plain_causal


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_on_cpu_equals_naive():
    pytest.importorskip("torch.nn.attention.flex_attention")
    ref_out, _ = run_backend("naive", DOC, steps=3, grad=False)
    out, _ = run_backend("flex", DOC, steps=3, grad=False)
    for a, r in zip(out, ref_out):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention backward needs CUDA "
                    "(torch 2.13 raises 'FlexAttention does not support backward on CPU')")
def test_flex_gradients_on_cuda_equal_naive():  # pragma: no cover - runs on GPU machines
    doc = DOC.cuda()

    def run(backend):
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda n: torch.randn(B, n, T, HD, generator=g, device="cuda", requires_grad=True)  # noqa: E731
        qs, ks, vs = [mk(NH) for _ in range(3)], [mk(NKV) for _ in range(3)], [mk(NKV) for _ in range(3)]
        attn = TTTAttention(doc, NH, NKV, HD, backend)
        outs = [attn.attend(s)(0, qs[s], ks[s], vs[s]) for s in range(3)]
        return outs, torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(outs)), qs + ks + vs)

    out, grads = run("flex")
    ref_out, ref_grads = run("naive")
    for a, r in zip(list(out) + list(grads), list(ref_out) + list(ref_grads)):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-3)


def test_causal_doc_mask_blocks_cross_document_attention():
    m = causal_doc_mask(DOC)
    assert m[0, 7, 6].item() is False and m[0, 7, 7].item() is True and m[0, 15, 7].item() is True
    assert m[0, 16, 15].item() is False and m[1, 22, 0].item() is True
    assert not m[0].triu(1).any()


def test_trailing_padding_joins_its_document():
    from core.model.attention import attach_trailing_padding

    doc = torch.tensor([[0, 0, 1, 1, -1, -1], [-1, 2, 2, -1, 3, -1]])
    assert attach_trailing_padding(doc).tolist() == [[0, 0, 1, 1, 1, 1], [-1, 2, 2, 2, 3, 3]]


def test_resolve_backend():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("sdpa", torch.device("cuda")) == "eager"
    with pytest.raises(UsageError, match="attention backend"):
        resolve_backend("magic", torch.device("cpu"))
