"""Held-out accept length of our draft vs vLLM speculators 0.9.0's, same data and steps (issue 10).

    .venv/bin/python bench/quality_vs_peers.py [--quick] [--train 300] [--epochs 4] [--prompts 12] [--seeds 0,1]

One run, on the embedded SmolLM2-135M-Instruct target:
  1. conversations: short demo ShareGPT ones (core.data.demo.write_demo_subset), or --data (any chat
     dataset, e.g. a regenerated folder); the first --prompts are held out first
     (core.data.holdout.reserve_heldout, as `eagle run` does) and every later stage reads the
     data with that file as `exclude`: neither draft trains on an evaluation prompt;
  2. one offline cache (core.cache.build_cache) of the next --train conversations: aux states bf16
     and the target's final hidden state (before its final norm), so both trainers read the very
     same numbers (ours turns the hidden state into draft-vocab probabilities through the stored
     head; speculators' forward applies the verifier's norm and head itself);
  3. ours: core.train.train on that cache (offline, --ours-head-init, soft CE, decay 0.8);
  4. theirs: bench/peer_speculators_train.py in the speculators venv (bench/peers.py installs it):
     their Eagle3DraftModel (from_training_args with the target folder as verifier: frozen lm_head
     from the target's head rows of the draft vocab, frozen embeddings), their alignment, packing
     and kl_div loss, on the documents of every one of our optimizer steps, in our order;
  5. both with the same AdamW (betas 0.9/0.95, no weight decay), learning rate, warmup + cosine
     schedule, gradient clipping, seed, TTT length and step count; fp32 on CPU;
  6. our run exported (core.export.export_draft, last checkpoint), theirs converted from their
     saved format (core.export.convert_checkpoint); both measured by core.evaluate.evaluate (real
     chain speculative decoding against the target, greedy, k=3, lossless checked) on the same
     held-out prompts.
Steps 3-6 run once per seed (--seeds; default --seed): a seed sets both trainers' initialisation
and the shared step order. Prints τ of each per seed (bonus token counted), per-position
acceptance, the ratio ours/theirs of τ pooled over seeds with a 95% bootstrap interval (prompts
resampled paired; with several seeds each side's seeds too, so training noise widens it: one seed
alone moves τ by about 2% here), and training throughput of each (timings depend on machine load;
τ does not). Before measuring, the converted speculators draft
is checked against theirs (step-0 logits of their reloaded checkpoint). A peer that cannot install
or run: exit 1, one line.

Cost: `--train 96 --epochs 4 --prompts 8 --max-new-tokens 48` took 43 min on a busy shared 2-core
machine (cache 6.5 min, each trainer 8-9 min, evaluation of both 19 min); the first call also
installs the speculators venv (about 5 min, 1.4 GB). `--data <a demo's regen/> --train 180 --epochs 10
--ttt 1 --lr 1e-3 --seeds 0,1` (the demo's recipe, about 400 steps per draft) took 117 min beside
other jobs; alone, each trainer takes 4-8 min and each evaluation about 4.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
from cache_accept import work_folder  # noqa: E402

CACHE_OPTIONS = dict(aux_dtype="bf16", target_store="hidden", target_dtype="bf16")


def say(msg: str) -> None:
    print(msg, flush=True)


# ---- data, held-out prompts, cache --------------------------------------------------------------
def prepare_data(a: argparse.Namespace, work: Path) -> tuple[str, Path]:
    from core.data.demo import write_demo_subset
    from core.data import DataSpec
    from core.data.holdout import reserve_heldout

    if a.data:
        data = a.data
    else:  # the held-out prompts come first, then the training conversations, plus spare rows
        data = str(write_demo_subset(work / "conversations.jsonl", a.prompts + a.train + 16, a.max_chars))
    heldout = work / "heldout.jsonl"
    reserve_heldout(DataSpec(source=data, shuffle_seed=a.shuffle_seed), a.prompts, heldout)
    return data, heldout


def build_features(a: argparse.Namespace, target: Path, data: str, heldout: Path, work: Path) -> dict:
    from core.cache import CacheConfig, build_cache

    cfg = CacheConfig(target=str(target), data=data, output_dir=str(work / "cache"), limit=a.train,
                      shuffle_seed=a.shuffle_seed, exclude=str(heldout),
                      draft_vocab_size=a.draft_vocab_size, max_length=a.max_length, shard_size=64,
                      batch_tokens=max(2048, a.max_length), device="cpu", **CACHE_OPTIONS)
    res = build_cache(cfg.validate())
    return {"dir": cfg.output_dir, "samples": res.samples, "tokens": res.tokens,
            "coverage": res.coverage, "seconds": res.seconds}


# ---- one schedule for both trainers -------------------------------------------------------------
def our_schedule(cache: str, a: argparse.Namespace, seed: int) -> tuple[list[list[int]], int]:
    """The cache sample ids of every optimizer step, as core.train's offline run orders them
    (its split, packing and seeded epochs: core.train.inputs.load_offline + BatchPlan)."""
    from core.cache import CacheReader
    from core.train.data import BatchPlan, OfflineSource, cache_lengths, split_indices

    reader = CacheReader(cache)
    train_idx, _ = split_indices(len(reader), 0.0, seed)
    src = OfflineSource(reader, train_idx, a.max_length, cache_lengths(reader))
    plan = BatchPlan(src.lengths, 2 * a.max_length, seed)
    plan.check_not_empty("training")
    total = a.steps or plan.total_steps(a.epochs)
    steps = []
    for s in range(total):
        (mb,) = plan.step(s).micro_batches  # one process, grad_accum 1: one packed row per step
        steps.append([src.sample_ids[j] for j in mb])
    return steps, sum(src.lengths[j] for s in range(total) for j in plan.step(s).micro_batches[0])


def write_peer_features(cache: str, steps: list[list[int]], path: Path, max_length: int) -> None:
    """The cache's samples as stored (bf16 aux and final hidden state, no requantisation) and
    the step schedule, in the layout bench/peer_speculators_train.py reads."""
    import torch
    from safetensors.torch import save_file

    from core.cache import CacheReader

    reader = CacheReader(cache)
    out: dict[str, torch.Tensor] = {"t2d": reader.vocab.t2d.to(torch.bool).contiguous(),
                                    "d2t": reader.vocab.d2t.to(torch.int64).contiguous()}
    for i in sorted({i for s in steps for i in s}):
        r = reader.raw(i)
        n = min(int(r["input_ids"].shape[0]), max_length)  # OfflineSource truncates the same way
        out[f"{i}.input_ids"] = r["input_ids"][:n].to(torch.int64).contiguous()
        out[f"{i}.loss_mask"] = r["loss_mask"][:n].to(torch.int64).contiguous()
        out[f"{i}.aux"] = r["aux_hidden"][:n].contiguous()
        out[f"{i}.final_hidden"] = r["final_hidden"][:n].contiguous()
    flat = [i for s in steps for i in s]
    offsets = [0]
    for s in steps:
        offsets.append(offsets[-1] + len(s))
    out["schedule"] = torch.tensor(flat, dtype=torch.int64)
    out["schedule_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    save_file(out, str(path))


# ---- the two trainers ---------------------------------------------------------------------------
def train_ours(a: argparse.Namespace, seed: int, cache: str, total: int, work: Path) -> dict[str, Any]:
    from core.train import TrainConfig, train

    cfg = TrainConfig(output_dir=str(work / "run-ours"), cache=cache, max_length=a.max_length,
                      ttt_length=a.ttt, lr=a.lr, warmup_ratio=a.warmup_ratio, max_steps=total,
                      max_tokens_per_batch=2 * a.max_length, val_fraction=0.0, seed=seed,
                      head_init=a.ours_head_init, freeze_head=a.ours_freeze_head,
                      feature_noise=a.ours_feature_noise,
                      grad_clip=a.grad_clip, save_every=total, eval_every=total,
                      tensorboard=False, device="cpu")
    t0 = time.perf_counter()
    res = train(cfg.validate())
    return {"run_dir": res.run_dir, "steps": res.steps, "tokens": res.tokens,
            "seconds": time.perf_counter() - t0, "tokens_per_s": res.tokens_per_s,
            "train_loss": res.train_metrics.get("loss"), "warmup_steps": math.ceil(a.warmup_ratio * total)}


def train_peer(a: argparse.Namespace, seed: int, features: Path, target: Path, aux: list[int], total: int,
               work: Path) -> dict[str, Any]:
    out = work / "peer-speculators"
    args = ["train", "--features", features, "--target", target, "--output", out,
            "--ttt-steps", a.ttt, "--lr", a.lr, "--warmup", math.ceil(a.warmup_ratio * total),
            "--total", total, "--steps", total, "--grad-clip", a.grad_clip, "--seed", seed,
            "--aux-layers", ",".join(str(i + 1) for i in aux),  # theirs: residual entering layer i
            "--log-every", max(1, total // 5)]
    t0 = time.perf_counter()
    res = peers.run_peer_script(args, timeout=a.peer_timeout, log=say, stream=True)
    res["wall_seconds"] = time.perf_counter() - t0
    return res


# ---- export and measurement ---------------------------------------------------------------------
def export_ours(run_dir: str, target: Path, work: Path) -> str:
    from core.export import ExportConfig, export_draft

    out = work / "export-ours"
    export_draft(ExportConfig(source=run_dir, output_dir=str(out), target=str(target), checkpoint="latest"))
    return str(out)


def export_peer(ckpt: str, target: Path, work: Path) -> tuple[str, list[str]]:
    from core.export import ConvertConfig, convert_checkpoint

    out = work / "export-speculators"
    res = convert_checkpoint(ConvertConfig(source=ckpt, output_dir=str(out), target=str(target)))
    return str(out), res.fixes


def check_conversion(ckpt: str, export: str, features: Path, target: Path, work: Path) -> float:
    """Largest |logit| difference between their reloaded draft and our converted export on one
    training document (step 0): a wrong conversion would show up as lost τ, not as an error."""
    import torch
    from safetensors.torch import load_file

    from core.model import Eagle3Draft

    out = work / "peer-logits.safetensors"
    peers.run_peer_script(["logits", "--features", features, "--target", target, "--output", ckpt,
                           "--logits", out], timeout=600, log=say)
    ref = load_file(str(out))
    cfg = json.loads((target / "config.json").read_text())
    draft = Eagle3Draft.from_pretrained(export, target_num_layers=int(cfg["num_hidden_layers"]),
                                        dtype=torch.float32)
    ids, aux = ref["input_ids"], ref["aux"]
    n = ids.numel() - 1
    with torch.no_grad():
        logits, _ = draft.decode_step(ids[1:][None], draft.project_aux(aux[:-1][None]),
                                      torch.arange(1, n + 1)[None])
    return float((logits[0] - ref["logits"]).abs().max())


def measure(draft: str, target: Path, heldout: Path, a: argparse.Namespace) -> dict[str, Any]:
    from core.evaluate import EvalConfig, evaluate

    t0 = time.perf_counter()
    rep = evaluate(EvalConfig(target=str(target), draft=draft, data=str(heldout), num_prompts=a.prompts,
                              num_draft_tokens=3, max_new_tokens=a.max_new_tokens, device="cpu",
                              dtype="float32"))
    s = rep["summary"]
    return {"tau": s["tau"], "accept_rate": s["accept_rate"], "lossless": s["lossless"],
            "prompt_set": s.get("prompt_set"), "seconds": time.perf_counter() - t0,
            "per_prompt": [{"index": p["index"], "accepted_drafts": p["accepted_drafts"]} for p in rep["prompts"]]}


def per_position(rows: list[dict], k: int = 3) -> list[float]:
    """Fraction of verification steps whose draft token i was accepted (i = 1..k)."""
    steps = [d for r in rows for d in r["accepted_drafts"]]
    return [sum(d >= i for d in steps) / max(1, len(steps)) for i in range(1, k + 1)]


def one_seed(a: argparse.Namespace, seed: int, cache: str, target: Path, heldout: Path, aux: list[int],
             work: Path) -> dict[str, Any]:
    """Both trainers on the same schedule for `seed` (its split and packing order, both inits and
    noise), both drafts exported and measured on the held-out prompts."""
    work.mkdir(parents=True)
    steps, sched_tokens = our_schedule(cache, a, seed)
    total = len(steps)
    say(f"seed {seed}: {total} optimizer steps ({sched_tokens} tokens)")
    features = work / "peer-features.safetensors"
    write_peer_features(cache, steps, features, a.max_length)

    say("training ours ...")
    ours_tr = train_ours(a, seed, cache, total, work)
    if ours_tr["tokens"] != sched_tokens:  # the peer's schedule must be the one ours ran
        raise SystemExit(f"error: our run trained on {ours_tr['tokens']} tokens, the schedule "
                         f"handed to the peer holds {sched_tokens}")
    say(f"  ours: {total} steps in {ours_tr['seconds']:.0f}s ({ours_tr['tokens_per_s']:.0f} tokens/s)")
    say("training speculators ...")
    peer_tr = train_peer(a, seed, features, target, aux, total, work)
    say(f"  speculators: {peer_tr['steps']} steps in {peer_tr['seconds']:.0f}s "
        f"({peer_tr['tokens_per_s']:.0f} tokens/s)")

    ours_dir = export_ours(ours_tr["run_dir"], target, work)
    peer_dir, fixes = export_peer(peer_tr["output"], target, work)
    say(f"exported ours -> {ours_dir}; converted speculators' -> {peer_dir} ({'; '.join(fixes)})")
    diff = check_conversion(peer_tr["output"], peer_dir, features, target, work)
    if not diff < 1e-3:
        raise SystemExit(f"error: the converted speculators draft differs from theirs (step-0 "
                         f"logits up to {diff:.3g} apart): the comparison would be unfair")
    say(f"  conversion checked: step-0 logits equal to theirs within {diff:.1e}")
    say("measuring both on the held-out prompts ...")
    ev = {"ours": measure(ours_dir, target, heldout, a), "speculators": measure(peer_dir, target, heldout, a)}
    say(f"  seed {seed}: τ ours {ev['ours']['tau']:.3f}, speculators {ev['speculators']['tau']:.3f}")
    features.unlink()  # hundreds of MB per seed; the schedule is rebuilt from the cache and the seed
    return {"seed": seed, "steps": total, "schedule_tokens": sched_tokens, "eval": ev,
            "train": {"ours": ours_tr, "speculators": peer_tr}, "convert_fixes": fixes,
            "convert_max_logit_diff": diff}


def runs_tau(runs: list[list[dict]], seeds: list[int] | None = None, pick: list[int] | None = None) -> float:
    """τ over every verification of the chosen seeds' runs on the chosen prompts (default: all)."""
    from core.evaluate.report import pooled_tau

    seeds = range(len(runs)) if seeds is None else seeds
    return pooled_tau([d for s in seeds for i in (range(len(runs[s])) if pick is None else pick)
                       for d in runs[s][i]["accepted_drafts"]]) or 1.0


