"""Train (or time) vLLM speculators 0.9.0's EAGLE-3 draft on features handed over on disk.

Runs INSIDE the speculators venv (bench/peers.py makes it): imports only torch, safetensors,
transformers' AutoConfig and speculators, never the project. Started by bench/peers.py:

    PY peer_speculators_train.py train --features F --target T --output DIR --lr .. --warmup .. --total ..
    PY peer_speculators_train.py speed --features F --target T --docs-per-step 4 --steps N --warmup 1
    PY peer_speculators_train.py logits --features F --target T --output DIR --logits OUT

`logits` reloads the saved draft with their from_pretrained and writes its step-0 logits on the
first scheduled document (input_ids, aux, logits): the caller checks its conversion against them.

Features file (safetensors): per document i `i.input_ids` [T] int64, `i.aux` [T, 3H] (bf16 or f32),
`i.loss_mask` [T] (1 = supervised assistant token), `i.final_hidden` [T, H] (the target's last layer
BEFORE its final norm: their forward applies the verifier's norm and draft-vocab head itself);
`t2d` [V] bool, `d2t` [Vd] int64; optionally `schedule` (document ids, step after step) and
`schedule_offsets` [steps + 1]: the documents of every optimizer step, exactly as our trainer saw
them. Without a schedule, consecutive groups of --docs-per-step documents.

What is theirs: the model class (`Eagle3DraftModel.from_training_args` with the verifier folder:
frozen lm_head built from the verifier's head rows of the draft vocab, frozen embeddings), the
per-document alignment (`shift_batch`), the packing with document ids (`CollateFn`), the forward
with its loss (`resolve_loss_config("kl_div", "eager")`, their default TTT decay 1.0). What is held
equal to ours by the caller: AdamW betas / eps / weight decay, learning rate with linear warmup and
cosine decay (core.train.loop.lr_at), gradient clipping, fp32 on CPU. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    # the same schedule as core.train.loop.lr_at (restated: this venv cannot import the project)
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_model(a, t2d, d2t):
    from speculators.models.eagle3 import Eagle3DraftModel
    from speculators.train.cli import create_transformer_layer_config

    # their CLI's defaults for an eagle3 draft: one llama layer shaped from the verifier, silu,
    # sliding window 2048 (the same as full attention at our lengths); the verifier's own config
    # would give the draft all of the target's layers
    layer_cfg = create_transformer_layer_config(
        verifier_name_or_path=a.target, num_layers=1, draft_arch="llama", hidden_act="silu",
        sliding_window=2048, full_attention_indices=[])
    extra = {}
    if a.aux_layers:  # their convention: the residual entering layer i (= our layer output i - 1)
        extra["target_layer_ids"] = [int(x) for x in a.aux_layers.split(",")]
    return Eagle3DraftModel.from_training_args(
        layer_cfg, t2d=t2d, d2t=d2t, verifier_name_or_path=a.target, draft_vocab_size=int(d2t.numel()),
        norm_before_residual=False, ttt_steps=a.ttt_steps, draft_attn_impl="sdpa", **extra)


class Steps:
    """The documents of each step, collated as their trainer does (shift, pack, document ids)."""

    def __init__(self, path: str, docs_per_step: int):
        from safetensors import safe_open

        self.f = safe_open(path, framework="pt")
        keys = set(self.f.keys())
        self.n_docs = len({k.split(".")[0] for k in keys if k.endswith(".input_ids")})
        if "schedule" in keys:
            sched, offs = self.f.get_tensor("schedule").tolist(), self.f.get_tensor("schedule_offsets").tolist()
            self.groups = [sched[offs[s]:offs[s + 1]] for s in range(len(offs) - 1)]
        else:
            self.groups = [list(range(i, min(i + docs_per_step, self.n_docs)))
                           for i in range(0, self.n_docs, docs_per_step)]

    def doc(self, i: int) -> dict:
        import torch

        ids = self.f.get_tensor(f"{i}.input_ids").long()
        n = ids.numel()
        return {"input_ids": ids, "hidden_states": self.f.get_tensor(f"{i}.aux").float(),
                "verifier_last_hidden_states": self.f.get_tensor(f"{i}.final_hidden").float(),
                "loss_mask": self.f.get_tensor(f"{i}.loss_mask").bool(),
                "lengths": torch.tensor([n], dtype=torch.long),
                "position_ids": torch.arange(n, dtype=torch.long)}

    def batch(self, step: int, hidden_size: int) -> tuple[dict, int]:
        """(forward inputs, tokens of the step's documents as stored)."""
        import torch

        from speculators.models.eagle3.data import shift_batch
        from speculators.train.data import CollateFn

        docs = [self.doc(i) for i in self.groups[step % len(self.groups)]]
        tokens = sum(int(d["input_ids"].numel()) for d in docs)
        shifted = [shift_batch(d) for d in docs]
        # max_len = the step's tokens exactly: their trainer pads to a fixed length, which would
        # only add work here (we pack without padding)
        total = sum(int(d["input_ids"].numel()) for d in shifted)
        coll = CollateFn(max_len=total, hidden_size=hidden_size, dtype=torch.float32)(shifted)
        keep = ("hidden_states", "input_ids", "document_ids", "loss_mask", "position_ids",
                "verifier_last_hidden_states")
        return {k: coll[k] for k in keep}, tokens


def step0_logits(a) -> None:
    import torch
    from safetensors.torch import save_file

    from speculators.models.eagle3 import Eagle3DraftModel

    model = Eagle3DraftModel.from_pretrained(a.output).float().eval()
    data = Steps(a.features, a.docs_per_step)
    doc = data.doc(data.groups[0][0])
    ids, aux = doc["input_ids"], doc["hidden_states"]
    n = ids.numel() - 1
    got: list = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: got.append(out.detach()))
    with torch.no_grad():  # their alignment: x[t+1] with the aux states of position t
        model(hidden_states=aux[:-1][None], input_ids=ids[1:][None],
              document_ids=torch.zeros(1, n, dtype=torch.long),
              position_ids=torch.arange(1, n + 1)[None], ttt_steps=1)
    hook.remove()
    save_file({"input_ids": ids.contiguous(), "aux": aux.contiguous(),
               "logits": got[0][0].float().contiguous()}, a.logits)
    print(json.dumps({"logits": a.logits, "tokens": n}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "speed", "logits"])
    p.add_argument("--features", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--output")
    p.add_argument("--logits", help="logits: where to write them (safetensors)")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0, help="train: lr warmup steps; speed: untimed steps")
    p.add_argument("--total", type=int, default=0, help="train: schedule length (default: the schedule's)")
    p.add_argument("--steps", type=int, default=0, help="steps to run (default: the schedule's)")
    p.add_argument("--betas", default="0.9,0.95")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=0.5)
    p.add_argument("--docs-per-step", type=int, default=4)
    p.add_argument("--aux-layers", default="", help="their ids, comma separated (default: theirs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--decay", type=float, default=None,
                   help="TTT step loss decay (default: theirs, 1.0; bench/train.py passes ours, 0.8)")
    p.add_argument("--log-every", type=int, default=50)
    a = p.parse_args()

    import torch
    from safetensors import safe_open

    from speculators.losses import resolve_loss_config

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mode == "logits":
        return step0_logits(a)
    if a.mode == "train" and not a.output:
        fail("train needs --output")
    with safe_open(a.features, framework="pt") as f:
        t2d, d2t = f.get_tensor("t2d").bool(), f.get_tensor("d2t").long()
    torch.manual_seed(a.seed)  # their fc / layer weights start from the HF initialisation
    model = build_model(a, t2d, d2t).float().train()
    hidden = int(model.config.transformer_layer_config.hidden_size)
    data = Steps(a.features, a.docs_per_step)
    loss_config = resolve_loss_config("kl_div", "eager")
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=tuple(float(b) for b in a.betas.split(",")),
                            weight_decay=a.weight_decay, eps=1e-8)
    n_steps = a.steps or len(data.groups)
    total = a.total or n_steps

    def step(s: int, lr: float, prepared: tuple[dict, int] | None = None) -> tuple[float, dict]:
        batch, tokens = prepared or data.batch(s, hidden)
        for g in opt.param_groups:
            g["lr"] = lr
        decay = {} if a.decay is None else {"ttt_step_loss_decay": a.decay}
        _, loss, metrics = model(**batch, ttt_steps=a.ttt_steps, loss_config=loss_config, **decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a.grad_clip if a.grad_clip > 0 else math.inf)
        opt.step()
        return float(loss.detach()), {"tokens": tokens, **{k: float(v) for k, v in metrics.items()
                                                         if k.startswith("full_acc_")}}

    if a.mode == "speed":
        for s in range(a.warmup):  # untimed: first-call allocations
            step(s, a.lr)
        before = vm("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak counter (VmHWM) here
        losses, tokens, seconds = [], 0, 0.0
        for s in range(a.warmup, a.warmup + n_steps):
            prepared = data.batch(s, hidden)  # reading and collating stay outside the clock, as
            t0 = time.perf_counter()          # bench/train.py prepares our inputs untimed too
            loss, m = step(s, a.lr, prepared)
            del prepared
            seconds += time.perf_counter() - t0
            losses.append(loss)
            tokens += m["tokens"]
        print(json.dumps({"impl": "speculators", "tokens_per_s": tokens / seconds, "tokens": tokens,
                          "seconds": seconds, "steps": n_steps, "peak_rss_mb": vm("VmHWM"),
                          "rss_before_mb": before, "losses": losses,
                          "threads": torch.get_num_threads()}))
        return

    t_start = time.perf_counter()
    losses, tokens = [], 0
    for s in range(n_steps):
        loss, m = step(s, lr_at(s, a.lr, a.warmup, total))
        losses.append(loss)
        tokens += m["tokens"]
        if a.log_every and (s % a.log_every == 0 or s == n_steps - 1):
            print(f"[speculators] step {s + 1}/{n_steps} loss {loss:.4f} "
                  f"acc0 {m.get('full_acc_0_sum', float('nan')) / max(1.0, m.get('full_acc_0_total', 1.0)):.3f}",
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t_start
    model.save_pretrained(a.output)  # their format: config.json (speculators) + model.safetensors
    print(json.dumps({"impl": "speculators", "output": a.output, "steps": n_steps, "tokens": tokens,
                      "seconds": seconds, "tokens_per_s": tokens / seconds, "first_loss": losses[0],
                      "last_loss": losses[-1], "losses_every_10": losses[::10]}))


if __name__ == "__main__":
    main()
