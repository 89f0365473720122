"""Aggregate per-prompt speculative decoding results into the eval report.

Definitions (documented in the report itself):
  tau                  mean accept length per verification step, the target's bonus token included
                       (SGLang's "accept length"); the prefill's first token is not a verify step.
  accept_rate[i]       fraction of verification steps whose draft token i+1 was accepted
                       (then every earlier one was too); conditional_accept_rate[i] divides by the
                       steps that reached position i.
  cost_ratio c         time of one single-position draft step / time of one single-token target
                       decode forward, both measured here with KV caches.
  implied_speedup      tau / (1 + k * c): an iteration costs k draft steps plus one target forward
                       that verifies k+1 tokens (about the cost of one decode forward on a GPU, where
                       decoding is memory-bound) and yields tau tokens; plain decoding yields one
                       token per target forward.
  measured_speedup     wall-clock tokens/s of speculative decoding / of plain greedy decoding on this
                       machine (on a CPU the verify forward of k+1 tokens costs more than one decode
                       forward, so this is below the implied number).
  measured_speedup_interval  95% paired bootstrap over prompts of the measured speedup.
"""

from __future__ import annotations

import math
import random
from statistics import mean
from typing import Any, Callable

DEFINITIONS = {
    "tau": "mean accept length per verification step, bonus token included (as SGLang counts it)",
    "accept_rate": "fraction of verification steps that accepted draft position i+1",
    "conditional_accept_rate": "accepted at position i+1 / reached position i+1",
    "cost_ratio": "one single-position draft step time / one single-token target decode forward time",
    "implied_speedup": "tau / (1 + k * cost_ratio)",
    "measured_speedup": "speculative tokens/s / plain greedy tokens/s, wall clock on this machine",
    "tau_sim": "training's simulated τ (teacher-forced) on its validation share, the last one logged "
               "up to the measured checkpoint",
    "tau_sim_train": "the same on the run's own training batches over their last epoch: far above tau_sim "
                     "means the draft memorizes its data (more data is the lever)",
    "tau_interval": "95% bootstrap interval over prompts of tau: how far other prompts like these could move it",
    "measured_speedup_interval": "95% paired-bootstrap interval over prompts of measured_speedup",
    "by_k": "tau and measured speedup at each k of --compare-k (and the main k), the same prompts and "
            "greedy references; fastest_k is the k with the highest measured speedup",
}


def _safe_mean(xs: list[float]) -> float | None:
    return mean(xs) if xs else None


def accepted_counts(accepted: list[int], k: int) -> dict[str, Any]:
    """Verifications, accepted draft tokens and accepted tokens per draft position from the number of
    accepted draft tokens (0..k) of every verification: what an engine's spec-decode counters count."""
    return {"drafts": len(accepted), "accepted": sum(accepted),
            "accepted_per_pos": [sum(1 for n in accepted if n > i) for i in range(k)]}


def pooled_tau(accepted: list[int]) -> float | None:
    """τ (bonus token counted) over every verification, from each one's accepted draft tokens (0..k);
    pooled, so a prompt weighs by its verifications, as an engine's counters weigh it."""
    return (sum(accepted) + len(accepted)) / len(accepted) if accepted else None


def acceptance(accepted: list[int], k: int) -> dict[str, Any]:
    """τ (bonus token counted) and acceptance per draft position from the number of accepted
    draft tokens (0..k) of every verification."""
    c = accepted_counts(accepted, k)
    steps, per_pos = c["drafts"], c["accepted_per_pos"]
    reached = [steps, *per_pos[:-1]]  # verifications that got to position i: n >= i, i.e. n > i - 1
    return {
        "tau": pooled_tau(accepted),
        "verify_steps": steps,
        "accept_rate": [a / steps if steps else None for a in per_pos],
        "conditional_accept_rate": [(a / r) if r else None for a, r in zip(per_pos, reached)],
    }


