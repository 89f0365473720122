"""Disk, GPU memory and time budgets, before any heavy step runs (`eagle plan`, `eagle run --plan`, TUI).

Cache bytes come from `core.cache.layout`, the same shape arithmetic the writer checks every
shard against, so an estimate matches what is written (headers included). The anchors' layouts
(eagle3-reference.md section 5) are computed from their documented per-token shapes: NeMo pads
every sample to seq_length; SpecForge and speculators store each sample at its own length.

GPU memory formulas (bytes; b = bytes per element of the compute dtype, BT = tokens per batch):
  target forward  = P_target*b                                       (weights)
                  + BT*b*(2H + 3H + 2H + (2*nh + 2*nkv)*hd + 3I)    (residual + normed, 3 captured aux,
                                                                       final pre/post norm, q/k/v/attn out,
                                                                       MLP gate/up/act of the live layer;
                                                                       flash/SDPA attention: no T^2 term)
                  + min(BT, rows per logits chunk)*V*max(b, 4)       (one chunk of full-vocab logits)
                  + 2*BT*Vd*4                                        (draft-vocab probs, fp32, + softmax temp)
                  + RUNTIME_BYTES                                    (CUDA context, allocator slack)
  online step     = target forward
                  + V*H*2                                            (frozen embedding copy, bf16)
                  + P_draft*18   (bf16 weight 2 + fp32 master 4 + fp32 grad 4 + AdamW m, v 8)
                  + L*BT*[2*(2H + (2*nh + 2*nkv)*hd + 3H + 3I) + 2H + 4]
                                  (per TTT step kept for backward: bf16 layer activations, the normed
                                   hidden state and one log-sum-exp: the chunked head + soft CE of
                                   core.model.loss keeps no [BT, Vd] logits)
                  + min(BT, LOSS_CHUNK_ELEMS/Vd)*Vd*4*2               (one chunk of logits and its grad)
where P_draft = fc 3H*H + attention (nh*hd*2H + 2*nkv*hd*2H + H*nh*hd) + MLP 3*H*I + norms 4H + lm_head Vd*H.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from core.cache import layout
from core.cache.config import CacheSettings
from core.cache.layout import CacheDims, StorageOptions
from core.errors import InputDataError, UsageError
from core.settings import default_draft_vocab
from core.train.config import TrainSettings

RUNTIME_BYTES = 1 << 30
LOGITS_CHUNK_BYTES = 64 << 20  # = core.features.LOGITS_CHUNK_BYTES (not imported: no torch here)
LOSS_CHUNK_ELEMS = 1 << 25  # = core.model.loss.CHUNK_ELEMS (not imported: no torch here)
# manifest.json, vocab.json, target_config.json, failures.jsonl: about this much, plus per shard
# (its record) and per sample (its length in the record). Measured on written caches.
JSON_BASE_BYTES, JSON_SHARD_BYTES, JSON_SAMPLE_BYTES = 3500, 300, 12

# Public shapes of common targets (their config.json values).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, vocab_size=128256, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, num_hidden_layers=80, vocab_size=128256, intermediate_size=28672,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, vocab_size=128256, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, vocab_size=151936, intermediate_size=12288,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, vocab_size=49152, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
}


@dataclass
class TargetShape:
    name: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str = "target") -> "TargetShape":
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        try:
            heads = int(cfg["num_attention_heads"])
            return cls(name=name, hidden_size=int(cfg["hidden_size"]),
                       num_hidden_layers=int(cfg["num_hidden_layers"]), vocab_size=int(cfg["vocab_size"]),
                       intermediate_size=int(cfg["intermediate_size"]), num_attention_heads=heads,
                       num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                       head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                       tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise InputDataError(f"target config lacks a usable {e}", path=name) from e

    @classmethod
    def resolve(cls, target: str) -> "TargetShape":
        """A preset name (llama-3.1-8b, ...), a model folder, a config.json, or an `eagle cache` dir."""
        key = target.lower()
        if key in PRESETS:
            return cls(name=key, **PRESETS[key])
        if target == "demo":
            from core.assets import demo_target

            target = str(demo_target())
        p = Path(target)
        for cand in (p, p / "config.json", p / "target_config.json"):
            if cand.is_file():
                try:
                    return cls.from_config(json.loads(cand.read_text()), name=str(p))
                except json.JSONDecodeError as e:
                    raise InputDataError(f"not valid JSON ({e.msg})", path=str(cand)) from e
        raise UsageError(f"unknown target {target!r}: not a preset ({', '.join(PRESETS)}) "
                         "and no config.json there")

    def num_params(self) -> int:
        H, I, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = H * self.num_attention_heads * hd * 2 + H * self.num_key_value_heads * hd * 2
        per_layer = attn + 3 * H * I + 2 * H
        embed = self.vocab_size * H * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_hidden_layers * per_layer + H

    def draft_params(self, draft_vocab_size: int, num_layers: int = 1) -> int:
        """Trainable draft parameters (the frozen embedding excluded)."""
        H, I, hd = self.hidden_size, self.intermediate_size, self.head_dim
        nh, nkv = self.num_attention_heads, self.num_key_value_heads
        layer = nh * hd * 2 * H + 2 * nkv * hd * 2 * H + H * nh * hd + 3 * H * I + 3 * H
        return 3 * H * H + num_layers * layer + H + draft_vocab_size * H


# ---- disk ------------------------------------------------------------------------------------
@dataclass
class CacheEstimate:
    shard_bytes: int  # all shard files (data + safetensors headers)
    fixed_bytes: int  # vocab, head (hidden mode), JSON files: once per cache
    num_samples: int
    num_shards: int

    @property
    def total_bytes(self) -> int:
        return self.shard_bytes + self.fixed_bytes

    @property
    def bytes_per_sample(self) -> float:
        return self.shard_bytes / max(1, self.num_samples)


def estimate_cache_bytes(dims: CacheDims, opts: StorageOptions, lengths: Sequence[int],
                         shard_size: int = CacheSettings.default("shard_size"),
                         target_vocab_size: int | None = None) -> CacheEstimate:
    """Bytes `eagle cache` writes for samples of these lengths (in dataset order)."""
    n = len(lengths)
    groups = layout.shard_groups(n, shard_size)
    uniform = n > 0 and min(lengths) == max(lengths)
    if uniform:  # one computation per distinct shard size, not per shard
        full = layout.shard_file_bytes([lengths[0]] * shard_size, dims, opts)
        shard_total = (n // shard_size) * full
        if n % shard_size:
            shard_total += layout.shard_file_bytes([lengths[0]] * (n % shard_size), dims, opts)
    else:
        shard_total = sum(layout.shard_file_bytes([lengths[i] for i in g], dims, opts) for g in groups)
    fixed = (layout.head_file_bytes(dims, opts) + JSON_BASE_BYTES + JSON_SHARD_BYTES * len(groups)
             + JSON_SAMPLE_BYTES * n)
    if target_vocab_size:
        fixed += layout.vocab_file_bytes(target_vocab_size, dims.draft_vocab_size)
    return CacheEstimate(shard_bytes=shard_total, fixed_bytes=fixed, num_samples=n, num_shards=len(groups))


def anchor_bytes_per_sample(shape: TargetShape, draft_vocab_size: int, length: int, seq_length: int
                            ) -> dict[str, int]:
    """The anchors' bytes for one sample of `length` tokens (NeMo pads to `seq_length`)."""
    H = shape.hidden_size
    return {"nemo": seq_length * (3 * H * 2 + draft_vocab_size * 2),
            "specforge": length * 4 * H * 2,
            "speculators": length * 4 * H * 2}


