"""What each training option does to held-out τ on the demo's data (issue 10, "a recipe for little data").

    .venv/bin/python bench/recipe.py --workdir eagle-demo/full [--variants baseline,head-target,...]
                                     [--select-seconds 600]

A variant may combine options with "+": `head-target-frozen+lr-1e-3`; `limit-N` trains on the cache's
first N conversations (τ against data size: `baseline,limit-48,limit-97`).
Reads a finished (or at least cached) `eagle demo` / `eagle run` workdir: its YAML, its offline
cache and its heldout.jsonl. Every variant trains a fresh draft from the same cache with the
pipeline's own settings (core.pipeline.train_config) plus the variant's overrides, chooses its
checkpoint by held-out τ on the selection prompts exactly as the pipeline does, and is measured by
`core.evaluate.evaluate` (real chain speculative decoding, greedy, lossless checked) on the same
held-out prompts after them, which nothing trained on and nothing chose by. Prints τ, acceptance
per position, training's τ_sim, the chosen step and the training minutes, and τ relative to the
first variant with a 95% paired bootstrap interval over prompts. Timings are wall clock on this
machine: quote them only from a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "head-target": {"head_init": "target"},
    "head-target-frozen": {"head_init": "target", "freeze_head": True},
    "lr-1e-3": {"lr": 1e-3},
    "lr-2e-4": {"lr": 2e-4},
    "lr-2e-3": {"lr": 2e-3},
    "epochs-20": {"epochs": 20},
    "epochs-5": {"epochs": 5},
    "epochs-8": {"epochs": 8},
    "wd-0.1": {"weight_decay": 0.1},
    "noise-0.1": {"feature_noise": 0.1},
    "noise-0.3": {"feature_noise": 0.3},
    "ttt-5": {"ttt_length": 5},
    "ttt-1": {"ttt_length": 1},
    "decay-1": {"decay": 1.0},
    "val-0": {"val_fraction": 0.0},  # the validation share trains too (checkpoints are chosen by held-out τ)
    "layers-2": {"num_layers": 2},  # two decoder layers in the draft
    "seed-1": {"seed": 1},  # the noise floor: same settings, another seed
}


def overrides_of(name: str) -> dict[str, Any]:
    """A variant's TrainConfig overrides: known parts joined by "+", and `limit-N` (the cache's
    first N conversations: τ against data size)."""
    out: dict[str, Any] = {}
    for part in name.split("+"):
        if part.startswith("limit-") and part[6:].isdigit():
            out["data_limit"] = int(part[6:])
        elif part in VARIANTS:
            out.update(VARIANTS[part])
        else:
            raise KeyError(part)
    return out


def data_curve(rows: list[dict[str, Any]], cache_samples: int) -> str | None:
    """τ against training conversations from `baseline` and its `limit-N` variants: the least-squares
    line τ = a + b log2(n), the gain per doubling b, and where the line would reach τ 2.0 (an
    extrapolation, said as one)."""
    pts = [(min(r["overrides"].get("data_limit") or cache_samples, cache_samples), r["tau"]) for r in rows
           if set(r["overrides"]) <= {"data_limit"}]
    if len({n for n, _ in pts}) < 2:
        return None
    xs, ys = [math.log2(n) for n, _ in pts], [t for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    line = ", ".join(f"{n}: {t:.3f}" for n, t in sorted(pts))
    reach = (f"τ 2.0 at about {2 ** ((2.0 - a) / b):,.0f} conversations if the line held" if b > 0
             else "τ does not grow with data here")
    return f"τ against training conversations ({line}): {b:+.3f} per doubling; {reach}"


def paired_ratio_interval(base: list[list[int]], other: list[list[int]], n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval over prompts of τ(other) / τ(base); each list holds, per prompt, the
    accepted draft counts of every verification."""
    from core.evaluate.report import bootstrap_interval, prompts_tau, resample

    def ratio(rng) -> float:
        pick = resample(rng, len(base))
        return prompts_tau(other, pick) / prompts_tau(base, pick)

    return bootstrap_interval(ratio, n)