def tokens_per_s(runs: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(speculative, plain greedy) tokens per second of wall clock over the runs of prompts."""
    def rate(tokens: str, wall: str) -> float | None:
        seconds = sum(r[wall] for r in runs)
        return sum(r[tokens] for r in runs) / seconds if seconds > 0 else None

    return rate("generated_tokens", "spec_wall_s"), rate("reference_tokens", "reference_wall_s")


def bootstrap_interval(stat: Callable[[random.Random], float], n: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval: `stat` draws one resample with the given generator (seeded,
    so a report is reproducible) and returns the statistic on it."""
    rng = random.Random(0)
    vals = sorted(stat(rng) for _ in range(n))
    return vals[int(0.025 * n)], vals[int(0.975 * n) - 1]


def resample(rng: random.Random, m: int) -> list[int]:
    """m indices drawn with replacement from range(m): one bootstrap resample of m prompts."""
    return [rng.randrange(m) for _ in range(m)]


def prompts_tau(per_prompt: list[list[int]], pick: list[int]) -> float:
    """Pooled τ of the picked prompts (a bootstrap resample may pick one twice); per_prompt holds each
    prompt's accepted draft counts per verification. 1.0 when they hold no verification."""
    return pooled_tau([a for i in pick for a in per_prompt[i]]) or 1.0


def tau_interval(per_prompt: list[list[int]], n: int = 2000) -> list[float] | None:
    """95% bootstrap interval over prompts of the pooled τ. None with fewer than two prompts that
    verified anything (no spread to measure)."""
    if len([p for p in per_prompt if p]) < 2:
        return None
    return list(bootstrap_interval(lambda rng: prompts_tau(per_prompt, resample(rng, len(per_prompt))), n))


def speedup_interval(pairs: list[tuple[int, float, int, float]], n: int = 2000) -> list[float] | None:
    """95% paired-bootstrap interval over prompts of (sum tokens_a / sum s_a) / (sum tokens_b / sum s_b),
    pairs = (tokens_a, seconds_a, tokens_b, seconds_b) per prompt: how far the prompts alone move
    a measured speedup (machine noise comes on top)."""
    def ratio(pick: list[int]) -> float:
        ta, sa, tb, sb = (sum(pairs[i][j] for i in pick) for j in range(4))
        return (ta / sa) / (tb / sb) if sa > 0 and sb > 0 and tb > 0 else math.nan

    if len(pairs) < 2 or math.isnan(ratio(list(range(len(pairs))))):
        return None
    return list(bootstrap_interval(lambda rng: ratio(resample(rng, len(pairs))), n))


def _pairs(runs: list[dict[str, Any]]) -> list[tuple[int, float, int, float]]:
    return [(r["generated_tokens"], r["spec_wall_s"], r["reference_tokens"], r["reference_wall_s"]) for r in runs]


def aggregate(prompts: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """prompts: per-prompt dicts with accepted_drafts, accept_lengths, timings, lossless fields."""
    acc = acceptance([n for p in prompts for n in p["accepted_drafts"]], k)
    tau = acc["tau"]
    t_target = _safe_mean([t for p in prompts for t in p["target_forward_times"]])
    step_times = [t for p in prompts for t in p["draft_step_times"]]
    if not step_times:  # k == 1: only the step-0 pass, use the drafting phase time
        step_times = [t / k for p in prompts for t in p["draft_times"]]
    t_draft = _safe_mean(step_times)
    c = (t_draft / t_target) if t_draft is not None and t_target else None
    implied = (tau / (1 + k * c)) if tau is not None and c is not None else None
    spec_tps, base_tps = tokens_per_s(prompts)
    mismatches = [p for p in prompts if not p["lossless"]]
    return {
        **acc,
        "tau_interval": tau_interval([p["accepted_drafts"] for p in prompts]),
        "target_forward_ms": t_target * 1e3 if t_target is not None else None,
        "draft_step_ms": t_draft * 1e3 if t_draft is not None else None,
        "verify_forward_ms": (_safe_mean([t for p in prompts for t in p["verify_times"]]) or 0) * 1e3,
        "cost_ratio": c,
        "implied_speedup": implied,
        "spec_tokens_per_s": spec_tps,
        "greedy_tokens_per_s": base_tps,
        "measured_speedup": (spec_tps / base_tps) if spec_tps and base_tps else None,
        "measured_speedup_interval": speedup_interval(_pairs(prompts)),
        "lossless": not mismatches,
        "lossless_failures": len(mismatches),
        "lossless_failures_numerical_ties": sum(1 for p in mismatches if p.get("numerical_tie")),
    }


def by_k(rows: list[dict[str, Any]], k: int, others: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """τ, acceptance and measured speedup of the main k (rows) and of every other k, in k order; all
    against the same greedy references."""
    out = []
    for kk, runs in sorted({k: rows, **others}.items()):
        acc = acceptance([n for r in runs for n in r["accepted_drafts"]], kk)
        spec_tps, base_tps = tokens_per_s(runs)
        out.append({"k": kk, "tau": acc["tau"], "tau_interval": tau_interval([r["accepted_drafts"] for r in runs]),
                    "accept_rate": acc["accept_rate"],
                    "measured_speedup": spec_tps / base_tps if spec_tps and base_tps else None,
                    "measured_speedup_interval": speedup_interval(_pairs(runs)),
                    "lossless": all(r["lossless"] for r in runs)})
    return out


def prompt_set_label(ps: dict[str, Any] | None) -> str:
    """"12 held out", "3 of 12 trained on: not held out", or "training data unknown"."""
    if not ps or ps.get("held_out") is None:
        return "training data of the draft unknown"
    if ps.get("trained_on"):
        return f"{ps['trained_on']} of {ps['count']} trained on: NOT held out"
    return f"{ps['held_out']} held out"


def interval_text(lo_hi: list[float] | None) -> str:
    """" [lo, hi]" of an interval, or nothing."""
    return f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else ""


def render_summary(report: dict[str, Any]) -> str:
    s = report["summary"]

    def f(x: Any, fmt: str = "{:.3f}") -> str:
        return "n/a" if x is None else fmt.format(x)

    lines = [
        f"prompts {report['num_prompts']} ({prompt_set_label(s.get('prompt_set'))}), "
        f"k={report['num_draft_tokens']}, greedy, device {report['device']}",
        f"tau (accept length, bonus incl.) {f(s['tau'])}{interval_text(s.get('tau_interval'))}   "
        f"tau_sim (training) {f(report.get('tau_sim'))}" + (
            f" validation, {f(report['tau_sim_train'])} its own batches (last epoch)"
            if report.get("tau_sim_train") is not None else ""),
        "accept rate by draft position: " + ", ".join(f(x, "{:.2f}") for x in s["accept_rate"]),
        f"draft step {f(s['draft_step_ms'], '{:.2f}')} ms / target forward "
        f"{f(s['target_forward_ms'], '{:.2f}')} ms = cost ratio {f(s['cost_ratio'])}",
        f"speedup measured here (wall clock, our transformers loop) {f(s['measured_speedup'], '{:.2f}')}x"
        f"{interval_text(s.get('measured_speedup_interval'))} "
        f"({f(s['spec_tokens_per_s'], '{:.1f}')} vs {f(s['greedy_tokens_per_s'], '{:.1f}')} tokens/s); "
        f"implied tau/(1+k*c) {f(s['implied_speedup'], '{:.2f}')}x",
        *([("by k, measured here on the same prompts: " + "; ".join(
            f"k={r['k']} τ {f(r['tau'])}{interval_text(r.get('tau_interval'))} {f(r['measured_speedup'], '{:.2f}')}x"
            + interval_text(r.get("measured_speedup_interval"))
            + ("" if r["lossless"] else " NOT lossless") for r in s["by_k"])
            + f"; fastest here: k={s['fastest_k']}")] if s.get("by_k") else []),
        "lossless: " + ("ok on every prompt" if s["lossless"] else
                        f"FAILED on {s['lossless_failures']} prompt(s)" if s["lossless_failures"] else
                        "FAILED at another k (see by k)"),
    ]
    for p in report["prompts"]:
        if not p["lossless"]:
            lines.append(f"  prompt {p['index']}: first difference at token {p['first_diff']} "
                         f"(target {p['expected_token']}, speculative {p['got_token']}, target top-2 "
                         f"logit margin {f(p.get('reference_margin'), '{:.2e}')}"
                         + (": a near-tie, likely batched-vs-single-token numerics)" if p.get("numerical_tie")
                            else ")"))
    return "\n".join(lines)
