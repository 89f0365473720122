"""Peak host memory of CPU draft training, measured vs core.step_budgets.cpu_train_memory.

    .venv/bin/python bench/train_memory.py [--configs 1024:3:8192,2048:3:8192,1024:7:8192,1024:3:32000,4096:3:8192]

Each config (packed tokens : TTT length : draft vocab) trains two real steps (core.model.ttt loss,
AdamW) of a draft at SmolLM2-135M shapes on random features, alone in a fresh process, and reads
VmHWM. Memory does not depend on machine load, so this bench may run beside other jobs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(batch_tokens: int, ttt: int, vd: int, docs: int = 4, topk: int = 64) -> dict:
    """Runs in the child: peak RSS of the whole process over two training steps."""
    import time

    import torch

    from core.budget import PRESETS, TargetShape
    from core.model import DraftConfig, Eagle3Draft
    from core.model.ttt import ttt_forward_loss

    torch.set_num_threads(1)
    s = TargetShape(name="smollm2-135m", **PRESETS["smollm2-135m"])
    H, V = s.hidden_size, s.vocab_size
    cfg = DraftConfig(hidden_size=H, intermediate_size=s.intermediate_size, num_attention_heads=s.num_attention_heads,
                      num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, vocab_size=V,
                      draft_vocab_size=vd, target_hidden_size=H, target_num_hidden_layers=s.num_hidden_layers,
                      rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    draft.embed_tokens.weight.requires_grad_(False)
    ids = torch.randperm(V)[:vd].sort().values
    draft.set_vocab((ids - torch.arange(vd), torch.isin(torch.arange(V), ids)))
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
    n = batch_tokens // docs
    batch = {"input_ids": torch.randint(0, V, (1, batch_tokens)),
             "loss_mask": torch.ones(1, batch_tokens, dtype=torch.bool),
             "aux_hidden": torch.randn(1, batch_tokens, 3 * H),
             "target_topk_ids": torch.randint(0, vd, (1, batch_tokens, topk)),
             "target_topk_probs": torch.softmax(torch.randn(1, batch_tokens, topk), -1),
             "position_mask": torch.ones(1, batch_tokens, dtype=torch.bool),
             "position_ids": torch.arange(n).repeat(docs).unsqueeze(0),
             "doc_ids": torch.arange(docs).repeat_interleave(n).unsqueeze(0)}
    t0 = time.monotonic()
    for _ in range(2):
        ttt_forward_loss(draft, batch, ttt_length=ttt).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
    return {"peak_bytes": peak, "step_s": (time.monotonic() - t0) / 2}


def compare(batch_tokens: int, ttt: int, vd: int) -> dict:
    from core.budget import PRESETS, TargetShape
    from core.step_budgets import cpu_train_memory

    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from bench.train_memory import measure; "
            f"print(json.dumps(measure({batch_tokens}, {ttt}, {vd})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    got = json.loads(r.stdout.strip().splitlines()[-1])
    est = cpu_train_memory(TargetShape(name="smollm2-135m", **PRESETS["smollm2-135m"]), vd, batch_tokens, ttt)["total"]
    return {"batch_tokens": batch_tokens, "ttt": ttt, "draft_vocab": vd, "measured_bytes": got["peak_bytes"],
            "estimated_bytes": est, "ratio": est / got["peak_bytes"], "step_s": got["step_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1024:3:8192,2048:3:8192,1024:7:8192,1024:3:32000,4096:3:8192")
    a = ap.parse_args()
    for c in a.configs.split(","):
        bt, ttt, vd = (int(x) for x in c.split(":"))
        r = compare(bt, ttt, vd)
        print(f"{bt:>5} tokens, TTT {ttt}, Vd {vd:>5}: measured {r['measured_bytes'] / 1e9:.2f} GB, "
              f"estimated {r['estimated_bytes'] / 1e9:.2f} GB ({r['ratio']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
