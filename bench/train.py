"""Draft-training throughput and peak memory on CPU: our TTT step vs speculators 0.9.0's real step,
and vs a plain anchor-style step, on the same documents.

    .venv/bin/python bench/train.py [--samples 24] [--seq 512] [--ttt 3] [--rounds 3] [--no-plain] [--random]

Ours vs speculators 0.9.0 (the number issue 13 asks for): each implementation trains the same
steps (--docs-per-step documents packed into one row per step, assistant-only supervision, the same
groups in the same order) in a subprocess of its own: speculators' real model class, alignment,
packing and kl_div loss (with our TTT decay 0.8; KL and our soft cross-entropy differ by the target's
entropy, a constant: same gradients) in its pinned venv (bench/peers.py installs it once, 1.4 GB), ours
through core.model.ttt; AdamW with the same settings and the same clipping on both sides. One
untimed warm-up step each, then the
timed steps; reading and collating a step's documents stay outside the clock on both sides, and
each process holds only the current step's documents. Tokens/s and peak RSS (VmHWM reset after the
warm-up) per run; --rounds runs of each, alternating which goes first, and the ratio of the medians.

Plain (second row, in-process, skipped with --no-plain; slow): what the anchors' training step does,
written out in bench/train_steps.py: each document padded to the longest in the batch, full-vocabulary target logits
restricted to the draft vocab inside every TTT step, logits for every position, the explicit full
mask over the concatenated keys of all steps. Same documents per step and the same loss (asserted).

Features (bench/train_features.py): real SmolLM2-135M-Instruct features of demo ShareGPT
conversations (core.assets, core.features) when available, else random tensors of the same shapes
(--random, or as a fallback; the output says which). They are computed once and kept in <repo>/.cache/eagle/bench/.

For a clean number: a quiet machine (nothing else running: check `uptime`), --threads 2 (the
default: min(2, cores)), `--rounds 5 --no-plain`; the last line is JSON with every run. The
machine's load average before and after is printed with the result: a loaded machine mostly
measures the scheduler.

Our worker runs the step as `eagle train` does on CPU: the automatic CPU choices of core.model (head
gradients made in the forward pass, the fused attention path), AdamW's fused CPU kernel
(core.train.loop.adamw_impl; speculators' script uses torch's default AdamW) and core.train.cpualloc's
malloc settings (large freed blocks kept for reuse). EAGLE_CPU_MALLOC=0 / EAGLE_CPU_ADAMW=loop
measure ours without those; --peer-malloc gives speculators' process the same malloc settings, so
the ratio then shows what the step itself gains. EAGLE_COMPILE_DRAFT=1 adds torch.compile'd layer
blocks (core.model.compile; the compile time falls in the warm-up step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # train_features, train_steps, peers

from core.model.ttt import ttt_forward_loss  # noqa: E402
from core.train.loop import adamw_impl  # noqa: E402
from train_features import full_logits, groups_of, make_features, new_draft  # noqa: E402
from train_steps import baseline_ttt_loss, pack_docs  # noqa: E402

# ---- timing (interleaved, one process) and memory (one subprocess per implementation) --------
class Trainer:
    """One implementation's training step (forward, backward, clip, AdamW) on its own draft copy."""

    def __init__(self, impl: str, feats: dict, args):
        self.impl, self.feats, self.args = impl, feats, args
        self.draft = new_draft(feats, args.draft_vocab)
        # ours: the AdamW train() uses on CPU (core.train.loop.adamw_impl); plain: the default one
        impl = adamw_impl(torch.device("cpu")) if impl == "ours" else {}
        self.opt = torch.optim.AdamW([p for p in self.draft.parameters() if p.requires_grad], lr=1e-4,
                                     betas=(0.9, 0.95), weight_decay=0.0, **impl)

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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=24, help="documents (default 24: 6 steps of 4)")
    p.add_argument("--seq", type=int, default=512, help="longest document, tokens")
    p.add_argument("--ttt", type=int, default=3, help="TTT unroll length")
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--docs-per-step", type=int, default=4, help="documents packed into one step's row")
    p.add_argument("--repeat", type=int, default=1, help="passes over the documents per timed run")
    p.add_argument("--mem-steps", type=int, default=2, help="plain row: steps of its peak-RSS subprocesses")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="torch threads for every implementation (default: min(2, cores))")
    p.add_argument("--random", action="store_true", help="random features of SmolLM2 shapes instead of real ones")
    p.add_argument("--rounds", type=int, default=3,
                   help="ours vs speculators: subprocess runs of each, alternating (medians are compared)")
    p.add_argument("--no-plain", action="store_true", help="skip the in-process plain anchor-style row (slow)")
    p.add_argument("--no-peer", action="store_true", help="skip speculators 0.9.0's step (its own venv)")
    p.add_argument("--json", help="also write the result (every run) to this file")
    p.add_argument("--peer-malloc", action="store_true",
                   help="give speculators' process the malloc settings our CPU training uses "
                        "(core.train.cpualloc, via GLIBC_TUNABLES): isolates what our step itself gains")
    p.add_argument("--worker", choices=["ours", "plain", "ours-speed"], help=argparse.SUPPRESS)
    p.add_argument("--features", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "ours-speed":
        return speed_worker(args)
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

    result: dict = {"features": source, "threads": args.threads, "seq": args.seq, "ttt": args.ttt,
                    "draft_vocab": args.draft_vocab, "docs_per_step": args.docs_per_step}
    if not args.no_peer:
        result["vs_speculators"] = peer_rounds(args, feats, docs, cache, tag)
    if not args.no_plain:
        result["vs_plain"] = plain_row(args, feats, docs, features)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def plain_row(args, feats: dict, docs: list, features: Path) -> dict:
    """Ours vs the plain anchor-style step, in-process and interleaved step by step."""
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
    return {"ratio_tokens_per_s": speed, "ratio_peak_rss": mem,
            "tokens_per_s": {k: timing[k]["tokens_per_s"] for k in timing},
            "peak_rss_mb": {k: memory[k]["peak_rss_mb"] for k in memory}}


def write_ours_features(path: Path, feats: dict) -> None:
    """Per-document tensors for the ours-speed worker (read lazily, a step's documents at a time)."""
    from safetensors.torch import save_file

    out = {"t2d": feats["t2d"].bool().contiguous(), "d2t": feats["d2t"].long().contiguous()}
    for i, d in enumerate(feats["docs"]):
        for key in ("input_ids", "aux_hidden", "target_probs", "position_mask", "loss_mask"):
            out[f"{i}.{key}"] = d[key].contiguous()
    save_file(out, str(path))


def speed_worker(args) -> None:
    """Our step the way the peer script's `speed` mode runs theirs: --warmup untimed steps, then
    --steps timed ones (cycling over the groups), only the current step's documents in memory,
    peak RSS (VmHWM) reset after the warm-up."""
    import gc

    from safetensors import safe_open

    torch.set_num_threads(args.threads)
    from core.train.cpualloc import keep_freed_memory

    keep_freed_memory()  # as train() does on CPU (EAGLE_CPU_MALLOC=0: not)
    f = safe_open(args.features, framework="pt")
    feats = {"t2d": f.get_tensor("t2d"), "d2t": f.get_tensor("d2t")}
    n_docs = len({k.split(".")[0] for k in f.keys() if k.endswith(".input_ids")})
    groups = groups_of(list(range(n_docs)), args.docs_per_step)
    keys = ("input_ids", "aux_hidden", "target_probs", "position_mask", "loss_mask")
    trainer = Trainer("ours", feats, args)

    def prepared(s: int):
        docs = [{k: f.get_tensor(f"{i}.{k}") for k in keys} for i in groups[s % len(groups)]]
        return trainer.inputs(docs), sum(int(d["input_ids"].numel()) for d in docs)

    for s in range(args.warmup):
        trainer.step(prepared(s)[0])
    gc.collect()
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    losses, tokens, seconds = [], 0, 0.0
    for s in range(args.warmup, args.warmup + args.steps):
        x, n = prepared(s)
        t0 = time.perf_counter()
        losses.append(trainer.step(x))
        seconds += time.perf_counter() - t0
        tokens += n
        del x
    print(json.dumps({"impl": "ours", "tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
                      "steps": args.steps, "peak_rss_mb": _vm("VmHWM"), "rss_before_mb": before,
                      "losses": losses, "threads": torch.get_num_threads()}))


def run_ours_speed(args, features: Path, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "ours-speed", "--features", str(features),
           "--seq", str(args.seq), "--ttt", str(args.ttt), "--draft-vocab", str(args.draft_vocab),
           "--docs-per-step", str(args.docs_per_step), "--steps", str(steps), "--warmup", "1",
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"ours speed worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# core.train.cpualloc's malloc settings, as glibc tunables for a process we do not control
PEER_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def peer_rounds(args, feats: dict, docs: list, cache: Path, tag: str) -> dict:
    """ours vs speculators 0.9.0, --rounds subprocess runs each, alternating; medians."""
    import statistics

    from bench.peers import PeerError, speculators_step_speed, write_peer_features
    from core.assets import demo_target

    ours_file, peer_file = cache / f"train-ours-{tag}.safetensors", cache / f"train-peer-{tag}.safetensors"
    if not ours_file.exists():
        write_ours_features(ours_file, feats)
    if not peer_file.exists():
        write_peer_features(peer_file, docs, feats["t2d"], feats["d2t"])
    steps = len(groups_of(docs, args.docs_per_step)) * args.repeat
    runs: dict[str, list[dict]] = {"ours": [], "speculators": []}
    load_before = _load()
    for r in range(args.rounds):
        for impl in (("ours", "speculators") if r % 2 == 0 else ("speculators", "ours")):
            if impl == "ours":
                res = run_ours_speed(args, ours_file, steps)
            else:
                if args.peer_malloc:  # the same allocator setting for their process (glibc tunables)
                    os.environ["GLIBC_TUNABLES"] = PEER_TUNABLES
                try:
                    res = speculators_step_speed(docs, feats["t2d"], feats["d2t"], target=demo_target(),
                                                 docs_per_step=args.docs_per_step, ttt_steps=args.ttt,
                                                 steps=steps, warmup=1, threads=args.threads,
                                                 features=peer_file, decay=0.8)
                except PeerError as e:
                    raise SystemExit(f"error: speculators 0.9.0 could not run: {e}")
                finally:
                    os.environ.pop("GLIBC_TUNABLES", None) if args.peer_malloc else None
            runs[impl].append(res)
            print(f"  round {r + 1}/{args.rounds} {impl:>11}: {res['tokens_per_s']:7.1f} tokens/s, "
                  f"peak RSS {res['peak_rss_mb']:6.0f} MB (before {res['rss_before_mb']:.0f} MB), "
                  f"load {_load()}", flush=True)
    med = {impl: {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                  "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs)} for impl, rs in runs.items()}
    for impl, m in med.items():
        print(f"{impl:>17}: median {m['tokens_per_s']:8.1f} tokens/s, median peak RSS {m['peak_rss_mb']:6.0f} MB "
              f"over {args.rounds} runs of {steps} steps")
    speed = med["ours"]["tokens_per_s"] / med["speculators"]["tokens_per_s"]
    mem = med["ours"]["peak_rss_mb"] / med["speculators"]["peak_rss_mb"]
    print(f"ratio vs speculators 0.9.0: {speed:.2f}x tokens/s, {mem:.2f}x peak RSS (goal >= 1.5x at <= 1.0x; "
          f"medians of {args.rounds} alternating runs; load average before {load_before}, after {_load()})")
    return {"ratio_tokens_per_s": speed, "ratio_peak_rss": mem, "medians": med, "runs": runs,
            "load_before": load_before, "load_after": _load(), "threads": args.threads}


if __name__ == "__main__":
    main()
