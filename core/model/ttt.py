"""Training-time test (TTT): the unrolled draft forward, its loss and its metrics.

Batch contract (what `ttt_forward_loss` takes: UNSHIFTED per-position tensors, exactly as the
feature extractor / cache reader give them, several documents possibly packed per row):

  input_ids      int64 [B, T]        token x(t)
  aux_hidden     float [B, T, 3*Ht]  target aux states at t (they have seen x<=t)
  target_probs   float [B, T, Vd]    the target's distribution for x(t+1), restricted to the draft vocab,
                                     or, instead, its top k as two fields (p zero off the k ids):
  target_topk_ids   int64 [B, T, k]  draft ids
  target_topk_probs float [B, T, k]  their probabilities (the loss never expands them to Vd)
  position_mask  bool  [B, T]        the target's full-vocab argmax at t lies inside the draft vocab
  loss_mask      int/bool [B, T]     1 on supervised (assistant) tokens x(t)
  position_ids   int64 [B, T]        position inside its document (restarts at 0 per packed document)
  doc_ids        int64 [B, T]        optional: document label per position, < 0 = padding. When absent,
                                     a document starts wherever position_ids == 0, and
                                     `attention_mask` (optional, 0 = padding) marks padding.

Alignment (reference section 4, as SpecForge does it, applied per document). At TTT step k
(k = 0..L-1) the draft at index t of a document of length n:
  * takes the embedding of x(t+1+k) (ground truth shifted by 1+k) and, for k = 0, fc(aux[t]);
    for k > 0 the un-normed output of step k-1 at the same index t;
  * runs at RoPE position position_ids[t] + k (the sequence position it stands for when drafting);
  * learns target_probs[t+1+k] (the distribution for x(t+2+k)) where
    loss_mask[t+1+k] and position_mask[t+1+k] and t+1+k < n.
Past the end of a document (t+1+k >= n) the input is padding (token 0) and every mask is zero;
those positions are only ever seen by themselves (diagonal), never by a real query.

Loss per step: soft cross-entropy sum(-p * log_softmax(z)) averaged over that step's supervised
positions; total = sum_k decay**k * loss_k (decay 0.8 as EAGLE/SpecForge; 1.0 allowed).
Accuracy per step: acc_k = #(supervised positions where argmax z == argmax p) / #(positions
with loss_mask[t+1+k] = 1 inside the document). Positions whose target argmax lies outside the
draft vocab count as misses (the draft cannot propose that token), as in SpecForge.
tau_sim = 1 + sum_k prod_{j<=k} acc_j (the +1 is the bonus token engines count).

Only supervised rows reach the norm + lm_head (draft vocab Vd): no full-vocab tensor and no
logits for unsupervised positions are ever built, and the head + loss run in row chunks that keep
no [N, Vd] logits for backward (core.model.loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.errors import UsageError
from core.model.attention import TTTAttention, resolve_backend
from core.model.loss import head_soft_ce_sum, target_argmax

REQUIRED_KEYS = ("input_ids", "aux_hidden", "position_mask", "loss_mask", "position_ids")
TOPK_KEYS = ("target_topk_ids", "target_topk_probs")


@dataclass
class TTTOutput:
    loss: torch.Tensor  # scalar, differentiable: sum_k decay**k * loss_k
    per_step_loss: list[float]
    per_step_acc: list[float]
    tau_sim: float
    num_tokens: int  # real (non-padding) positions in the batch
    # raw sums, to aggregate exactly over micro-batches / ranks / a validation split
    per_step_loss_sum: list[float] = field(default_factory=list)
    per_step_count: list[int] = field(default_factory=list)  # supervised positions (loss denominators)
    per_step_correct: list[int] = field(default_factory=list)
    per_step_acc_total: list[int] = field(default_factory=list)  # accuracy denominators
    backend: str = ""

    def metrics(self) -> dict[str, float]:
        out = {"loss": float(self.loss.detach()), "tau_sim": self.tau_sim, "tokens": self.num_tokens}
        for k, (lo, acc) in enumerate(zip(self.per_step_loss, self.per_step_acc)):
            out[f"loss_{k}"], out[f"acc_{k}"] = lo, acc
        return out


def tau_from_acc(accs: list[float]) -> float:
    """Simulated accept length 1 + sum_k prod_{j<=k} acc_j."""
    tau, run = 1.0, 1.0
    for a in accs:
        run *= a
        tau += run
    return tau


def aggregate(outputs: list[TTTOutput], decay: float = 0.8) -> dict[str, float]:
    """Exact metrics over several batches (e.g. a validation split) from their raw sums."""
    if not outputs:
        return {}
    steps = len(outputs[0].per_step_count)
    loss_sum = [sum(o.per_step_loss_sum[k] for o in outputs) for k in range(steps)]
    count = [sum(o.per_step_count[k] for o in outputs) for k in range(steps)]
    correct = [sum(o.per_step_correct[k] for o in outputs) for k in range(steps)]
    total = [sum(o.per_step_acc_total[k] for o in outputs) for k in range(steps)]
    losses = [s / max(c, 1) for s, c in zip(loss_sum, count)]
    accs = [c / t if t else 0.0 for c, t in zip(correct, total)]
    out = {"loss": sum(decay ** k * lo for k, lo in enumerate(losses)), "tau_sim": tau_from_acc(accs),
           "tokens": sum(o.num_tokens for o in outputs)}
    for k in range(steps):
        out[f"loss_{k}"], out[f"acc_{k}"] = losses[k], accs[k]
    return out


def doc_ids_from_batch(batch: dict) -> torch.Tensor:
    """Document labels [B, T] (< 0 = padding), given or derived from position_ids restarts."""
    if batch.get("doc_ids") is not None:
        return batch["doc_ids"].long()
    pos = batch["position_ids"]
    doc = (pos == 0).long().cumsum(1) - 1
    mask = batch.get("attention_mask")
    if mask is not None:
        doc = torch.where(mask.bool(), doc, torch.full_like(doc, -1))
    return doc


def _check_batch(batch: dict) -> tuple[int, int]:
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise UsageError(f"TTT batch lacks {', '.join(missing)}")
    if "target_probs" not in batch and not all(k in batch for k in TOPK_KEYS):
        raise UsageError(f"TTT batch lacks target_probs (or {' + '.join(TOPK_KEYS)})")
    b, t = batch["input_ids"].shape
    for k in REQUIRED_KEYS + ("target_probs", *TOPK_KEYS, "doc_ids", "attention_mask"):
        v = batch.get(k)
        if v is not None and tuple(v.shape[:2]) != (b, t):
            raise UsageError(f"TTT batch field {k} has shape {tuple(v.shape)}, expected [{b}, {t}, ...]")
    return b, t


def _shift(x: torch.Tensor, n: int, fill=0) -> torch.Tensor:
    """x[:, t + n] at index t, `fill` past the end (dim 1)."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill)
    return torch.cat((x[:, n:], pad), dim=1)


