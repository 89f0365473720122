"""Training metrics: token-weighted aggregation over micro-batches and processes, and logging to
metrics.jsonl, StepMetrics events and TensorBoard (when the package is installed).

Names: loss (the optimized objective, Σ_k decay^k loss_k, averaged over micro-batches),
loss_k and acc_k per TTT step k (token-weighted), tau_sim = 1 + Σ_k Π_{j<=k} acc_j,
supervised (scored positions of step 0), tokens (packed tokens), lr, grad_norm, tokens_per_s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from core.events import EventSink, Log, StepMetrics


def tau_sim(acc: list[float]) -> float:
    """Simulated accept length: 1 (the bonus token) + Σ_k Π_{j<=k} acc_j."""
    total, prod = 1.0, 1.0
    for a in acc:
        prod *= a
        total += prod
    return total


class MetricAccumulator:
    """Exact sums over micro-batches (core.model.ttt.TTTOutput raw sums); `reduce` all-reduces
    them over processes and returns the metrics."""

    def __init__(self, ttt_length: int):
        self.L = ttt_length
        # [objective sum, batches, real tokens, loss_sum_k, count_k, correct_k, acc_total_k]
        self.sums = torch.zeros(3 + 4 * ttt_length, dtype=torch.float64)

    def add(self, out: Any, weight: float = 1.0) -> None:
        head = [float(out.loss.detach()), 1.0, float(out.num_tokens)]
        rows = head + list(out.per_step_loss_sum) + list(out.per_step_count) \
            + list(out.per_step_correct) + list(out.per_step_acc_total)
        self.sums += torch.tensor(rows, dtype=torch.float64) * weight

    def reduce(self, env: Any) -> dict[str, float]:
        from core.train.distributed import all_reduce_sum

        s = all_reduce_sum(env, self.sums.clone())
        L = self.L
        loss_sum, count, correct, acc_total = (s[3 + i * L:3 + (i + 1) * L] for i in range(4))
        loss_k = (loss_sum / count.clamp(min=1)).tolist()
        acc_k = (correct / acc_total.clamp(min=1)).tolist()
        out = {"loss": float(s[0] / max(1.0, float(s[1])))}
        out.update({f"loss_{k}": v for k, v in enumerate(loss_k)})
        out.update({f"acc_{k}": v for k, v in enumerate(acc_k)})
        out["tau_sim"] = tau_sim(acc_k)
        out["supervised"] = float(count[0])
        out["tokens"] = float(s[2])
        return out


class MetricsLog:
    """Rank 0 only: metrics.jsonl (append, one line per step and split), events, TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, events: EventSink):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.events = events
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                events(Log(stage="train", level="debug",
                           message="tensorboard is not installed: metrics go to metrics.jsonl only"))
            else:
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        rec = {"step": step, "split": split, "time": round(time.time(), 3),
               **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        self.events(StepMetrics(stage="train", step=step, split=split,
                                metrics={k: float(v) for k, v in metrics.items()}))
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", float(v), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Records of metrics.jsonl (a torn last line is skipped)."""
    p = Path(run_dir) / "metrics.jsonl"
    out = []
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if split is None or rec.get("split") == split:
                out.append(rec)
    return out
