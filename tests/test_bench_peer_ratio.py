"""bench/quality_vs_peers.py's ratio: τ pooled over prompts and seeds, and an interval that widens
when the seeds of one side disagree (training noise), not only when the prompts do."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    sys.path.insert(0, str(REPO / "bench"))  # it imports its neighbours (peers, cache_accept)
    try:
        spec = importlib.util.spec_from_file_location("bench_quality_vs_peers", REPO / "bench" / "quality_vs_peers.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(REPO / "bench"))


def run(per_prompt: list[list[int]]) -> list[dict]:
    return [{"index": i, "accepted_drafts": d} for i, d in enumerate(per_prompt)]


def test_ratio_pools_seeds_and_its_interval_includes_seed_noise():
    q = load_bench()
    prompts = [[1, 0, 2, 1], [0, 0, 1], [2, 2, 1, 0, 1], [1, 1], [0, 1, 0, 0], [3, 0, 1]]
    theirs = [run(prompts)]
    # one seed, the same drafts on both sides: ratio 1 and a zero-width interval
    assert q.runs_tau(theirs) == q.runs_tau([run(prompts)])
    assert q.ratio_interval([run(prompts)], theirs) == (1.0, 1.0)

    # pooled over every verification of every seed: (sum of accepted + 1) / verifications
    better = [[d + 1 for d in p] for p in prompts]
    both = [run(prompts), run(better)]
    n = sum(len(p) for p in prompts)
    assert abs(q.runs_tau(both) - (2 * sum(d + 1 for p in prompts for d in p) + n) / (2 * n)) < 1e-12

    # one side's two seeds disagree: the interval must cover both seeds' ratios' spread
    lo1, hi1 = q.ratio_interval([run(better)], theirs)
    lo2, hi2 = q.ratio_interval(both, [run(prompts), run(prompts)])
    ratio = q.runs_tau(both) / q.runs_tau(theirs)
    assert lo2 < ratio < hi2
    assert lo2 <= 1.0 + 1e-9  # a resample may draw the equal seed twice
    assert hi2 - lo2 > (hi1 - lo1) / 2 and lo1 > 1.0
