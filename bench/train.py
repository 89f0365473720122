"""Draft-training throughput and peak memory on CPU: our TTT step vs a plain one, same run.

    .venv/bin/python bench/train.py [--samples 24] [--seq 512] [--ttt 3] [--random]

Ours: the step's documents packed into one row as core.train does (no attention across them), target
distributions over the draft vocab only, logits only for supervised rows, TTT steps >= 1 only on
rows a later step supervises, the fused CPU attention
path (core.model.ttt.ttt_forward_loss). Plain: what the anchors' training step does, written out
below: each document padded to the longest in the batch, full-vocabulary target logits restricted
to the draft vocab inside every TTT step, logits for every position, the explicit full mask over
the concatenated keys of all steps. Both take an AdamW step on the same draft weights. Both see the
same documents per step and must give the same loss (asserted). Tokens/s: both in this process,
step by step in alternating order, so a change of machine load hits both alike. Peak RSS: each
implementation again in its own subprocess (VmHWM, reset just before its training steps, with
only the documents those steps use loaded).

Features: real SmolLM2-135M-Instruct features of demo ShareGPT conversations (core.assets,
core.features) when available, else random tensors of the same shapes (--random, or as a fallback;
the output says which).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.model import DraftConfig, Eagle3Draft  # noqa: E402
from core.model.attention import repeat_kv  # noqa: E402
from core.model.ttt import ttt_forward_loss  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
               rms_norm_eps=1e-5, max_position_embeddings=8192)


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


# ---- features ---------------------------------------------------------------------------------
def make_features(args) -> tuple[dict, str]:
    """{"docs": [...], "t2d", "d2t", "norm_weight", "lm_head"} and a description of the source."""
    if not args.random:
        try:
            return real_features(args), "real SmolLM2-135M-Instruct features (demo ShareGPT conversations)"
        except Exception as e:  # noqa: BLE001 - a bench falls back and says so
            print(f"[bench] real features unavailable ({type(e).__name__}: {e}); using random features")
    return random_features(args), "random features with SmolLM2 shapes"


def real_features(args) -> dict:
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from core.assets import demo_target
    from core.features import TargetFeatureExtractor
    from core.vocab import build_vocab, tokenize_dataset

    target = demo_target()
    tok = AutoTokenizer.from_pretrained(target)
    spec = SimpleNamespace(data="demo", split=None, messages_column=None, shuffle_seed=None,
                           limit=args.samples * 4, strict=False, max_length=args.seq)
    samples, _ = tokenize_dataset(spec, tok)
    vocab = build_vocab([(s[1], s[2]) for s in samples], args.draft_vocab, len(tok))
    samples = samples[:args.samples]
    ext = TargetFeatureExtractor(str(target), vocab, final_hidden=True, device="cpu")
    feats = ext([s[1] for s in samples])
    head = ext.lm_head.weight.detach().float().clone()
    norm_w = ext.norm.weight.detach().float().clone()
    docs = []
    for s, f in zip(samples, feats):
        docs.append({"input_ids": f.input_ids, "aux_hidden": f.aux_hidden.float(),
                     "target_probs": f.target_probs, "position_mask": f.position_mask,
                     "loss_mask": torch.tensor(s[2], dtype=torch.long), "final_hidden": f.final_hidden.float()})
    return {"docs": docs, "t2d": vocab.t2d, "d2t": vocab.d2t, "norm_weight": norm_w, "lm_head": head,
            "eps": ext.norm_eps}


def random_features(args) -> dict:
    g = torch.Generator().manual_seed(0)
    V, H, Vd = SMOLLM2["vocab_size"], SMOLLM2["hidden_size"], args.draft_vocab
    selected = torch.sort(torch.randperm(V, generator=g)[:Vd]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[selected] = True
    head = torch.randn(V, H, generator=g) * 0.05
    norm_w = torch.ones(H)
    docs = []
    for i in range(args.samples):
        n = int(torch.randint(args.seq // 4, args.seq + 1, (1,), generator=g))
        final = torch.randn(n, H, generator=g)
        full = F.rms_norm(final, (H,), norm_w, 1e-5) @ head.T
        lm = torch.zeros(n, dtype=torch.long)
        lm[n // 3:] = 1
        docs.append({"input_ids": torch.randint(0, V, (n,), generator=g),
                     "aux_hidden": torch.randn(n, 3 * H, generator=g), "loss_mask": lm,
                     "target_probs": torch.softmax(full[:, selected], -1),
                     "position_mask": t2d[full.argmax(-1)], "final_hidden": final})
    return {"docs": docs, "t2d": t2d, "d2t": selected - torch.arange(Vd), "norm_weight": norm_w,
            "lm_head": head, "eps": 1e-5}


def full_logits(feats: dict, doc: dict) -> torch.Tensor:
    h = doc["final_hidden"]
    return F.rms_norm(h, (h.shape[-1],), feats["norm_weight"], feats["eps"]) @ feats["lm_head"].T


def new_draft(feats: dict, draft_vocab: int) -> Eagle3Draft:
    hf = dict(SMOLLM2)
    cfg = DraftConfig.from_target_config(hf, draft_vocab)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    draft.set_vocab((feats["d2t"], feats["t2d"]))
    with torch.no_grad():
        draft.embed_tokens.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return draft


def groups_of(docs: list, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, len(docs)))) for i in range(0, len(docs), size)]


# ---- timing (interleaved, one process) and memory (one subprocess per implementation) --------
class Trainer:
    """One implementation's training step (forward, backward, clip, AdamW) on its own draft copy."""

    def __init__(self, impl: str, feats: dict, args):
        self.impl, self.feats, self.args = impl, feats, args
        self.draft = new_draft(feats, args.draft_vocab)
        self.opt = torch.optim.AdamW([p for p in self.draft.parameters() if p.requires_grad], lr=1e-4,
                                     betas=(0.9, 0.95), weight_decay=0.0)

    def inputs(self, members: list[dict]):
        if self.impl == "plain":  # the anchors hold full-vocab target logits per position
            return [dict(d, target_logits=full_logits(self.feats, d)) for d in members]
        # like core.train: the step's documents packed into one row, no padding
        return pack_docs(members, self.args.seq * self.args.docs_per_step)

    def step(self, inputs) -> float:
        if self.impl == "plain":
            loss, _, _ = baseline_ttt_loss(self.draft, inputs, self.feats["t2d"], self.args.ttt)
        else:
            loss = ttt_forward_loss(self.draft, inputs, ttt_length=self.args.ttt).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.draft.parameters(), 0.5)
        self.opt.step()
        return float(loss.detach())


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_worker(args) -> None:
    """Peak RSS (VmHWM) of this process while it trains --mem-steps steps."""
    torch.set_num_threads(args.threads)
    feats = torch.load(args.features, weights_only=True)
    plan = groups_of(feats["docs"], args.docs_per_step)[:args.mem_steps]
    keep = sorted({i for g in plan for i in g})
    feats["docs"] = {i: feats["docs"][i] for i in keep}  # only the data this run touches
    import gc

    gc.collect()
    trainer = Trainer(args.worker, feats, args)
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak counter (VmHWM) here
    for group in plan:
        inputs = trainer.inputs([feats["docs"][i] for i in group])
        trainer.step(inputs)
        del inputs
    print(json.dumps({"impl": args.worker, "peak_rss_mb": _vm("VmHWM"), "rss_before_mb": before}))