ANCHOR_NOTES = {"nemo": "aux [3H] bf16 + probs [Vd] bf16, padded to seq_length",
                "specforge": "final hidden [H] + aux [3H] bf16 (pickled .ckpt)",
                "speculators": "4 layers x [H] bf16"}


def free_disk(path: str | os.PathLike) -> tuple[str, int]:
    """(nearest existing parent, free bytes there)."""
    import psutil

    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p), int(psutil.disk_usage(str(p)).free)


# ---- GPU memory ------------------------------------------------------------------------------
def target_forward_memory(shape: TargetShape, draft_vocab_size: int, batch_tokens: int,
                          dtype_bytes: int = 2) -> dict[str, int]:
    H, I, hd, b = shape.hidden_size, shape.intermediate_size, shape.head_dim, dtype_bytes
    nh, nkv, V, BT = shape.num_attention_heads, shape.num_key_value_heads, shape.vocab_size, batch_tokens
    rows = max(1, LOGITS_CHUNK_BYTES // (V * max(b, 4)))
    parts = {"weights": shape.num_params() * b,
             "activations": BT * b * (7 * H + (2 * nh + 2 * nkv) * hd + 3 * I),
             "logits_chunk": min(BT, rows) * V * max(b, 4),
             "draft_probs": 2 * BT * draft_vocab_size * 4,
             "runtime": RUNTIME_BYTES}
    parts["total"] = sum(parts.values())
    return parts


def online_step_memory(shape: TargetShape, draft_vocab_size: int, batch_tokens: int, ttt_length: int,
                       num_draft_layers: int = 1) -> dict[str, int]:
    H, I, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    nh, nkv, BT, Vd = shape.num_attention_heads, shape.num_key_value_heads, batch_tokens, draft_vocab_size
    fwd = target_forward_memory(shape, Vd, BT)
    step_act = BT * (2 * (2 * H + (2 * nh + 2 * nkv) * hd + 3 * H + 3 * I) * num_draft_layers + 2 * H + 4)
    parts = {"target": fwd["total"],
             "draft_embedding": shape.vocab_size * H * 2,
             "draft_and_optimizer": shape.draft_params(Vd, num_draft_layers) * 18,
             "ttt_activations": ttt_length * step_act,
             "loss_chunk": min(BT, max(1, LOSS_CHUNK_ELEMS // Vd)) * Vd * 4 * 2}
    parts["total"] = sum(parts.values())
    return parts


# ---- time ------------------------------------------------------------------------------------
def measure_target_tokens_per_s(target: str, device: str | None = None, batch_tokens: int = 2048,
                                seq_length: int = 512, steps: int = 2) -> float:
    """Prefill throughput of the target measured on random tokens (one warm-up batch, then `steps`)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
    seq = min(seq_length, batch_tokens)
    ids = torch.randint(0, model.config.vocab_size, (max(1, batch_tokens // seq), seq), device=device,
                        generator=None)
    with torch.no_grad():
        model.model(input_ids=ids)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            model.model(input_ids=ids)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return ids.numel() * steps / (time.perf_counter() - t0)


# ---- the plan --------------------------------------------------------------------------------
DEFAULT_OPTIONS = [StorageOptions(a, t) for a in ("bf16", "fp8") for t in ("probs", "topk", "hidden")]


@dataclass
class BudgetPlan:
    target: dict[str, Any]
    num_samples: int
    mean_length: float
    seq_length: int
    draft_vocab_size: int
    rows: list[dict[str, Any]]  # one per storage option
    anchors: list[dict[str, Any]]
    disk: dict[str, Any]
    gpu: dict[str, Any]
    time: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(target: str | TargetShape, num_samples: int, mean_length: float | None = None,
              lengths: Sequence[int] | None = None, seq_length: int = CacheSettings.default("max_length"),
              draft_vocab_size: int | None = None, options: Sequence[StorageOptions] | None = None,
              topk: int | None = None, shard_size: int = CacheSettings.default("shard_size"),
              output_dir: str | None = None, batch_tokens: int = TrainSettings.default("max_tokens_per_batch"),
              ttt_length: int = TrainSettings.default("ttt_length"), tokens_per_s: float | None = None) -> BudgetPlan:
    """Bytes per sample and in total for each storage option, the anchors, free disk, GPU memory, time.
    Defaults are the stages' (cache and training settings); no draft vocab size: the stages' rule
    (core.settings.default_draft_vocab)."""
    shape = target if isinstance(target, TargetShape) else TargetShape.resolve(target)
    if draft_vocab_size is None:
        draft_vocab_size = default_draft_vocab(shape.vocab_size)
    if not 1 <= draft_vocab_size <= shape.vocab_size:
        raise UsageError(f"draft vocab size {draft_vocab_size} must be in [1, {shape.vocab_size}]")
    if num_samples < 1:
        raise UsageError(f"number of samples must be >= 1, got {num_samples}")
    if lengths is None:
        mean = min(float(mean_length if mean_length is not None else seq_length), float(seq_length))
        lengths = [max(1, round(mean))] * num_samples
    else:
        lengths = [min(int(n), seq_length) for n in lengths]
        if len(lengths) != num_samples:  # a sample of the dataset: scale it up
            reps = -(-num_samples // max(1, len(lengths)))
            lengths = (list(lengths) * reps)[:num_samples]
    mean = sum(lengths) / len(lengths)
    opts = list(options) if options is not None else [
        StorageOptions(o.aux_dtype, o.target_store, topk or o.topk, o.target_dtype) for o in DEFAULT_OPTIONS]
    dims = CacheDims(shape.hidden_size, draft_vocab_size)
    anchors_per = {k: 0 for k in ANCHOR_NOTES}
    for n, c in Counter(lengths).items():
        for k, v in anchor_bytes_per_sample(shape, draft_vocab_size, n, seq_length).items():
            anchors_per[k] += v * c
    nemo_total = anchors_per["nemo"]
    rows = []
    for o in opts:
        o.validate(draft_vocab_size)
        est = estimate_cache_bytes(dims, o, lengths, shard_size, shape.vocab_size)
        rows.append({"option": o.label, "aux_dtype": o.aux_dtype, "target_store": o.target_store,
                     "topk": o.topk if o.target_store == "topk" else None,
                     "bytes_per_token": layout.bytes_per_token(dims, o),
                     "bytes_per_sample": est.bytes_per_sample, "total_bytes": est.total_bytes,
                     "vs_nemo": est.shard_bytes / nemo_total})
    anchors = [{"name": k, "layout": ANCHOR_NOTES[k], "bytes_per_sample": v / len(lengths),
                "total_bytes": v, "vs_nemo": v / nemo_total} for k, v in anchors_per.items()]
    disk: dict[str, Any] = {}
    if output_dir is not None:
        where, free = free_disk(output_dir)
        disk = {"path": where, "free_bytes": free,
                "fits": {r["option"]: r["total_bytes"] <= free for r in rows}}
    gpu = {"batch_tokens": batch_tokens, "ttt_length": ttt_length,
           "target_forward": target_forward_memory(shape, draft_vocab_size, batch_tokens),
           "online_step": online_step_memory(shape, draft_vocab_size, batch_tokens, ttt_length)}
    time_est: dict[str, Any] = {}
    if tokens_per_s:
        total_tokens = sum(lengths)
        time_est = {"tokens_per_s": tokens_per_s, "total_tokens": total_tokens,
                    "cache_seconds": total_tokens / tokens_per_s}
    return BudgetPlan(target={"name": shape.name, **{k: v for k, v in asdict(shape).items() if k != "name"},
                              "params": shape.num_params()},
                      num_samples=num_samples, mean_length=mean, seq_length=seq_length,
                      draft_vocab_size=draft_vocab_size, rows=rows, anchors=anchors, disk=disk, gpu=gpu,
                      time=time_est)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