def ratio_interval(ours: list[list[dict]], theirs: list[list[dict]], n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of τ(ours) / τ(theirs). Each side holds one run per seed, each run its
    per-prompt accepted counts. Prompts are resampled paired (the same prompts for both sides);
    with several seeds each side's seeds are resampled too, so training noise widens the interval."""
    from core.evaluate.report import bootstrap_interval, resample

    def ratio(rng) -> float:
        pick = resample(rng, len(ours[0]))
        so, st = resample(rng, len(ours)), resample(rng, len(theirs))
        return runs_tau(ours, so, pick) / runs_tau(theirs, st, pick)

    return bootstrap_interval(ratio, n)


# ---- main ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--data", default=None, help="chat dataset (file or folder, e.g. a regenerated one); "
                                                 "default: short demo ShareGPT conversations")
    ap.add_argument("--shuffle-seed", type=int, default=None, help="shuffle --data before holding out")
    ap.add_argument("--train", type=int, default=None, help="training conversations (default 300, quick 48)")
    ap.add_argument("--epochs", type=int, default=None, help="passes over them (default 4, quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    ap.add_argument("--prompts", type=int, default=None, help="held-out eval prompts (default 12, quick 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per prompt (default 64, quick 32)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-chars", type=int, default=1200, help="longest demo conversation, characters")
    ap.add_argument("--draft-vocab-size", type=int, default=8192)
    ap.add_argument("--ttt", type=int, default=3, help="TTT length of both (speculators' default 3)")
    ap.add_argument("--lr", type=float, default=5e-4, help="both (the demo's small-data rate)")
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--grad-clip", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma-separated: train both per seed (e.g. 0,1,2), so the "
                                                  "ratio's interval includes training noise (default: --seed)")
    ap.add_argument("--ours-head-init", choices=["random", "target"], default="random",
                    help="our recipe's head (the demo's default: random)")
    ap.add_argument("--ours-freeze-head", action="store_true")
    ap.add_argument("--ours-feature-noise", type=float, default=0.0,
                    help="ours only: train.feature_noise (the peer has no such option)")
    ap.add_argument("--peer-timeout", type=float, default=4 * 3600)
    ap.add_argument("--workdir", default=None, help="keep everything here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    a = ap.parse_args()
    q = a.quick
    a.train = a.train or (48 if q else 300)
    a.epochs = a.epochs or (2 if q else 4)
    a.prompts = a.prompts or (4 if q else 12)
    a.max_new_tokens = a.max_new_tokens or (32 if q else 64)
    try:
        seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    except ValueError:
        ap.error(f"--seeds: {a.seeds!r} is not a comma-separated list of integers")
    if len(set(seeds)) != len(seeds):
        ap.error(f"--seeds: {a.seeds!r} names a seed twice")

    import torch

    try:  # the peer first: nothing heavy runs when it cannot
        peer = peers.ensure_speculators(say)
    except peers.PeerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from core.assets import demo_target

    t_all = time.perf_counter()
    target = demo_target()
    with work_folder(a.workdir, "quality-vs-peers-") as work:
        try:
            data, heldout = prepare_data(a, work)
            cache = build_features(a, target, data, heldout, work)
            from core.cache import CacheReader

            aux = list(CacheReader(cache["dir"]).target_info["aux_layer_ids"])
            say(f"SmolLM2-135M-Instruct; {cache['samples']} training conversations ({cache['tokens']} tokens, "
                f"max length {a.max_length}), draft vocab {a.draft_vocab_size} (coverage {cache['coverage']:.1%}), "
                f"TTT {a.ttt}, lr {a.lr} warmup {a.warmup_ratio} cosine, AdamW 0.9/0.95, clip {a.grad_clip}; "
                f"seeds {seeds}; {a.prompts} held-out prompts x {a.max_new_tokens} tokens, k=3 greedy; "
                f"torch threads {torch.get_num_threads()}")
            runs = [one_seed(a, seed, cache["dir"], target, heldout, aux, work / f"seed-{seed}") for seed in seeds]
        except peers.PeerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    ours, theirs = ([r["eval"][side]["per_prompt"] for r in runs] for side in ("ours", "speculators"))
    ratio = runs_tau(ours) / runs_tau(theirs)
    r_lo, r_hi = ratio_interval(ours, theirs)
    say("")
    say(f"{'draft':<13}{'seed':>5}{'τ':>7}{'accept/position (1..3)':>26}{'lossless':>10}{'train tok/s':>13}")
    for r in runs:
        for side in ("ours", "speculators"):
            e, tr = r["eval"][side], r["train"][side]
            pp = " / ".join(f"{x:.2f}" for x in per_position(e["per_prompt"]))
            say(f"{side:<13}{r['seed']:>5}{e['tau']:>7.3f}{pp:>26}{str(e['lossless']):>10}{tr['tokens_per_s']:>13.0f}")
    say("  (train tok/s: each trainer's own step clock, reading and target computation included, one "
        "run each under whatever load the machine had; bench/train.py is the speed comparison)")
    over = f"{len(ours[0])} prompts" + (f" and {len(seeds)} seeds per side" if len(seeds) > 1 else "")
    say(f"ratio ours / speculators: {ratio:.3f}x (τ {runs_tau(ours):.3f} vs {runs_tau(theirs):.3f}; 95% "
        f"bootstrap over {over}: [{r_lo:.3f}, {r_hi:.3f}]); goal >= 1.15x")
    say(f"wall time {(time.perf_counter() - t_all) / 60:.1f} min (peer venv {peer['venv']})")
    if a.json:
        report = {"settings": vars(a), "cache": cache, "runs": runs, "ratio": ratio,
                  "ratio_ci95": [r_lo, r_hi], "peer": peer}
        Path(a.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