def run_variant(name: str, overrides: dict[str, Any], cfg: Any, target: str, out: Path) -> dict[str, Any]:
    from core.evaluate import EvalConfig, evaluate
    from core.pipeline import train_config
    from core.train import train

    tc = train_config(cfg, target, resume=False).model_copy(
        update=dict(output_dir=str(out / name), tensorboard=False, **overrides)).validate()
    t0 = time.monotonic()
    res = train(tc)
    minutes = (time.monotonic() - t0) / 60
    e = cfg.eval
    rep = evaluate(EvalConfig(target=target, draft=str(out / name), data=str(cfg.heldout_path()),
                              num_prompts=e.num_prompts, num_draft_tokens=e.num_draft_tokens,
                              max_new_tokens=e.max_new_tokens, offset=cfg.train.select_prompts,
                              device=cfg.target.device, output=str(out / f"{name}.eval.json")))
    s = rep["summary"]
    return {"variant": name, "overrides": overrides, "tau": s["tau"], "accept_rate": s["accept_rate"],
            "lossless": s["lossless"], "held_out": s["prompt_set"]["held_out"],
            "tau_sim": res.val_last.get("tau_sim"), "best_step": res.best.get("step"),
            "best_selection_tau": res.best.get("tau"), "steps": res.steps, "train_minutes": round(minutes, 2),
            "measured_speedup": s["measured_speedup"], "implied_speedup": s["implied_speedup"],
            "accepted": [p["accepted_drafts"] for p in rep["prompts"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="an eagle demo / eagle run workdir with cache/ and heldout.jsonl")
    ap.add_argument("--config", help="its YAML (default: the one *.yaml next to or in the workdir)")
    ap.add_argument("--variants", default="baseline,head-target,head-target-frozen,lr-1e-3,epochs-20,ttt-5,seed-1")
    ap.add_argument("--out", help="where variant runs go (default WORKDIR/recipe)")
    ap.add_argument("--select-seconds", type=float, default=None,
                    help="time bound of each checkpoint's held-out τ (default: the config's); raise it on a "
                         "loaded machine so every selection prompt is decoded and the choice does not depend on load")
    a = ap.parse_args()

    from core.pipeline import resolve_target
    from core.runconfig import RunConfig

    wd = Path(a.workdir).resolve()
    yaml = Path(a.config) if a.config else next(iter(sorted(wd.glob("*.yaml")) or sorted(wd.parent.glob("*.yaml"))), None)
    if yaml is None:
        sys.exit(f"error: no pipeline YAML in {wd} or its parent; pass --config")
    cfg = RunConfig.load(yaml)
    if cfg.workdir_path().resolve() != wd:
        cfg.workdir = str(wd)
    if not (cfg.step_output_dir("cache") / "manifest.json").is_file() or not cfg.heldout_path().is_file():
        sys.exit(f"error: {wd} has no finished cache/ and heldout.jsonl; run the pipeline's cache step first")
    if a.select_seconds:
        cfg.train.select_seconds = a.select_seconds
    names = a.variants.split(",")
    overrides, unknown = {}, []
    for name in names:
        try:
            overrides[name] = overrides_of(name)
        except KeyError as e:
            unknown.append(e.args[0])
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}, limit-N")
    target = resolve_target(cfg.target.model)
    out = Path(a.out) if a.out else wd / "recipe"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        done = out / f"{name}.json"
        if done.is_file():  # resumable: a finished variant is not trained again
            rows.append(json.loads(done.read_text()))
        else:
            rows.append(run_variant(name, overrides[name], cfg, target, out))
            done.write_text(json.dumps(rows[-1]))
        r = rows[-1]
        print(f"{r['variant']:<20} τ {r['tau']:.3f}  per position {' / '.join(f'{x:.2f}' for x in r['accept_rate'])}"
              f"  τ_sim {r['tau_sim'] or 0:.3f}  best step {r['best_step']}  {r['train_minutes']:.1f} min",
              flush=True)
    base = rows[0]
    print(f"\nheld-out prompts: {base['held_out']} (k={cfg.eval.num_draft_tokens}, greedy, bonus counted); "
          f"ratios vs {base['variant']} with 95% paired bootstrap over prompts")
    for r in rows[1:]:
        lo, hi = paired_ratio_interval(base["accepted"], r["accepted"])
        print(f"  {r['variant']:<20} {r['tau'] / base['tau']:.3f}x  [{lo:.3f}, {hi:.3f}]")
    curve = data_curve(rows, json.loads((cfg.step_output_dir("cache") / "manifest.json").read_text())
                       ["extra"]["num_samples"])
    if curve:
        print(curve)
    (out / "summary.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "accepted"} for r in rows],
                                                 indent=1))


if __name__ == "__main__":
    main()
