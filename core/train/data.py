"""Training data: sequence packing to a token budget, a deterministic seeded order, feature sources.

A micro-batch is ONE packed row [1, T] of whole documents (T <= max_tokens_per_batch) with
`position_ids` restarting at 0 per document and `doc_ids` so that attention never crosses
documents. No padding anywhere.

Order: epoch e shuffles the sample indices with a generator seeded by (seed, e), then packs them
greedily in that order. An optimizer step consumes `group = world_size * grad_accum` consecutive
micro-batches; rank r takes micro-batches [r*grad_accum, (r+1)*grad_accum) of the step, so one
process with grad_accum 2 sees exactly the data of two processes with grad_accum 1. Leftover
micro-batches at the end of an epoch (fewer than `group`) are dropped. Because the order is a pure
function of (seed, epoch, lengths), the data position of a run is just its step number.

Sources turn a list of sample indices into a packed batch dict (the contract of
core.model.ttt.ttt_forward_loss): `OnlineSource` runs the frozen target on tokenized
conversations inside the step, `OfflineSource` reads `eagle cache` output (top-k targets stay
top-k). `prefetch_loader` reads an offline source ahead in worker processes, in schedule order
from any resume step.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from core.errors import UsageError


def pack_in_order(order: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy packing in the given order: start a new micro-batch when the next sample won't fit."""
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if n > budget:
            raise UsageError(f"sample {i} has {n} tokens, more than the packing budget {budget}")
        if cur and used + n > budget:
            batches.append(cur)
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        batches.append(cur)
    return batches


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) sample indices: a seeded random `val_fraction` share (at least one when > 0)."""
    if val_fraction <= 0 or n < 2:
        return list(range(n)), []
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    val = sorted(perm[:n_val])
    train = sorted(perm[n_val:])
    return train, val


@dataclass
class StepPlan:
    epoch: int
    step_in_epoch: int
    micro_batches: list[list[int]]  # this rank's micro-batches for the step (grad_accum of them)


class BatchPlan:
    """Deterministic micro-batch schedule over epochs for one rank."""

    def __init__(self, lengths: Sequence[int], budget: int, seed: int, world_size: int = 1,
                 rank: int = 0, grad_accum: int = 1, shuffle: bool = True):
        self.lengths = [int(n) for n in lengths]
        self.budget, self.seed, self.shuffle = budget, seed, shuffle
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.group = world_size * grad_accum
        self._epochs: dict[int, list[list[int]]] = {}
        self._cum_steps: list[int] = [0]  # _cum_steps[e] = steps before epoch e

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            n = len(self.lengths)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = list(range(n))
            self._epochs[epoch] = pack_in_order(order, self.lengths, self.budget)
        return self._epochs[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.epoch_micro_batches(epoch)) // self.group

    def check_not_empty(self, what: str) -> None:
        n_micro = len(self.epoch_micro_batches(0))
        if n_micro < self.group:
            raise UsageError(f"the {what} split packs into {n_micro} micro-batch(es), fewer than one "
                             f"optimizer step needs ({self.group} = processes x --grad-accum)",
                             hint="add data, or lower --max-tokens-per-batch / --grad-accum / --nproc")

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """Global step (0-based) -> (epoch, step within the epoch)."""
        while self._cum_steps[-1] <= step:
            e = len(self._cum_steps) - 1
            self._cum_steps.append(self._cum_steps[-1] + self.steps_in_epoch(e))
        e = bisect.bisect_right(self._cum_steps, step) - 1
        return e, step - self._cum_steps[e]

    def step(self, step: int) -> StepPlan:
        epoch, k = self.locate(step)
        micro = self.epoch_micro_batches(epoch)
        start = k * self.group + self.rank * self.grad_accum
        return StepPlan(epoch, k, micro[start:start + self.grad_accum])

    def tokens_in_step(self, step: int) -> int:
        """Tokens of the whole step over all ranks (for throughput)."""
        epoch, k = self.locate(step)
        micro = self.epoch_micro_batches(epoch)[k * self.group:(k + 1) * self.group]
        return sum(self.lengths[i] for mb in micro for i in mb)


# ---- collation ---------------------------------------------------------------------------------
def collate(docs: Sequence[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """Concatenate per-document tensors into one packed row [1, T] plus position/document ids."""
    out: dict[str, torch.Tensor] = {}
    for key in ("input_ids", "loss_mask", "aux_hidden", *target_keys(docs[0]), "position_mask"):
        out[key] = torch.cat([d[key].to(device) for d in docs]).unsqueeze(0)
    lengths = [int(d["input_ids"].shape[0]) for d in docs]
    out["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    out["doc_ids"] = torch.cat([torch.full((n,), i, dtype=torch.long)
                                     for i, n in enumerate(lengths)]).unsqueeze(0).to(device)
    out["loss_mask"] = out["loss_mask"].to(torch.bool)
    out["position_mask"] = out["position_mask"].to(torch.bool)
    return out


def target_keys(doc: dict) -> tuple[str, ...]:
    """The target fields a document carries: dense target_probs, or top-k ids + probs."""
    if "target_probs" in doc:
        return ("target_probs",)
    return ("target_topk_ids", "target_topk_probs")


class OnlineSource:
    """Tokenized conversations; the frozen target computes features for each micro-batch."""

    def __init__(self, input_ids: list[torch.Tensor], loss_masks: list[torch.Tensor], extractor: Any):
        self.input_ids, self.loss_masks, self.extractor = input_ids, loss_masks, extractor

    @property
    def lengths(self) -> list[int]:
        return [int(t.numel()) for t in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        feats = self.extractor([self.input_ids[i] for i in indices], to_cpu=False)
        docs = [{"input_ids": self.input_ids[i], "loss_mask": self.loss_masks[i],
                 "aux_hidden": f.aux_hidden, "target_probs": f.target_probs,
                 "position_mask": f.position_mask} for i, f in zip(indices, feats)]
        return collate(docs, device)


class OfflineSource:
    """Samples of an `eagle cache` folder (a subset of its indices), truncated to max_length."""

    def __init__(self, reader: Any, sample_ids: Sequence[int], max_length: int,
                 lengths: Sequence[int] | None = None):
        self.reader, self.sample_ids, self.max_length = reader, list(sample_ids), max_length
        if lengths is None:
            lengths = cache_lengths(reader)
        self._lengths = [min(int(lengths[i]), max_length) for i in self.sample_ids]

    @property
    def lengths(self) -> list[int]:
        return self._lengths

    def __len__(self) -> int:
        return len(self.sample_ids)

    def batch(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        docs = []
        from core.cache.reader import CacheReader

        get = self.reader.get if isinstance(self.reader, CacheReader) else None
        for i in indices:
            # a top-k cache stays top-k (the loss reads it sparse): no [T, Vd] rows per batch
            s = get(self.sample_ids[i], dense_targets=False) if get else self.reader[self.sample_ids[i]]
            n = self._lengths[i]
            docs.append({k: s[k][:n] for k in ("input_ids", "loss_mask", "aux_hidden",
                                                *target_keys(s), "position_mask")})
        return collate(docs, device)


def cache_lengths(reader: Any) -> list[int]:
    """Per-sample token counts of a cache, from its index when it has one (no tensor reads)."""
    lengths = getattr(reader, "lengths", None)
    if lengths is not None:
        return [int(n) for n in (lengths() if callable(lengths) else lengths)]
    return [int(reader[i]["input_ids"].shape[0]) for i in range(len(reader))]


# ---- prefetching (offline sources) ---------------------------------------------------------------
class StepBatches(torch.utils.data.Dataset):
    """Item j: the j-th micro-batch this rank consumes from `start_step` on, collated on the CPU.

    The schedule is a pure function of the step (BatchPlan), so a resumed run builds this from its
    checkpoint's step and reads exactly the micro-batches the uninterrupted run would have read.
    """

    def __init__(self, source: Any, plan: BatchPlan, start_step: int, end_step: int):
        self.source, self.plan = source, plan
        self.start, self.end, self.per_step = start_step, end_step, plan.grad_accum

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.per_step

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        step = self.start + j // self.per_step
        return self.source.batch(self.plan.step(step).micro_batches[j % self.per_step], torch.device("cpu"))


def prefetch_loader(source: Any, plan: BatchPlan, start_step: int, end_step: int, workers: int = 2,
                    pin_memory: bool = False, prefetch: int = 4) -> torch.utils.data.DataLoader:
    """Micro-batches of steps [start_step, end_step) in order, read ahead by `workers` processes.

    For offline sources (cache reads, fp8 dequantisation and collation leave the training process);
    an online source runs the target on the GPU and must stay in-process (workers=0). Move each
    batch with `to_device(batch, device)` (non-blocking from pinned memory).
    """
    ds = StepBatches(source, plan, start_step, end_step)
    extra = {"prefetch_factor": prefetch, "worker_init_fn": _worker_init} if workers > 0 else {}
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory, **extra)


def _worker_init(_worker_id: int) -> None:
    """Ctrl-C reaches the whole process group but is for the trainer, which finishes its step and
    saves: the readers must not die under it. (SIGTERM stays default: the DataLoader and
    multiprocessing end stuck readers with it.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # readers share the cores with the trainer


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