def run_memory_worker(impl: str, args, features: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--features", str(features),
           "--seq", str(args.seq), "--ttt", str(args.ttt), "--draft-vocab", str(args.draft_vocab),
           "--docs-per-step", str(args.docs_per_step), "--mem-steps", str(args.mem_steps),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{impl} memory worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_interleaved(feats: dict, args) -> dict:
    """Both implementations, step by step in alternating order (load drift hits both alike)."""
    torch.set_num_threads(args.threads)
    trainers = {impl: Trainer(impl, feats, args) for impl in ("plain", "ours")}
    seconds = {impl: 0.0 for impl in trainers}
    losses: dict[str, list[float]] = {impl: [] for impl in trainers}
    tokens = 0
    plan = groups_of(feats["docs"], args.docs_per_step)
    warm = [feats["docs"][i] for i in plan[0]]
    for impl, tr in trainers.items():  # warm-up step each, then both restart from the same weights
        tr.step(tr.inputs(warm))
        trainers[impl] = Trainer(impl, feats, args)
    for n, group in enumerate(plan * args.repeat):
        members = [feats["docs"][i] for i in group]
        order = ("plain", "ours") if n % 2 == 0 else ("ours", "plain")
        for impl in order:
            tr = trainers[impl]
            inputs = tr.inputs(members)
            t0 = time.perf_counter()
            losses[impl].append(tr.step(inputs))
            seconds[impl] += time.perf_counter() - t0
            del inputs
        tokens += sum(int(d["input_ids"].numel()) for d in members)
    return {impl: {"tokens_per_s": tokens / seconds[impl], "seconds": seconds[impl], "tokens": tokens,
                   "losses": losses[impl]} for impl in trainers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--ttt", type=int, default=3)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--docs-per-step", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--random", action="store_true")
    p.add_argument("--worker", choices=["ours", "plain"])
    p.add_argument("--features")
    p.add_argument("--no-peer", action="store_true", help="skip speculators 0.9.0's step (its own venv)")
    args = p.parse_args()
    if args.worker:
        return memory_worker(args)

    cache = REPO / ".cache" / "eagle" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{'random' if args.random else 'real'}-{args.samples}-{args.seq}-{args.draft_vocab}"
    features = cache / f"train-features-{tag}.pt"
    if features.exists():
        feats = torch.load(features, weights_only=True)
        source = feats["source"]
    else:
        feats, source = make_features(args)
        feats["source"] = source
        torch.save(feats, features)
    docs = feats["docs"]
    lengths = [int(d["input_ids"].numel()) for d in docs]
    supervised = sum(int(d["loss_mask"].sum()) for d in docs) / sum(lengths)
    print(f"features: {source}; {len(docs)} documents, lengths {min(lengths)}..{max(lengths)} "
          f"(mean {sum(lengths) / len(lengths):.0f}), {supervised:.0%} supervised tokens")
    print(f"step: {args.docs_per_step} documents, sequence {args.seq}, TTT {args.ttt}, "
          f"draft vocab {args.draft_vocab}, V {feats['t2d'].numel()}, threads {args.threads}")

    # equal loss and gradients on the first step, in-process
    group = [docs[i] for i in groups_of(docs, args.docs_per_step)[0]]
    a, b = new_draft(feats, args.draft_vocab), new_draft(feats, args.draft_vocab)
    ours = ttt_forward_loss(a, pack_docs(group, args.seq * args.docs_per_step), ttt_length=args.ttt)
    plain, plain_steps, plain_acc = baseline_ttt_loss(
        b, [dict(d, target_logits=full_logits(feats, d)) for d in group], feats["t2d"], args.ttt)
    ours.loss.backward()
    plain.backward()
    torch.testing.assert_close(ours.loss.detach(), plain.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.fc.weight.grad, b.fc.weight.grad, rtol=1e-3, atol=1e-6)
    print(f"equal loss: ours {float(ours.loss.detach()):.6f} plain {float(plain.detach()):.6f}; per-step acc "
          f"{[round(x, 4) for x in ours.per_step_acc]} vs {[round(x, 4) for x in plain_acc]}")
    del a, b, ours, plain

    timing = time_interleaved(feats, args)
    memory = {impl: run_memory_worker(impl, args, features) for impl in ("plain", "ours")}
    for impl in ("plain", "ours"):
        t, m = timing[impl], memory[impl]
        print(f"{impl:>5}: {t['tokens_per_s']:8.1f} tokens/s ({t['tokens']} tokens in {t['seconds']:.1f} s)  "
              f"peak RSS {m['peak_rss_mb']:6.0f} MB during {args.mem_steps} steps "
              f"(RSS before them {m['rss_before_mb']:.0f} MB)")
    for x, y in zip(timing["plain"]["losses"], timing["ours"]["losses"]):
        assert abs(x - y) <= 1e-3 * max(1.0, abs(x)), (x, y)
    speed = timing["ours"]["tokens_per_s"] / timing["plain"]["tokens_per_s"]
    mem = memory["ours"]["peak_rss_mb"] / memory["plain"]["peak_rss_mb"]
    print(f"ratio: {speed:.2f}x tokens/s, {mem:.2f}x peak RSS (goal >= 1.5x at <= 1.0x); "
          f"losses equal over {len(timing['ours']['losses'])} training steps "
          f"(first {timing['ours']['losses'][0]:.4f}, last {timing['ours']['losses'][-1]:.4f})")
    if not args.no_peer:
        peer_row(args, feats, docs, timing, memory)


def peer_row(args, feats: dict, docs: list, timing: dict, memory: dict) -> None:
    """speculators 0.9.0's real step (their model class and loss, own venv: bench/peers.py) on the
    same documents and groups, same threads; memory the way ours is measured (first --mem-steps)."""
    from bench.peers import PeerError, speculators_step_speed
    from core.assets import demo_target

    try:
        theirs = speculators_step_speed(docs, feats["t2d"], feats["d2t"], target=demo_target(),
                                        docs_per_step=args.docs_per_step, ttt_steps=args.ttt,
                                        steps=len(groups_of(docs, args.docs_per_step)) * args.repeat,
                                        threads=args.threads)
        theirs_mem = speculators_step_speed(docs[:args.docs_per_step * args.mem_steps], feats["t2d"],
                                            feats["d2t"], target=demo_target(), docs_per_step=args.docs_per_step,
                                            ttt_steps=args.ttt, steps=args.mem_steps, warmup=0,
                                            threads=args.threads)
    except PeerError as e:
        raise SystemExit(f"error: speculators 0.9.0 could not run: {e}")
    print(f"speculators 0.9.0: {theirs['tokens_per_s']:8.1f} tokens/s ({theirs['tokens']} tokens in "
          f"{theirs['seconds']:.1f} s)  peak RSS {theirs_mem['peak_rss_mb']:6.0f} MB during {args.mem_steps} steps")
    print(f"ratio vs speculators 0.9.0: {timing['ours']['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tokens/s, "
          f"{memory['ours']['peak_rss_mb'] / theirs_mem['peak_rss_mb']:.2f}x peak RSS (goal >= 1.5x at <= 1.0x; "
          "their step runs in its own process, not interleaved: repeat and compare medians)")


if __name__ == "__main__":
    main()
