"""Encode target features into shards and write them atomically; the per-process worker.

A worker owns a disjoint list of shards. For each it runs the target over the shard's samples
(batches planned only from that shard's lengths, so a shard's bytes never depend on which other
shards ran before: a resumed run rewrites identical files), encodes them per the storage options,
checks every tensor against the layout, and `os.replace`s the file into place. It reports what
it wrote through a callback (in-process) or a queue (one process per GPU); only the parent
touches the manifest.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from core.cache import layout
from core.cache.layout import CacheDims, StorageOptions, torch_dtype
from core.cache.quant import fp8_quantize, topk_compress
from core.errors import EagleError
from core.manifest import atomic_path

HEAD_FILE = "head.safetensors"


def encode_sample(input_ids: torch.Tensor, loss_mask: Sequence[int] | torch.Tensor, aux_hidden: torch.Tensor,
                  target_probs: torch.Tensor | None, position_mask: torch.Tensor,
                  final_hidden: torch.Tensor | None, dims: CacheDims, opts: StorageOptions
                  ) -> dict[str, torch.Tensor]:
    """One sample's per-token tensors, in the stored dtypes."""
    out = {"input_ids": torch.as_tensor(input_ids).to(torch.int32),
           "loss_mask": torch.as_tensor(loss_mask).to(torch.bool),
           "position_mask": position_mask.to(torch.bool)}
    if opts.aux_dtype == "fp8":
        out["aux_fp8"], out["aux_scale"] = fp8_quantize(aux_hidden, groups=layout.NUM_AUX)
    else:
        out["aux_hidden"] = aux_hidden.to(torch_dtype(opts.aux_dtype))
    if opts.target_store == "probs":
        out["target_probs"] = target_probs.to(torch_dtype(opts.target_dtype))
    elif opts.target_store == "topk":
        idx = torch_dtype(layout.index_dtype(dims.draft_vocab_size))
        out["topk_values"], out["topk_indices"] = topk_compress(target_probs, opts.topk, idx)
    else:
        if final_hidden is None:
            raise ValueError("target_store 'hidden' needs the final hidden state")
        out["final_hidden"] = final_hidden.to(torch_dtype(opts.target_dtype))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def pack_shard(encoded: list[dict[str, torch.Tensor]], sample_index: Sequence[int], dims: CacheDims,
               opts: StorageOptions) -> dict[str, torch.Tensor]:
    """Concatenate samples along the token axis + offsets; verified against the layout specs."""
    lengths = [int(e["input_ids"].shape[0]) for e in encoded]
    specs = layout.shard_tensor_specs(lengths, dims, opts)
    tensors = {name: torch.cat([e[name] for e in encoded]) for name in encoded[0]}
    tensors["offsets"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    tensors["sample_index"] = torch.tensor(list(sample_index), dtype=torch.int64)
    if set(tensors) != set(specs):
        raise RuntimeError(f"cache layout drift: wrote {sorted(tensors)}, layout says {sorted(specs)}")
    for name, (dt, shape) in specs.items():
        t = tensors[name]
        if t.dtype != torch_dtype(dt) or tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"cache layout drift in {name}: {t.dtype} {tuple(t.shape)} "
                               f"vs {dt} {tuple(shape)}")
    return {k: v.contiguous() for k, v in tensors.items()}


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@dataclass
class ShardJob:
    shard_id: int
    sample_index: list[int]  # positions in the input dataset
    input_ids: list[Any]  # int32 numpy [T] each (numpy: cheap to send to a spawned worker)
    loss_mask: list[Any]  # uint8 numpy [T] each


@dataclass
class WorkerJob:
    target: str
    vocab: Any  # DraftVocab
    aux_layer_ids: list[int] | None
    storage: StorageOptions
    output_dir: str
    shards: list[ShardJob]
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    device_map: str | None = None
    batch_tokens: int = 4096
    write_head: bool = False
    threads: int | None = None
    rank: int = 0
    parent_pid: int | None = None
    extractor_kwargs: dict[str, Any] = field(default_factory=dict)


def run_worker(job: WorkerJob, report: Callable[[dict[str, Any]], None]) -> None:
    """Extract, encode and write this job's shards; report each step as a small dict."""
    from core.features import TargetFeatureExtractor

    if job.threads:
        torch.set_num_threads(job.threads)
    ex = TargetFeatureExtractor(job.target, job.vocab, job.aux_layer_ids, device=job.device,
                                dtype=getattr(torch, job.dtype), device_map=job.device_map,
                                final_hidden=job.storage.target_store == "hidden",
                                max_batch_tokens=job.batch_tokens, **job.extractor_kwargs)
    dims = CacheDims(ex.hidden_size, job.vocab.draft_vocab_size)
    out_dir = Path(job.output_dir)
    report({"type": "ready", "rank": job.rank, "target_info": ex.target_info()})
    if job.write_head:
        head = ex.head_tensors()
        tensors = {"norm_weight": head["norm_weight"].float(),
                   "lm_head_rows": head["lm_head_rows"].to(torch_dtype(job.storage.target_dtype))}
        if "lm_head_bias" in head:
            tensors["lm_head_bias"] = head["lm_head_bias"]
        write_safetensors_atomic(out_dir / HEAD_FILE, tensors, {"norm_eps": repr(ex.norm_eps)})
        report({"type": "head", "file": HEAD_FILE, "norm_eps": ex.norm_eps})
    for shard in job.shards:
        if job.parent_pid is not None and os.getppid() != job.parent_pid:
            return  # the parent died (kill -9): stop instead of writing unrecorded shards
        lengths = [int(len(t)) for t in shard.input_ids]
        encoded: list[dict[str, torch.Tensor] | None] = [None] * len(lengths)
        for batch in ex.plan_batches(lengths):
            feats = ex([torch.as_tensor(shard.input_ids[i]).long() for i in batch])
            for i, fs in zip(batch, feats):
                encoded[i] = encode_sample(fs.input_ids, torch.as_tensor(shard.loss_mask[i]), fs.aux_hidden, fs.target_probs,
                                           fs.position_mask, fs.final_hidden, dims, job.storage)
            report({"type": "batch", "rank": job.rank, "samples": len(batch),
                    "tokens": sum(lengths[i] for i in batch)})
        tensors = pack_shard(encoded, shard.sample_index, dims, job.storage)  # type: ignore[arg-type]
        name = layout.shard_name(shard.shard_id)
        write_safetensors_atomic(out_dir / name, tensors, layout.SHARD_METADATA)
        report({"type": "shard", "rank": job.rank, "shard": shard.shard_id, "file": name,
                "samples": len(lengths), "tokens": sum(lengths), "lengths": lengths,
                "first_index": shard.sample_index[0] if shard.sample_index else None})
    ex.close()


def worker_main(job: WorkerJob, queue: Any) -> None:
    """Entry of a spawned worker process: run the job, send reports and errors through `queue`."""
    try:
        run_worker(job, queue.put)
        queue.put({"type": "done", "rank": job.rank})
    except EagleError as e:
        queue.put({"type": "error", "rank": job.rank, "message": str(e), "exit_code": e.exit_code})
    except BaseException as e:  # report, then let the process end
        from core.disk import first_full_disk

        full = first_full_disk(e)
        if full is not None:  # the parent names the file, the free space and the resume command
            queue.put({"type": "error", "rank": job.rank, "exit_code": 1, "full_disk": True,
                       "filename": getattr(full, "filename", None), "message": f"{type(e).__name__}: {e}"})
            return
        queue.put({"type": "error", "rank": job.rank, "exit_code": 1,
                   "message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
