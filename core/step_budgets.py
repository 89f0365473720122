"""Every step's disk, accelerator memory, host memory and time: the one planner behind `eagle plan`,
`eagle run --plan` and the TUI's budget panel (they show the same numbers).

Disk and GPU memory come from core.budget (the cache writer's own shape arithmetic). Host memory of
CPU training (fp32, offline features) was measured on SmolLM2-135M shapes at 1024-4096 packed tokens,
TTT 3-7 and draft vocab 8192-32000 (`bench/train_memory.py` re-measures it against this formula):
  RUNTIME_CPU_BYTES                          python, torch, transformers once imported
  + 4*(V*H + P_draft)                        draft weights with its frozen embedding copy
  + 12*P_draft                               gradients and AdamW moments
  + L*BT*STEP_FLOATS_PER_H*H*4              kept for backward per TTT step
  + min(BT, LOSS_CHUNK_ELEMS/Vd)*Vd*4*2      one chunk of head logits and their gradient
  + BT*(3H*4 + k*12)                         the batch: dequantised aux states, top-k targets
Online training adds the target in fp32 (weights and one forward: budget.target_forward_memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from core import budget
from core.cache.layout import StorageOptions
from core.settings import draft_vocab

RUNTIME_CPU_BYTES = 290_000_000
STEP_FLOATS_PER_H = 50  # floats kept per token per TTT step, in units of the hidden size (measured)


@dataclass
class StepBudget:
    step: str
    disk_bytes: int | None = None
    gpu_bytes: int | None = None  # peak accelerator memory per device when a GPU is used
    ram_bytes: int | None = None  # peak host memory when the step runs on the CPU
    time_s: float | None = None
    note: str = ""


def cpu_train_memory(shape: budget.TargetShape, draft_vocab_size: int, batch_tokens: int, ttt_length: int,
                     num_layers: int = 1, topk: int = 64, online: bool = False) -> dict[str, int]:
    H, V, BT, Vd = shape.hidden_size, shape.vocab_size, batch_tokens, draft_vocab_size
    p = shape.draft_params(Vd, num_layers)
    parts = {"runtime": RUNTIME_CPU_BYTES,
             "draft_weights": 4 * (V * H + p),
             "grads_and_optimizer": 12 * p,
             "ttt_activations": ttt_length * num_layers * BT * STEP_FLOATS_PER_H * H * 4,
             "loss_chunk": min(BT, max(1, budget.LOSS_CHUNK_ELEMS // Vd)) * Vd * 4 * 2,
             "batch": BT * (3 * H * 4 + topk * 12)}
    if online:
        fwd = budget.target_forward_memory(shape, Vd, BT, dtype_bytes=4)
        parts["target"] = fwd["total"] - fwd["runtime"]
    parts["total"] = sum(parts.values())
    return parts


def step_budgets(cfg: Any, shape: budget.TargetShape, num_samples: int, lengths: Sequence[int] | None = None,
                 tokens_per_s: float | None = None, sample_note: str = "") -> list[StepBudget]:
    """Budgets of regen, cache, train, eval and export for a RunConfig. `lengths`: measured token
    lengths (a sample of the dataset is scaled up); without them every sample is at max length,
    an upper bound. `tokens_per_s`: the target's measured prefill speed, for time estimates."""
    f, t = cfg.features, cfg.train
    vd = draft_vocab(cfg.vocab.draft_vocab_size, shape.vocab_size)
    plan = budget.make_plan(shape, num_samples=num_samples, lengths=lengths, seq_length=f.max_length,
                            draft_vocab_size=vd, options=[StorageOptions(f.aux_dtype, f.target_store, f.topk)],
                            shard_size=f.shard_size, batch_tokens=t.max_tokens_per_batch, ttt_length=t.ttt_length)
    fwd, online = plan.gpu["target_forward"], plan.gpu["online_step"]
    fwd_cpu = budget.target_forward_memory(shape, vd, t.max_tokens_per_batch, dtype_bytes=4)
    weights_cpu = fwd_cpu["weights"] + RUNTIME_CPU_BYTES
    draft_params = shape.draft_params(vd, t.num_layers)
    is_online = f.mode == "online"
    train_gpu = online["total"] if is_online else online["total"] - online["target"]
    train_ram = cpu_train_memory(shape, vd, t.max_tokens_per_batch, t.ttt_length, t.num_layers, f.topk,
                                 online=is_online)["total"]
    ckpt = t.keep_last * draft_params * (4 + 8)  # fp32 weights + AdamW moments per kept checkpoint
    export = (draft_params + shape.vocab_size * shape.hidden_size) * 4  # with the embedding; fp32 bound
    # time: the target's measured prefill speed over every token (online training repeats that
    # forward every epoch, so it takes at least epochs x as long)
    forward_s = plan.mean_length * num_samples / tokens_per_s if tokens_per_s else None
    train_s = forward_s * t.epochs if forward_s is not None and is_online else None
    row = plan.rows[0]
    return [StepBudget("regen", None, fwd["weights"] + fwd["runtime"], weights_cpu, None,
                       "text only: small next to the cache"),
            StepBudget("cache", int(row["total_bytes"]) if f.mode == "offline" else None, fwd["total"],
                       fwd_cpu["total"] - fwd_cpu["runtime"] + RUNTIME_CPU_BYTES, forward_s,
                       f"{budget.format_bytes(row['bytes_per_sample'])} per sample x {sample_note or num_samples}"),
            StepBudget("train", ckpt, train_gpu, train_ram, train_s,
                       f"draft {draft_params / 1e6:.1f} M params, {f.mode} features"),
            StepBudget("eval", None, fwd["weights"] + fwd["runtime"] + draft_params * 2,
                       weights_cpu + draft_params * 4),
            StepBudget("export", export, None, None)]
