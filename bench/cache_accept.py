"""Accept length of drafts trained offline on each cache storage option, same run (issue 4).

    .venv/bin/python bench/cache_accept.py [--quick] [--train 96] [--steps 240] [--prompts 8]

On the embedded SmolLM2-135M-Instruct target and short demo ShareGPT conversations
(core.data.demo.write_demo_subset: the first --train conversations train, the next --prompts are
held-out eval prompts), this builds one cache per storage option with the real `build_cache`:

  baseline    aux bf16 + the full draft-vocab distribution (bf16): what NeMo stores, unpadded
  fp8-top64   aux fp8 + top-64 probabilities (the `eagle cache` default)
  fp8-hidden  aux fp8 + the target's final hidden state (distribution recomputed by the reader)

then trains a draft offline on each with the same seed and settings (`core.train.train`) and
measures its accept length τ with real chain speculative decoding (`core.evaluate.evaluate`,
greedy, k=3, lossless checked) on the same held-out prompts. Two extra runs, unless --quick:

  fp8-top64+spread   the fp8-top64 cache, but the reader spreads the leftover probability mass
                     (1 - top-64 mass) evenly over the other draft-vocab ids instead of
                     renormalizing the top 64 (the cache format is unchanged)
  baseline seed 1    the baseline again with another seed: how much τ moves between two
                     trainings that differ only by chance (the noise floor of every comparison)

Every draft is also scored on the baseline cache's validation split (full-precision aux and
distribution; the same split for all runs): "ref" acc_0 / τ_sim / loss_0 compare the drafts on
identical inputs, where each run's own validation uses its own (compressed) features.
The τ loss is 1 - τ/τ(baseline); its 95% interval comes from a paired bootstrap over prompts.
Bytes per sample are the shard files on disk; NeMo pads every sample to max_length
(aux [3H] + probs [Vd], bf16, eagle3-reference.md section 5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.budget import format_bytes  # noqa: E402
from core.cache import CacheConfig, build_cache  # noqa: E402
from core.cache import layout  # noqa: E402

CACHE_OPTIONS = {
    "baseline": dict(aux_dtype="bf16", target_store="probs", target_dtype="bf16"),
    "fp8-top64": dict(aux_dtype="fp8", target_store="topk", topk=64),
    "fp8-hidden": dict(aux_dtype="fp8", target_store="hidden", target_dtype="bf16"),
}


@contextlib.contextmanager
def work_folder(path: str | None, prefix: str) -> Iterator[Path]:
    """`path` emptied first and kept afterwards (to look at), or a temporary folder removed at the end."""
    if path:
        work = Path(path)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        yield work
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def spread_topk_expand(values: torch.Tensor, indices: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """Top-k probabilities as stored, the leftover mass spread evenly over the other draft ids."""
    v = values.float()
    k = v.shape[-1]
    left = (1.0 - v.sum(-1, keepdim=True)).clamp(min=0.0) / max(1, draft_vocab_size - k)
    dense = left.expand(v.shape[0], draft_vocab_size).clone()
    dense.scatter_(1, indices.long(), v)
    return dense / dense.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


class patched_reader_topk:
    """Make CacheReader expand top-k rows with spread_topk_expand while the block runs."""

    def __enter__(self):
        import core.cache.reader as r

        self.mod, self.orig = r, r.topk_expand
        r.topk_expand = spread_topk_expand

    def __exit__(self, *exc):
        self.mod.topk_expand = self.orig


# ---- the three stages --------------------------------------------------------------------------
def build(name: str, target: Path, data: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    out = work / f"cache-{name}"
    cfg = CacheConfig(target=str(target), data=str(data), output_dir=str(out), limit=a.train,
                      draft_vocab_size=a.draft_vocab_size, max_length=a.max_length, shard_size=32,
                      batch_tokens=max(2048, a.max_length), device="cpu", **CACHE_OPTIONS[name])
    res = build_cache(cfg.validate())
    head = out / "head.safetensors"
    return {"dir": str(out), "samples": res.samples, "tokens": res.tokens, "bytes": res.bytes,
            "bytes_per_sample": res.bytes_per_sample, "head_bytes": head.stat().st_size if head.exists() else 0,
            "coverage": res.coverage, "seconds": res.seconds}


def train_one(run: str, cache: str, work: Path, a: argparse.Namespace, seed: int, spread: bool) -> dict[str, Any]:
    from core.train import TrainConfig, train

    cfg = TrainConfig(output_dir=str(work / f"run-{run}"), cache=cache, max_length=a.max_length,
                      ttt_length=3, lr=5e-4, warmup_ratio=0.05, max_steps=a.steps,
                      max_tokens_per_batch=2 * a.max_length, val_fraction=0.1, seed=seed,
                      save_every=a.steps, eval_every=a.steps, tensorboard=False, device="cpu")
    t0 = time.perf_counter()
    if spread:
        with patched_reader_topk():
            res = train(cfg)
    else:
        res = train(cfg)
    return {"run_dir": res.run_dir, "seconds": time.perf_counter() - t0, "tokens_per_s": res.tokens_per_s,
            "train_loss": res.train_metrics.get("loss"), "val": res.val_last}


@torch.no_grad()
def reference_validation(run_dir: str, ref_cache: str, a: argparse.Namespace, seed: int) -> dict[str, float]:
    """The draft's validation metrics on the baseline cache's split (as core.train validates)."""
    from core.cache import CacheReader
    from core.model.attention import resolve_backend
    from core.model.ttt import ttt_forward_loss
    from core.model import Eagle3Draft
    from core.train.data import BatchPlan, OfflineSource, split_indices
    from core.train.distributed import DistEnv
    from core.train.metrics import MetricAccumulator

    reader = CacheReader(ref_cache)
    _, val_idx = split_indices(len(reader), 0.1, seed)
    src = OfflineSource(reader, val_idx, a.max_length)
    plan = BatchPlan(src.lengths, 2 * a.max_length, seed, shuffle=False)
    draft = Eagle3Draft.from_pretrained(run_dir)
    backend = resolve_backend("auto", torch.device("cpu"))
    acc = MetricAccumulator(3)
    for mb in plan.epoch_micro_batches(0):
        acc.add(ttt_forward_loss(draft, src.batch(mb, torch.device("cpu")), ttt_length=3,
                                 attention_backend=backend))
    env = DistEnv(world_size=1, rank=0, local_rank=0, device=torch.device("cpu"))
    return acc.reduce(env)


def evaluate_one(run_dir: str, target: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    from core.evaluate import EvalConfig, evaluate

    t0 = time.perf_counter()
    rep = evaluate(EvalConfig(target=str(target), draft=run_dir, data=str(data), num_prompts=a.prompts,
                              num_draft_tokens=3, max_new_tokens=a.max_new_tokens, offset=a.train,
                              device="cpu", dtype="float32"))
    s = rep["summary"]
    return {"tau": s["tau"], "accept_rate": s["accept_rate"], "lossless": s["lossless"],
            "lossless_failures": s["lossless_failures"], "verify_steps": s["verify_steps"],
            "seconds": time.perf_counter() - t0,
            "per_prompt": [{"index": p["index"], "accepted_drafts": p["accepted_drafts"]} for p in rep["prompts"]]}


def tau_loss_interval(base: list[dict], other: list[dict], n: int = 2000) -> tuple[float, float]:
    """95% paired-bootstrap interval (over prompts) of 1 - τ(other)/τ(base), in %."""
    from core.evaluate.report import bootstrap_interval, prompts_tau, resample

    b, o = ([r["accepted_drafts"] for r in rows] for rows in (base, other))

    def loss(rng) -> float:
        pick = resample(rng, len(b))
        return 100 * (1 - prompts_tau(o, pick) / prompts_tau(b, pick))

    return bootstrap_interval(loss, n)


# ---- main --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (~5 min), no spread / seed-noise runs")
    ap.add_argument("--train", type=int, default=None, help="training conversations (default 96, quick 24)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per draft (default 240, quick 60)")
    ap.add_argument("--prompts", type=int, default=None, help="held-out eval prompts (default 8, quick 3)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per prompt (default 64, quick 32)")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--max-chars", type=int, default=1200, help="longest demo conversation, characters")
    ap.add_argument("--draft-vocab-size", type=int, default=8192)
    ap.add_argument("--no-spread", action="store_true", help="skip the leftover-mass spreading run")
    ap.add_argument("--no-noise", action="store_true", help="skip the second-seed baseline run")
    ap.add_argument("--workdir", type=str, default=None, help="keep caches and runs here (default: a temp dir)")
    ap.add_argument("--json", type=str, default=None, help="also write the numbers here")
    a = ap.parse_args()
    q = a.quick
    a.train = a.train or (24 if q else 96)
    a.steps = a.steps or (60 if q else 240)
    a.prompts = a.prompts or (3 if q else 8)
    a.max_new_tokens = a.max_new_tokens or (32 if q else 64)
    spread, noise = not (q or a.no_spread), not (q or a.no_noise)

    from core.assets import demo_target
    from core.data.demo import write_demo_subset
    from core.budget import TargetShape

    t_all = time.perf_counter()
    target = demo_target()
    shape = TargetShape.resolve(str(target))
    with work_folder(a.workdir, "cache-accept-") as work:
        data = write_demo_subset(work / "conversations.jsonl", a.train + a.prompts + 8, a.max_chars)
        print(f"SmolLM2-135M-Instruct (hidden {shape.hidden_size}), {a.train} training conversations "
              f"(<= {a.max_chars} chars, max length {a.max_length}), draft vocab {a.draft_vocab_size}, "
              f"{a.steps} steps, TTT 3, eval {a.prompts} held-out prompts x {a.max_new_tokens} tokens, k=3, "
              f"torch threads {torch.get_num_threads()}", flush=True)
        caches: dict[str, dict] = {}
        for name in CACHE_OPTIONS:
            caches[name] = build(name, target, data, work, a)
            print(f"  cache {name}: {format_bytes(caches[name]['bytes_per_sample'])}/sample, "
                  f"{caches[name]['seconds']:.0f}s", flush=True)
        runs = [("baseline", "baseline", 0, False), ("fp8-top64", "fp8-top64", 0, False),
                ("fp8-hidden", "fp8-hidden", 0, False)]
        if spread:
            runs.append(("fp8-top64+spread", "fp8-top64", 0, True))
        if noise:
            runs.append(("baseline seed 1", "baseline", 1, False))
        results: dict[str, dict] = {}
        for run, cache, seed, spr in runs:
            tr = train_one(run.replace(" ", "-"), caches[cache]["dir"], work, a, seed, spr)
            tr["ref_val"] = reference_validation(tr["run_dir"], caches["baseline"]["dir"], a, seed)
            ev = evaluate_one(tr["run_dir"], target, data, a)
            results[run] = {"cache": cache, "seed": seed, "spread": spr, "train": tr, "eval": ev}
            print(f"  {run}: trained {tr['seconds']:.0f}s, val acc_0 {tr['val'].get('acc_0', math.nan):.3f}, "
                  f"τ {ev['tau']:.3f} (eval {ev['seconds']:.0f}s)", flush=True)
        report = summarize(caches, results, shape, a)
        report["seconds"] = time.perf_counter() - t_all
        print(f"\nwall time {report['seconds'] / 60:.1f} min")
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2, default=str))


def summarize(caches: dict, results: dict, shape: Any, a: argparse.Namespace) -> dict[str, Any]:
    vd, H = a.draft_vocab_size, shape.hidden_size
    nemo = layout.tensor_bytes("bf16", (a.max_length, 3 * H + vd))  # per sample, padded
    base = results["baseline"]
    tau0 = base["eval"]["tau"]
    rows = []
    for run, r in results.items():
        c = caches[r["cache"]]
        v, rv, ev = r["train"]["val"], r["train"]["ref_val"], r["eval"]
        lo, hi = (tau_loss_interval(base["eval"]["per_prompt"], ev["per_prompt"])
                  if run != "baseline" else (0.0, 0.0))
        rows.append({"run": run, "bytes_per_sample": c["bytes_per_sample"], "head_bytes": c["head_bytes"],
                     "vs_nemo": c["bytes_per_sample"] / nemo,
                     "vs_baseline": c["bytes_per_sample"] / caches["baseline"]["bytes_per_sample"],
                     "val_acc_0": v.get("acc_0"), "val_tau_sim": v.get("tau_sim"), "val_loss_0": v.get("loss_0"),
                     "ref_acc_0": rv.get("acc_0"), "ref_tau_sim": rv.get("tau_sim"), "ref_loss_0": rv.get("loss_0"),
                     "train_loss": r["train"]["train_loss"], "tau": ev["tau"],
                     "tau_loss_pct": 100 * (1 - ev["tau"] / tau0), "tau_loss_ci95_pct": [lo, hi],
                     "lossless": ev["lossless"], "verify_steps": ev["verify_steps"],
                     "train_s": r["train"]["seconds"], "eval_s": ev["seconds"]})
    n_tok = caches["baseline"]["tokens"] / caches["baseline"]["samples"]
    print(f"\nNeMo layout padded to {a.max_length}: {format_bytes(nemo)}/sample; samples here average "
          f"{n_tok:.0f} tokens; draft-vocab coverage {caches['baseline']['coverage']:.1%}")
    print(f"{'run':<19}{'bytes/sample':>13}{'vs NeMo':>9}{'vs base':>9}{'val acc0':>9}{'τ_sim':>7}"
          f"{'ref acc0':>9}{'ref τsim':>9}{'ref CE0':>8}{'τ':>7}{'τ loss':>8}{'95% CI':>16}{'lossless':>9}")
    for r in rows:
        ci = f"[{r['tau_loss_ci95_pct'][0]:+.1f},{r['tau_loss_ci95_pct'][1]:+.1f}]" if r["run"] != "baseline" else ""
        print(f"{r['run']:<19}{format_bytes(r['bytes_per_sample']):>13}{r['vs_nemo']:>8.3f}x{r['vs_baseline']:>8.3f}x"
              f"{r['val_acc_0']:>9.3f}{r['val_tau_sim']:>7.3f}{r['ref_acc_0']:>9.3f}{r['ref_tau_sim']:>9.3f}"
              f"{r['ref_loss_0']:>8.3f}{r['tau']:>7.3f}{r['tau_loss_pct']:>+7.1f}%{ci:>16}{str(r['lossless']):>9}")
    for r in rows:
        if r["head_bytes"]:
            print(f"  {r['run']}: plus a fixed {format_bytes(r['head_bytes'])} head.safetensors per cache "
                  f"(final norm + draft-vocab lm_head rows)")
    return {"settings": {k: v for k, v in vars(a).items()}, "nemo_padded_bytes_per_sample": nemo,
            "mean_tokens": n_tok, "caches": caches, "rows": rows,
            "runs": {k: {**v, "eval": {kk: vv for kk, vv in v["eval"].items() if kk != "per_prompt"}}
                     for k, v in results.items()}}


if __name__ == "__main__":
    main()
