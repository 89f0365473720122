"""The draft head and its soft cross-entropy in one chunked pass: no [N, Vd] tensor is kept.

`head_soft_ce_sum(h, weight, target)` = sum over rows of -sum_v p_v * log_softmax(h @ weight.T)_v,
with the target either dense `p` [N, Vd] or sparse top-k `(ids [N, k], probs [N, k])` (p zero
off the k ids, as the cache reader's renormalised top-k rows are). Per row that is
mass * lse(z) - sum_v p_v z_v, mass = sum_v p_v; its gradient in z is softmax(z) * mass - p.

Forward and backward walk the rows in chunks of about CHUNK_ELEMS logits and recompute each
chunk's logits in backward, so what is saved is h, the target and one log-sum-exp per row:
memory grows with the rows and k, never with rows x Vd (at Vd 32000 an 8k-row step would keep
about 1 GB of fp32 logits per TTT step otherwise).

Under autocast (bf16 on CUDA) the two matmuls run in the autocast dtype, exactly where the plain
`F.linear` would; log-sum-exp, loss and the gradient in z stay float32, the weight's gradient is
accumulated in float32 (the master weights' dtype).

Gradients in forward (`grads_in_forward`): the loss is a scalar at the end of the graph, so its
gradients in h and in the weight are the incoming scalar times fixed tensors. This mode computes
those in the forward chunk loop, from the logits it already has (no recompute, one exp pass), and
keeps them instead of h: backward only scales them. Same math; saved for backward: [N, H] + [Vd, H]
(the weight's size), still nothing of size N x Vd. It pays where matmuls are the cost (CPU: one
of four head matmuls and about five passes over the logits less); "auto" takes it when what it keeps
is no more than the one chunk of logits the recompute would allocate in backward anyway.
"""

from __future__ import annotations

import torch

CHUNK_ELEMS = 1 << 25  # logits per chunk: 128 MB in float32


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def target_argmax(target) -> torch.Tensor:
    """Draft id of each row's most probable target token (lowest id among ties, as argmax)."""
    if isinstance(target, torch.Tensor):
        return target.argmax(-1)
    ids, probs = target
    top = probs.max(-1, keepdim=True).values
    big = torch.iinfo(torch.long).max
    return torch.where(probs == top, ids.long(), torch.full_like(ids, big, dtype=torch.long)).min(-1).values


def _dot_target(z: torch.Tensor, target, a: int, b: int) -> torch.Tensor:
    """sum_v p_v z_v per row of chunk [a, b)."""
    if isinstance(target, torch.Tensor):  # row-wise dot products as one batched matmul: no [n, Vd] temporary
        return torch.bmm(z.unsqueeze(1), target[a:b].to(z.dtype).unsqueeze(2)).view(-1)
    ids, probs = target
    return (z.gather(1, ids[a:b].long()) * probs[a:b].to(z.dtype)).sum(-1)


def _sub_target(g: torch.Tensor, target, a: int, b: int) -> torch.Tensor:
    if isinstance(target, torch.Tensor):
        return g.sub_(target[a:b].to(g.dtype))
    ids, probs = target
    return g.scatter_add_(1, ids[a:b].long(), -probs[a:b].to(g.dtype))


def _mass(target, dtype: torch.dtype) -> torch.Tensor:
    p = target if isinstance(target, torch.Tensor) else target[1]
    return p.to(dtype).sum(-1)


class _HeadSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, chunk, dense, ids, probs):
        target = dense if dense is not None else (ids, probs)
        dt = _mm_dtype(h)
        acc = torch.promote_types(dt, torch.float32)  # float32, or float64 for float64 inputs
        dev = h.device.type
        n = h.shape[0]
        lse = torch.empty(n, dtype=acc, device=h.device)
        dot = torch.empty(n, dtype=acc, device=h.device)
        pred = torch.empty(n, dtype=torch.long, device=h.device)
        with torch.autocast(dev, enabled=False):
            w = weight.to(dt)
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                zc = h[a:b].to(dt) @ w.t()
                pred[a:b] = zc.argmax(-1)
                z = zc.to(acc)
                lse[a:b] = torch.logsumexp(z, -1)
                dot[a:b] = _dot_target(z, target, a, b)
        mass = _mass(target, acc)
        ctx.save_for_backward(h, weight, lse, mass, dense, ids, probs)
        ctx.chunk, ctx.dt, ctx.acc = chunk, dt, acc
        ctx.mark_non_differentiable(pred)
        return (lse * mass - dot).sum(), pred

    @staticmethod
    def backward(ctx, grad, _grad_pred):
        h, weight, lse, mass, dense, ids, probs = ctx.saved_tensors
        target = dense if dense is not None else (ids, probs)
        dt, acc, chunk, dev = ctx.dt, ctx.acc, ctx.chunk, h.device.type
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        with torch.autocast(dev, enabled=False):
            w = weight.to(dt)
            for a in range(0, h.shape[0], chunk):
                b = min(h.shape[0], a + chunk)
                hc = h[a:b].to(dt)
                z = (hc @ w.t()).to(acc)
                g = z.sub_(lse[a:b, None]).exp_().mul_(mass[a:b, None])
                g = _sub_target(g, target, a, b).mul_(grad).to(dt)
                if need_h:
                    gh[a:b] = (g @ w).to(h.dtype)
                if need_w:
                    gw.add_(g.t() @ hc)  # float32 accumulation over chunks
        return gh, (gw.to(weight.dtype) if need_w else None), None, None, None, None