class _SoftCrossEntropySum(torch.autograd.Function):
    """sum_rows( logsumexp(z) * sum(p) - p.z ), gradient (softmax(z) * sum(p) - p) computed in one
    buffer: no log-softmax tensor is kept, only the logits and one log-sum-exp per row."""

    @staticmethod
    def forward(ctx, logits, probs):
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        mass = probs.sum(-1, keepdim=True)
        ctx.save_for_backward(logits, probs, lse, mass)
        return (lse * mass).sum() - (probs * logits).sum()

    @staticmethod
    def backward(ctx, grad):
        logits, probs, lse, mass = ctx.saved_tensors
        g = (logits - lse).exp_().mul_(mass).sub_(probs).mul_(grad)
        return g, None


def _scatter_rows(x: torch.Tensor, rows: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """[1, h, N, d] values of flat rows -> [b, h, t, d], zeros elsewhere."""
    h, d = x.shape[1], x.shape[3]
    full = x.new_zeros(b * t, h, d).index_copy(0, rows, x[0].transpose(0, 1))
    return full.view(b, t, h, d).transpose(1, 2)


def _compact_attend(inner, rows: torch.Tensor, b: int, t: int):
    """Run a [B, *, T, d] attention for compact rows: scatter in, attend, gather the rows back.
    Rows not computed hold zeros; their outputs are dropped and they are keys only of themselves."""
    def fn(layer, q, k, v):
        out = inner(layer, _scatter_rows(q, rows, b, t), _scatter_rows(k, rows, b, t),
                    _scatter_rows(v, rows, b, t))
        h, d = out.shape[1], out.shape[3]
        return out.transpose(1, 2).reshape(b * t, h, d)[rows].transpose(0, 1).unsqueeze(0)
    return fn


def soft_cross_entropy_sum(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """sum over rows of -sum_v p_v log_softmax(z)_v, in float32 (probs treated as constants)."""
    return _SoftCrossEntropySum.apply(logits.float(), probs.float().detach())


def _flat_targets(batch: dict, rows: int, vd: int) -> tuple[torch.Tensor, ...]:
    """(dense [rows, Vd],) or (ids [rows, k], probs [rows, k]), checked against the draft vocab."""
    if "target_probs" in batch:
        p = batch["target_probs"]
        if p.shape[-1] != vd:
            raise UsageError(f"target_probs cover {p.shape[-1]} ids, the draft vocab has {vd}")
        return (p.reshape(rows, vd),)
    ids, probs = (batch[k] for k in TOPK_KEYS)
    if ids.shape != probs.shape:
        raise UsageError(f"target_topk_ids {tuple(ids.shape)} and target_topk_probs {tuple(probs.shape)} differ")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vd):
        raise UsageError(f"target_topk_ids outside the draft vocab [0, {vd})")
    k = ids.shape[-1]
    return ids.reshape(rows, k), probs.reshape(rows, k)


def ttt_forward_loss(draft, batch: dict, ttt_length: int = 7, decay: float = 0.8,
                     attention_backend: str = "auto", skip_unsupervised: bool = True) -> TTTOutput:
    """Unrolled TTT forward over a packed batch (contract and alignment in the module docstring).

    skip_unsupervised: at steps >= 1 run the layer only on rows that this or a later step
    supervises (exact: the other rows influence nothing that is scored).
    """
    if ttt_length < 1:
        raise UsageError(f"ttt_length must be >= 1, got {ttt_length}")
    if not 0.0 < decay <= 1.0:
        raise UsageError(f"loss decay must be in (0, 1], got {decay}")
    b, t = _check_batch(batch)
    cfg = draft.config
    targets = _flat_targets(batch, b * t, cfg.draft_vocab_size)
    device = draft.fc.weight.device
    input_ids = batch["input_ids"].to(device)
    doc = doc_ids_from_batch(batch).to(device)
    real = doc >= 0
    loss_mask = batch["loss_mask"].to(device).bool() & real
    position_mask = batch["position_mask"].to(device).bool()
    position_ids = batch["position_ids"].to(device).long()
    targets = tuple(x.to(device) for x in targets)

    backend = resolve_backend(attention_backend, device)
    # CPU: the head's gradients made in its forward pass (no logits recompute) where that keeps no
    # more than a chunk of logits; CUDA keeps the recompute (memory first, matmuls are cheap there)
    head_grads = "auto" if device.type == "cpu" else False
    attn = TTTAttention(doc, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, backend,
                        max_steps=ttt_length)
    flat_index = torch.arange(b * t, device=device).view(b, t)

    # Masks of every step up front. Step k >= 1 computes only the rows that step k or a later step
    # supervises: its other rows feed nothing (their keys are seen only by themselves, diagonally).
    valid, scored, supervised = [], [], []
    for k in range(ttt_length):
        n = 1 + k
        valid.append(real & (_shift(doc, n, -2) == doc))  # x(t+1+k) exists in the same document
        scored.append(valid[k] & _shift(loss_mask, n, False))
        supervised.append(scored[k] & _shift(position_mask, n, False))
    live, later = [], torch.zeros_like(real)
    for k in reversed(range(ttt_length)):
        later = later | supervised[k]
        live.insert(0, later)
    compact = skip_unsupervised and bool(live[min(1, ttt_length - 1)].sum() < 0.9 * b * t)

    hidden = draft.project_aux(batch["aux_hidden"].to(device))
    out_flat, rows_prev = None, None  # previous step's output and its rows (None: all rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    losses, accs, loss_sums, counts, corrects, acc_totals = [], [], [], [], [], []
    for k in range(ttt_length):
        n = 1 + k
        ids = torch.where(valid[k], _shift(input_ids, n), torch.zeros_like(input_ids))
        if k == 0 or not compact:
            hidden = draft.run_layers(ids, hidden, position_ids + k, attn.attend(k))
            out_flat, rows_k = hidden.reshape(b * t, -1), None
        else:
            rows_k = flat_index[live[k]]
            if rows_k.numel():
                prev = rows_k if rows_prev is None else torch.searchsorted(rows_prev, rows_k)
                h_in = out_flat[prev][None]
                pos = (position_ids + k).reshape(-1)[rows_k][None]
                out = draft.run_layers(ids.reshape(-1)[rows_k][None], h_in, pos,
                                       _compact_attend(attn.attend(k), rows_k, b, t))
                out_flat = out[0]
            else:
                rows_k = rows_prev  # nothing left to supervise: keep the last output for the zero loss
        rows_prev = rows_k

        sup_rows = flat_index[supervised[k]]
        count = int(sup_rows.numel())
        if count:
            local = sup_rows if rows_k is None else torch.searchsorted(rows_k, sup_rows)
            target = tuple(x.index_select(0, sup_rows + n) for x in targets)  # row copies, not x[idx]
            target = target[0] if len(target) == 1 else target
            loss_sum, pred = head_soft_ce_sum(draft.norm(out_flat[local]), draft.lm_head.weight, target,
                                              grads_in_forward=head_grads)
            with torch.no_grad():
                correct = int((pred == target_argmax(target)).sum())
        else:
            # zero that still touches every parameter (DDP expects each one to get a gradient)
            loss_sum = draft.compute_logits(out_flat[:1]).float().sum() * 0.0
            correct = 0
        step_loss = loss_sum / max(count, 1)
        total = total + (decay ** k) * step_loss
        acc_total = int(scored[k].sum())
        losses.append(float(step_loss.detach()))
        loss_sums.append(float(loss_sum.detach()))
        counts.append(count)
        corrects.append(correct)
        acc_totals.append(acc_total)
        accs.append(correct / acc_total if acc_total else 0.0)
    return TTTOutput(loss=total, per_step_loss=losses, per_step_acc=accs, tau_sim=tau_from_acc(accs),
                     num_tokens=int(real.sum()), per_step_loss_sum=loss_sums, per_step_count=counts,
                     per_step_correct=corrects, per_step_acc_total=acc_totals, backend=backend)
