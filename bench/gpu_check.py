"""One short device run for the GPU hot path (issue 13): writes one JSON, at most ~10 minutes.

    python bench/gpu_check.py [--out gpu_check.json] [--budget-s 540] [--export DIR --target DIR]
    (scripts/gpu_check.sh picks the interpreter and the output path)

Sections, each timed, each recorded as ok / fail / skipped (with the reason) / error:
  flex_vs_naive  compiled flex attention forward + backward in bf16 against the naive full-mask
                 reference in fp32 (and naive bf16, to show the bf16 error scale), packed documents,
                 all 7 TTT steps; plus the number of compiled graphs over varied packed lengths.
  train_step     tokens/s and peak memory of our TTT step for a Llama-3.1-8B-shaped draft (random
                 features, one packed row of 2048 tokens, Vd 32000, TTT 7, top-64 targets, bf16
                 autocast over fp32 master weights, AdamW), and the bf16 loss against fp32.
  capture        target feature capture (core.features) throughput in bf16 for a small Llama
                 (random weights, Llama-3.2-1B shape: the cost does not depend on the weights).
  engines        SGLang / vLLM installed? With --export and --target, `eagle serve --bench` numbers.
Without CUDA every section runs as a tiny CPU smoke test of this script instead (numbers not
meaningful, `"smoke": true`) and the JSON says that the GPU checks were skipped. Exit 0 unless a
GPU check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.model import DraftConfig, Eagle3Draft
from core.model.attention import TTTAttention
from core.model.ttt import ttt_forward_loss

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, target_hidden_size=4096, intermediate_size=14336,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)
TINY = dict(vocab_size=1000, hidden_size=64, target_hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0)


class Ctx:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.cuda = torch.cuda.is_available() and not a.cpu
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.smoke = not self.cuda
        self.deadline = time.monotonic() + a.budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def packed_doc(lengths: list[int], device) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(device)


# ---- flex vs naive --------------------------------------------------------------------------------
def _attn_run(backend, doc, qkv, steps, max_steps, grad):
    attn = TTTAttention(doc, qkv[0][0].shape[1], qkv[1][0].shape[1], qkv[0][0].shape[-1], backend,
                        max_steps=max_steps)
    outs = [attn.attend(s)(0, qkv[0][s], qkv[1][s], qkv[2][s]) for s in range(steps)]
    if not grad:
        return outs, []
    w = torch.linspace(-1, 1, outs[0].shape[-1], device=outs[0].device, dtype=outs[0].dtype)
    loss = sum(((o.float() * w.float()).sum() * (s + 1)) for s, o in enumerate(outs))
    return outs, list(torch.autograd.grad(loss, [t for group in qkv for t in group[:steps]]))


def _rel_err(a: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(float((x.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-6))
               for x, r in zip(a, ref))


def check_flex(ctx: Ctx) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    nh, nkv, hd, steps = (32, 8, 128, 7) if ctx.cuda else (4, 2, 16, 3)
    lengths = [700, 900, 300, 100] if ctx.cuda else [60, 90, 40]
    doc = packed_doc(lengths, ctx.device)
    t = doc.shape[1]
    g = torch.Generator(device=ctx.device).manual_seed(0)

    def make(dtype, grad, length=t):
        base = [[torch.randn(1, n, length, hd, generator=g, device=ctx.device) for _ in range(steps)]
                for n in (nh, nkv, nkv)]
        return [[x.to(dtype).requires_grad_(grad) for x in group] for group in base]

    grad = ctx.cuda  # torch 2.13 runs flex backward on CUDA only
    bf = make(torch.bfloat16, grad)
    fp = [[x.detach().float().requires_grad_(grad) for x in group] for group in bf]
    nb = [[x.detach().clone().requires_grad_(grad) for x in group] for group in bf]
    graphs0 = counters["stats"]["unique_graphs"]
    t0 = time.monotonic()
    flex_out, flex_grad = _attn_run("flex", doc, bf, steps, steps, grad)
    ctx.sync()
    first_s = time.monotonic() - t0
    ref_out, ref_grad = _attn_run("naive", doc, fp, steps, None, grad)
    nb_out, nb_grad = _attn_run("naive", doc, nb, steps, None, grad)
    res = {"shape": {"T": t, "documents": lengths, "heads": nh, "kv_heads": nkv, "head_dim": hd,
                     "ttt_steps": steps}, "backward": grad, "first_call_s": round(first_s, 2),
           "flex_bf16_rel_err_out": _rel_err(flex_out, ref_out),
           "naive_bf16_rel_err_out": _rel_err(nb_out, ref_out)}
    if grad:
        res["flex_bf16_rel_err_grad"] = _rel_err(flex_grad, ref_grad)
        res["naive_bf16_rel_err_grad"] = _rel_err(nb_grad, ref_grad)
    # varied packed lengths in one bucket: no new graphs after the first batch
    for lens in ([650, 1000, 348], [2000], [1024, 1000]) if ctx.cuda else ([50, 140], [190]):
        d = packed_doc(lens, ctx.device)
        _attn_run("flex", d, make(torch.bfloat16, grad, d.shape[1]), steps, steps, grad)
    ctx.sync()
    res["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs0
    res["flex_calls"] = 4 * steps
    tol = 2.0 * max(res["naive_bf16_rel_err_out"], res.get("naive_bf16_rel_err_grad", 0.0)) + 1e-2
    worst = max(res["flex_bf16_rel_err_out"], res.get("flex_bf16_rel_err_grad", 0.0))
    res["status"] = "ok" if worst <= tol and (not ctx.cuda or res["compiled_graphs"] <= 2) else "fail"
    res["tolerance"] = tol
    return res


# ---- training step ---------------------------------------------------------------------------------
def _draft(shape: dict, vd: int, device) -> Eagle3Draft:
    cfg = DraftConfig(draft_vocab_size=vd, rms_norm_eps=1e-5, max_position_embeddings=8192,
                      target_num_hidden_layers=32, num_hidden_layers=1, **shape)
    torch.manual_seed(0)
    d = Eagle3Draft(cfg)
    sel = torch.randperm(cfg.vocab_size)[:vd].sort().values
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[sel] = True
    d.set_vocab((sel - torch.arange(vd), t2d))
    return d.to(device)


def _batch(lengths: list[int], shape: dict, vd: int, k: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    t = sum(lengths)
    probs = torch.softmax(torch.randn(t, k, generator=g) * 2, -1)
    return {k_: v.to(device) for k_, v in {
        "input_ids": torch.randint(0, shape["vocab_size"], (1, t), generator=g),
        "aux_hidden": torch.randn(1, t, 3 * shape["target_hidden_size"], generator=g),
        "target_topk_ids": torch.stack([torch.randperm(vd, generator=g)[:k] for _ in range(t)])[None],
        "target_topk_probs": probs.sort(-1, descending=True).values[None],
        "position_mask": (torch.rand(1, t, generator=g) < 0.9),
        "loss_mask": torch.ones(1, t, dtype=torch.bool),
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "doc_ids": packed_doc(lengths, "cpu")}.items()}


def check_train(ctx: Ctx) -> dict:
    shape, vd, ttt, k = (LLAMA_8B, 32000, 7, 64) if ctx.cuda else (TINY, 200, 3, 16)
    lengths = [600, 500, 948] if ctx.cuda else [100, 80, 76]
    draft = _draft(shape, vd, ctx.device)
    batch = _batch(lengths, shape, vd, k, ctx.device)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), **({"foreach": True} if ctx.cuda else {}))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.cuda)

    def step(b=batch):
        with autocast:
            out = ttt_forward_loss(draft, b, ttt_length=ttt)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    with torch.no_grad():  # fp32 reference on the initial weights (eager attention: no extra compile)
        fp = float(ttt_forward_loss(draft, batch, ttt_length=ttt, attention_backend="eager").loss)
    from torch._dynamo.utils import counters

    graphs0 = counters["stats"]["unique_graphs"]
    t0 = time.monotonic()
    bf = float(step().loss.detach())  # compiles flex (one bucket); bf16 loss of the same weights
    ctx.sync()
    warm_s = time.monotonic() - t0
    for _ in range(2):
        step()
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    n = 10 if ctx.cuda else 2
    ctx.sync()
    t0 = time.monotonic()
    for _ in range(n):
        out = step()
    ctx.sync()
    dt = (time.monotonic() - t0) / n
    other = [500, 700, 790] if ctx.cuda else [90, 70, 80]  # another packing, same length bucket
    step(_batch(other, shape, vd, k, ctx.device))
    res = {"shape": {**shape, "draft_vocab_size": vd, "ttt_length": ttt, "tokens_per_row": sum(lengths),
                     "documents": lengths, "topk": k}, "attention": out.backend,
           "first_step_s": round(warm_s, 2), "step_ms": round(dt * 1e3, 2),
           "tokens_per_s": round(sum(lengths) / dt, 1), "loss_bf16": bf, "loss_fp32": fp,
           "loss_bf16_rel_diff": abs(bf - fp) / max(abs(fp), 1e-9),
           "compiled_graphs": counters["stats"]["unique_graphs"] - graphs0,
           "train_steps_run": n + 4}
    if ctx.cuda:
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    res["speculators"] = ("skipped: speculators is not installed here" if importlib.util.find_spec("speculators")
                          is None else "skipped: the speculators step runs in bench/train.py (own venv)")
    res["status"] = "ok" if res["loss_bf16_rel_diff"] < 0.02 and res["compiled_graphs"] <= 2 else "fail"
    return res


# ---- feature capture -------------------------------------------------------------------------------
def check_capture(ctx: Ctx) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.features import TargetFeatureExtractor
    from core.vocab import build_vocab

    if ctx.cuda:
        shape = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64)
        n, length, vd = 32, 2048, 32000
    else:
        shape = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        n, length, vd = 4, 64, 200
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(ctx.device):  # initialise on the device (1.2B parameters)
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, rope_theta=500000.0, **shape))
    model = model.to(dtype=dtype).eval()
    vocab = build_vocab(torch.randint(1, 100, (shape["vocab_size"],)), vd, shape["vocab_size"])
    ex = TargetFeatureExtractor(model, vocab, device=ctx.device, dtype=dtype, max_batch_tokens=16384,
                                check_head=False)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, shape["vocab_size"], (length,), generator=g) for _ in range(n)]
    with torch.no_grad():
        ex(seqs[:2], to_cpu=False)  # warm-up
        ctx.sync()
        t0 = time.monotonic()
        ex(seqs, to_cpu=False)
        ctx.sync()
    dt = time.monotonic() - t0
    ex.close()
    res = {"target": {**shape, "weights": "random init (throughput does not depend on them)"},
           "dtype": str(dtype), "samples": n, "tokens_per_sample": length, "draft_vocab_size": vd,
           "tokens_per_s": round(n * length / dt, 1), "status": "ok"}
    if ctx.cuda:
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    return res


# ---- serving engines --------------------------------------------------------------------------------
def check_engines(ctx: Ctx) -> dict:
    found = {e: importlib.util.find_spec(e) is not None for e in ("sglang", "vllm")}
    res: dict = {"installed": found}
    if not any(found.values()):
        res["status"] = "skipped: neither sglang nor vllm is installed in this environment"
        return res
    if not ctx.cuda:
        res["status"] = "skipped: no CUDA device"
        return res
    if not (ctx.a.export and ctx.a.target):
        res["status"] = ("skipped: pass --export DIR --target DIR (a tiny trained export, e.g. from "
                         "`eagle demo --quick`) to measure the engines' accept length")
        return res
    import subprocess

    for engine, ok in found.items():
        if not ok or ctx.left() < 120:
            res[engine] = "skipped: not installed" if not ok else "skipped: time budget"
            continue
        out = Path(ctx.a.out).with_suffix(f".{engine}.json")
        cmd = [sys.executable, "-m", "eagle_tui.cli", "serve", "--target", ctx.a.target, "--draft",
               ctx.a.export, "--engine", engine, "--bench", "--bench-prompts", "8",
               "--bench-max-tokens", "128", "--bench-output", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, ctx.left() - 30))
        res[engine] = {"rc": p.returncode, "tail": p.stderr[-800:],
                       "result": json.loads(out.read_text()) if out.exists() else None}
    res["status"] = "ok" if all(isinstance(res.get(e), dict) and res[e]["rc"] == 0
                                for e, ok in found.items() if ok) else "fail"
    return res


SECTIONS = [("flex_vs_naive", check_flex, 150), ("train_step", check_train, 150),
            ("capture", check_capture, 60), ("engines", check_engines, 30)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting sections after this")
    ap.add_argument("--cpu", action="store_true", help="the CPU smoke run even where CUDA exists")
    ap.add_argument("--export", help="a trained export folder for the engines section")
    ap.add_argument("--target", help="its target model folder")
    ap.add_argument("--only", help="comma-separated sections to run")
    a = ap.parse_args(argv)
    ctx = Ctx(a)
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
                    "cuda": ctx.cuda, "device": torch.cuda.get_device_name(0) if ctx.cuda else "cpu",
                    "smoke": ctx.smoke, "sections": {}}
    if ctx.smoke:
        report["skipped"] = ("no CUDA device: the GPU checks (compiled flex forward/backward in bf16, "
                             "Llama-3.1-8B-shaped training tokens/s and peak memory, bf16 capture "
                             "throughput, engines) did not run; each section ran as a tiny CPU smoke test")
    only = set(a.only.split(",")) if a.only else None

    def write() -> None:  # after every section: a timeout still leaves the finished ones
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, a.out)

    for name, fn, need_s in SECTIONS:
        if only and name not in only:
            continue
        if ctx.left() < need_s:
            report["sections"][name] = {"status": f"skipped: {ctx.left():.0f}s of the budget left, needs ~{need_s}s"}
            continue
        t0 = time.monotonic()
        try:
            r = fn(ctx)
        except Exception as e:  # one broken section must not hide the others' numbers
            r = {"status": "error", "error": f"{type(e).__name__}: {e}"[:800],
                 "traceback": traceback.format_exc()[-2000:]}
        r["seconds"] = round(time.monotonic() - t0, 1)
        report["sections"][name] = r
        print(f"{name}: {r['status']} ({r['seconds']}s)", file=sys.stderr, flush=True)
        if ctx.cuda:
            torch.cuda.empty_cache()
        write()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write()
    print(json.dumps(report, indent=2, default=str))
    failed = [n for n, r in report["sections"].items() if r["status"] in ("fail", "error")]
    return 1 if failed and ctx.cuda else 0


if __name__ == "__main__":
    sys.exit(main())
