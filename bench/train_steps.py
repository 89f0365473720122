"""The two training steps bench/train.py times, written out: the plain step as the anchors write it
(each document padded to the batch's longest, full-vocabulary target logits, an explicit mask over
the keys of every TTT step) and our batch of documents packed into rows. tests/test_model_ttt.py
checks that core.model.ttt computes the plain step's loss on the packed batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.model import Eagle3Draft
from core.model.attention import repeat_kv


# ---- the plain step, as the anchors write it ---------------------------------------------------
def _shift_left(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x[:, 1:], torch.zeros_like(x[:, :1])), dim=1)


def baseline_ttt_loss(draft: Eagle3Draft, docs: list[dict], t2d: torch.Tensor, ttt_length: int,
                      decay: float = 0.8):
    """docs: dicts with input_ids [n], aux_hidden [n,3Ht], target_logits [n,V] (full vocab), loss_mask [n].

    Returns (loss, per_step_loss, per_step_acc)."""
    cfg = draft.config
    B, T = len(docs), max(int(d["input_ids"].numel()) for d in docs)
    ids = torch.zeros(B, T, dtype=torch.long)
    aux = torch.zeros(B, T, docs[0]["aux_hidden"].shape[-1])
    target = torch.zeros(B, T, docs[0]["target_logits"].shape[-1])
    loss_mask = torch.zeros(B, T)
    attn_mask = torch.zeros(B, T, dtype=torch.bool)
    for r, d in enumerate(docs):
        n = int(d["input_ids"].numel())
        ids[r, :n], aux[r, :n], target[r, :n] = d["input_ids"], d["aux_hidden"], d["target_logits"]
        loss_mask[r, :n], attn_mask[r, :n] = d["loss_mask"].float(), True
    # shift: input ids, target logits and loss mask move left by one; aux is not shifted
    ids, target, loss_mask = _shift_left(ids), _shift_left(target), _shift_left(loss_mask)
    hidden = draft.project_aux(aux)
    positions = torch.arange(T).expand(B, T)
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    scale = 1.0 / math.sqrt(cfg.head_dim)
    cache_k: dict[int, list] = {}
    cache_v: dict[int, list] = {}
    causal = torch.ones(T, T, dtype=torch.bool).tril() & attn_mask[:, None, None, :]  # [B,1,T,T]

    def attend(layer, q, k, v):
        cache_k.setdefault(layer, []).append(k)
        cache_v.setdefault(layer, []).append(v)
        steps = len(cache_k[layer])
        mask = torch.zeros(B, 1, T, T * steps, dtype=torch.bool)
        mask[..., :T] = causal
        for j in range(1, steps):
            mask[..., j * T:(j + 1) * T] = torch.eye(T, dtype=torch.bool)
        keys = repeat_kv(torch.cat(cache_k[layer], dim=2), groups)
        values = repeat_kv(torch.cat(cache_v[layer], dim=2), groups)
        scores = (q @ keys.transpose(-1, -2)) * scale
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values

    total, losses, accs = 0.0, [], []
    for k in range(ttt_length):
        hidden = draft.run_layers(ids, hidden, positions + k, attend)
        with torch.no_grad():
            position_mask = t2d[target.argmax(-1)] & loss_mask.bool()
            target_p = torch.softmax(target[..., t2d].float(), dim=-1)
        logits = draft.compute_logits(hidden).float()
        logp = F.log_softmax(logits, dim=-1)
        step_loss = -(position_mask[..., None] * target_p * logp).sum() / position_mask.sum().clamp(min=1)
        with torch.no_grad():
            correct = ((logits.argmax(-1) == target_p.argmax(-1)) & position_mask).sum()
            accs.append(float(correct / loss_mask.sum().clamp(min=1)))
        losses.append(float(step_loss.detach()))
        total = total + decay ** k * step_loss
        ids, target, loss_mask = _shift_left(ids), _shift_left(target), _shift_left(loss_mask)
    return total, losses, accs


# ---- our batch: documents packed into rows ----------------------------------------------------
def pack_docs(docs: list[dict], row_tokens: int) -> dict:
    """First-fit-decreasing packing into rows of row_tokens (documents longer are cut)."""
    order = sorted(range(len(docs)), key=lambda i: -int(docs[i]["input_ids"].numel()))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = min(int(docs[i]["input_ids"].numel()), row_tokens)
        for r in range(len(rows)):
            if used[r] + n <= row_tokens:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    B, T = len(rows), max(used)
    d0 = docs[0]
    out = {"input_ids": torch.zeros(B, T, dtype=torch.long),
           "aux_hidden": torch.zeros(B, T, d0["aux_hidden"].shape[-1]),
           "target_probs": torch.zeros(B, T, d0["target_probs"].shape[-1]),
           "position_mask": torch.zeros(B, T, dtype=torch.bool),
           "loss_mask": torch.zeros(B, T, dtype=torch.long),
           "position_ids": torch.zeros(B, T, dtype=torch.long),
           "doc_ids": torch.full((B, T), -1, dtype=torch.long)}
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            d = docs[i]
            n = min(int(d["input_ids"].numel()), row_tokens)
            sl = slice(at, at + n)
            for key in ("input_ids", "aux_hidden", "target_probs", "position_mask", "loss_mask"):
                out[key][r, sl] = d[key][:n]
            out["position_ids"][r, sl] = torch.arange(n)
            out["doc_ids"][r, sl] = i
            at += n
    return out