class _HeadSoftCEGradsInForward(torch.autograd.Function):
    """The same loss; d loss / d h and d loss / d weight (for an incoming gradient of 1) are made
    in the forward chunk loop and kept; backward scales them by the incoming scalar."""

    @staticmethod
    def forward(ctx, h, weight, chunk, dense, ids, probs):
        target = dense if dense is not None else (ids, probs)
        dt = _mm_dtype(h)
        acc = torch.promote_types(dt, torch.float32)
        dev = h.device.type
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        mass = _mass(target, acc)
        loss = torch.zeros((), dtype=acc, device=h.device)
        pred = torch.empty(n, dtype=torch.long, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        with torch.autocast(dev, enabled=False):
            w = weight.to(dt)
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                hc = h[a:b].to(dt)
                z = (hc @ w.t()).to(acc)
                top, pred[a:b] = z.max(-1)  # the first maximum, as argmax
                dot = _dot_target(z, target, a, b)
                e = z.sub_(top[:, None]).exp_()  # z is consumed: exp(z - max)
                s = e.sum(-1)
                lse = top + s.log()
                loss += (lse * mass[a:b] - dot).sum()
                # softmax(z) * mass - p, the gradient in z of this chunk's loss
                g = _sub_target(e.mul_((mass[a:b] / s)[:, None]), target, a, b).to(dt)
                if need_h:
                    gh[a:b] = (g @ w).to(h.dtype)
                if need_w:
                    gw.add_(g.t() @ hc)  # float32 accumulation over chunks
        ctx.save_for_backward(gh, gw)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.mark_non_differentiable(pred)
        return loss, pred

    @staticmethod
    def backward(ctx, grad, _grad_pred):
        gh, gw = ctx.saved_tensors
        gh = None if gh is None else (gh * grad).to(ctx.h_dtype)
        gw = None if gw is None else (gw * grad).to(ctx.w_dtype)
        return gh, gw, None, None, None, None


def use_grads_in_forward(rows: int, vd: int, hidden: int, chunk: int) -> bool:
    """The "auto" rule: what it keeps ([Vd, H] + [N, H]) is at most one chunk of logits."""
    return (vd + rows) * hidden <= min(rows, chunk) * vd


def head_soft_ce_sum(h: torch.Tensor, weight: torch.Tensor, target,
                     chunk_rows: int | None = None,
                     grads_in_forward: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, predicted draft id per row) of rows h [N, H] through `weight` [Vd, H].

    target: dense probabilities [N, Vd] or (ids [N, k], probs [N, k]); treated as constants.
    grads_in_forward: False (recompute the logits in backward), True, or "auto" (see the module
    docstring); only when a gradient will be asked for (grad mode on, h or weight requiring it).
    """
    chunk = chunk_rows or max(1, CHUNK_ELEMS // weight.shape[0])
    if grads_in_forward == "auto":
        grads_in_forward = use_grads_in_forward(h.shape[0], weight.shape[0], weight.shape[1], chunk)
    if grads_in_forward and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        dense, ids, probs = ((target.detach(), None, None) if isinstance(target, torch.Tensor)
                             else (None, target[0].detach(), target[1].detach()))
        return _HeadSoftCEGradsInForward.apply(h, weight, chunk, dense, ids, probs)
    if isinstance(target, torch.Tensor):
        return _HeadSoftCE.apply(h, weight, chunk, target.detach(), None, None)
    ids, probs = target
    return _HeadSoftCE.apply(h, weight, chunk, None, ids.detach(), probs.detach())
