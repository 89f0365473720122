"""Chunked head + soft cross-entropy (core.model.loss): equal to the dense path in loss, gradients and
accuracy, for dense and top-k targets, and what it keeps for backward grows with k, not Vd."""

from __future__ import annotations

import pytest
import torch

from core.cache.quant import topk_compress, topk_expand
from core.model.loss import head_soft_ce_sum, target_argmax
from core.model.ttt import soft_cross_entropy_sum


def dense_reference(h, w, p):
    """The plain path: full logits, -sum p * log_softmax, autograd."""
    logits = h @ w.t()
    return -(p * torch.log_softmax(logits, -1)).sum(), logits.argmax(-1)


def sparse_case(n=37, hid=16, vd=50, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hid, generator=g, dtype=torch.float64)
    w = torch.randn(vd, hid, generator=g, dtype=torch.float64) * 0.5
    full = torch.softmax(torch.randn(n, vd, generator=g) * 3, -1)
    vals, ids = topk_compress(full, k)
    v = vals.double()
    probs = v / v.sum(-1, keepdim=True)  # what CacheReader.get(dense_targets=False) gives
    dense = torch.zeros(n, vd, dtype=torch.float64).scatter_(1, ids.long(), probs)
    torch.testing.assert_close(dense.float(), topk_expand(vals, ids, vd))  # the reader's dense row
    return h, w, dense, (ids.long(), probs)


@pytest.mark.parametrize("chunk", [None, 1, 5, 37])
@pytest.mark.parametrize("sparse", [True, False], ids=["topk", "dense"])
def test_loss_and_gradients_equal_the_dense_path(chunk, sparse):
    h, w, dense, topk = sparse_case()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref, ref_pred = dense_reference(h1, w1, dense)
    ours, pred = head_soft_ce_sum(h2, w2, topk if sparse else dense, chunk_rows=chunk)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(pred, ref_pred)
    (ref * 1.3).backward()
    (ours * 1.3).backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-10, atol=1e-10)


def test_unnormalised_and_empty_rows_keep_the_dense_math():
    h, w, dense, (ids, probs) = sparse_case(n=9)
    probs = probs * torch.linspace(0, 1.5, 9, dtype=torch.float64)[:, None]  # row 0 carries no mass
    dense = torch.zeros_like(dense).scatter_(1, ids, probs)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    ref, _ = dense_reference(h1, w, dense)
    ours, _ = head_soft_ce_sum(h2, w, (ids, probs), chunk_rows=4)
    torch.testing.assert_close(ours, ref)
    ref.backward()
    ours.backward()
    torch.testing.assert_close(h2.grad, h1.grad)


def test_target_argmax_breaks_ties_like_dense_argmax():
    ids = torch.tensor([[7, 3, 5], [2, 9, 4]])
    probs = torch.tensor([[0.4, 0.4, 0.2], [0.1, 0.2, 0.7]])
    dense = torch.zeros(2, 10).scatter_(1, ids, probs)
    assert target_argmax((ids, probs)).tolist() == dense.argmax(-1).tolist() == [3, 4]


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward, parameters excluded (they exist anyway)."""
    total = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_memory_kept_for_backward_grows_with_k_not_the_draft_vocab():
    n, hid, k = 64, 16, 8

    def kept(vd, kk, chunk=None):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, hid, generator=g, requires_grad=True)
        w = torch.nn.Parameter(torch.randn(vd, hid, generator=g))
        ids = torch.randint(0, vd, (n, kk), generator=g)
        return saved_bytes(lambda: head_soft_ce_sum(h, w, (ids, torch.rand(n, kk, generator=g)), chunk))

    small, big = kept(1000, k), kept(32000, k)
    assert small == big  # nothing of size N x Vd is saved
    assert kept(1000, 4 * k) > small  # it is the top-k target that grows
    # the dense path saves the [N, Vd] logits
    h = torch.randn(n, hid, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(32000, hid))
    dense = saved_bytes(lambda: dense_reference(h, w, torch.rand(n, 32000)))
    assert dense > 50 * big


def test_autocast_runs_the_matmuls_in_the_autocast_dtype():
    h, w, _, topk = sparse_case()
    h, w = h.float().requires_grad_(), w.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = head_soft_ce_sum(h, w, (topk[0], topk[1].float()))
        ref = soft_cross_entropy_sum(torch.nn.functional.linear(h, w), topk_expand(
            topk[1].half(), topk[0], w.shape[0]))
    assert ours.dtype == torch.float32
    ours.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32  # fp32 master weights
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=0.0)  # bf16 logits on both sides
    with torch.no_grad():
        exact, _ = head_soft_ce_sum(h, w, (topk[0], topk[1].float()))
    assert not torch.equal(ours.detach(), exact)  # the bf16 matmul did run


def test_float32_equals_the_previous_dense_step():
    """Same numbers as the step it replaces: dense logits into soft_cross_entropy_sum."""
    h, w, dense, (ids, probs) = sparse_case(n=50, vd=300, k=16)
    h1, w1 = h.float().requires_grad_(), w.float().requires_grad_()
    h2, w2 = h.float().requires_grad_(), w.float().requires_grad_()
    ref = soft_cross_entropy_sum(torch.nn.functional.linear(h1, w1), dense.float())
    ours, _ = head_soft_ce_sum(h2, w2, (ids, probs.float()), chunk_rows=16)
    torch.testing.assert_close(ours, ref)
    ref.backward()
    ours.backward()
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)
