"""The head loss with its gradients made in the forward pass (core.model.loss, CPU's default in
TTT): equal to the dense path and to the recompute mode in loss, gradients and predictions, and
what it keeps for backward is [N, H] + [Vd, H], never N x Vd."""

from __future__ import annotations

import pytest
import torch

from core.model.loss import head_soft_ce_sum, use_grads_in_forward
from tests.test_loss import dense_reference, saved_bytes, sparse_case


@pytest.mark.parametrize("chunk", [None, 1, 5, 37])
@pytest.mark.parametrize("sparse", [True, False], ids=["topk", "dense"])
def test_equal_to_the_dense_path_and_the_recompute_mode(chunk, sparse):
    h, w, dense, topk = sparse_case()
    target = topk if sparse else dense
    runs = []
    for mode in ("reference", False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if mode == "reference":
            loss, pred = dense_reference(hh, ww, dense)
        else:
            loss, pred = head_soft_ce_sum(hh, ww, target, chunk_rows=chunk, grads_in_forward=mode)
        (loss * 1.3).backward()
        runs.append((loss.detach(), pred, hh.grad, ww.grad))
    ref = runs[0]
    for got in runs[1:]:
        torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
        assert torch.equal(got[1], ref[1])
        torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[3], ref[3], rtol=1e-10, atol=1e-10)


def test_frozen_weight_no_grad_mode_and_float32():
    h, w, dense, topk = sparse_case(n=20, vd=40)
    h, w = h.float(), w.float()
    probs = (topk[0], topk[1].float())
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    a, _ = head_soft_ce_sum(h1, w, probs, chunk_rows=6)  # weight frozen: only d/dh
    b, _ = head_soft_ce_sum(h2, w, probs, chunk_rows=6, grads_in_forward=True)
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(h2.grad, h1.grad)
    with torch.no_grad():  # validation: nothing to differentiate, the plain loss
        c, _ = head_soft_ce_sum(h, w, probs, grads_in_forward=True)
    torch.testing.assert_close(c, a.detach())


def test_keeps_weight_sized_gradients_not_n_by_vd():
    n, hid, k = 64, 16, 8

    def kept(vd):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, hid, generator=g, requires_grad=True)
        w = torch.nn.Parameter(torch.randn(vd, hid, generator=g))
        ids = torch.randint(0, vd, (n, k), generator=g)
        return saved_bytes(lambda: head_soft_ce_sum(h, w, (ids, torch.rand(n, k, generator=g)),
                                                    grads_in_forward=True))

    for vd in (1000, 32000):
        assert kept(vd) == (n + vd) * hid * 4  # d/dh [N, H] and d/dW [Vd, H], float32
    assert kept(32000) < n * 32000 * 4 / 3


def test_auto_rule():
    # bench/train.py's CPU step (about 1.5k supervised rows, Vd 8192, H 576): gradients in forward
    assert use_grads_in_forward(1500, 8192, 576, chunk=4096)
    # a Llama-3.1-8B-shaped step (8k rows, Vd 32000, H 4096): recompute (keeps far less)
    assert not use_grads_in_forward(8192, 32000, 4096, chunk=1048)
    # "auto" gives the same numbers either way
    h, w, dense, _ = sparse_case(n=12, vd=30)
    outs = []
    for mode in ("auto", False):
        hh = h.clone().requires_grad_()
        loss, _ = head_soft_ce_sum(hh, w, dense, grads_in_forward=mode)
        loss.backward()
        outs.append(hh.grad)
    torch.testing.assert_close(outs[0], outs[1])
