"""`eagle cache` settings and result, validated before any model is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.cache.layout import StorageOptions
from core.errors import InputDataError, UsageError


@dataclass
class CacheConfig:
    target: str  # local HF model folder, or "demo" (embedded SmolLM2-135M-Instruct)
    data: str  # dataset source (core.data.DataSpec.source), or "demo"
    output_dir: str
    draft_vocab_size: int = 32000
    vocab: Optional[str] = None  # a saved draft vocab (`eagle vocab` output); checked against the data
    aux_layer_ids: Optional[list[int]] = None  # default: outputs of layers [1, N//2-1, N-4]
    max_length: int = 2048
    aux_dtype: str = "fp8"  # bf16 | fp16 | fp8
    target_store: str = "topk"  # probs | topk | hidden
    topk: int = 64
    target_dtype: str = "bf16"  # stored probs / final hidden dtype
    shard_size: int = 256  # samples per shard
    batch_tokens: int = 4096  # padded tokens per target forward
    nproc: int = 1  # worker processes (one per GPU on CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    device_map: Optional[str] = None  # "auto": spread a large target over all visible GPUs
    split: Optional[str] = None
    messages_column: Optional[str] = None
    shuffle_seed: Optional[int] = None
    limit: Optional[int] = None
    strict: bool = False
    exclude: Optional[str] = None  # held-out conversations (JSONL) whose prompts are left out
    resume: bool = False
    command: Optional[str] = None  # provenance: the command line that made it
    extra_provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def storage(self) -> StorageOptions:
        return StorageOptions(aux_dtype=self.aux_dtype, target_store=self.target_store,
                              topk=self.topk, target_dtype=self.target_dtype)

    def validate(self) -> "CacheConfig":
        self.storage.validate(self.draft_vocab_size)
        for name, value, low in (("draft vocab size", self.draft_vocab_size, 1),
                                 ("max length", self.max_length, 2), ("shard size", self.shard_size, 1),
                                 ("batch tokens", self.batch_tokens, 1), ("nproc", self.nproc, 1)):
            if value < low:
                raise UsageError(f"{name} must be >= {low}, got {value}")
        if self.batch_tokens < self.max_length:
            raise UsageError(f"batch tokens ({self.batch_tokens}) must be >= max length "
                             f"({self.max_length}) so the longest sample fits one forward")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"limit must be >= 1, got {self.limit}")
        if self.aux_layer_ids is not None:
            ids = list(self.aux_layer_ids)
            if len(ids) != 3 or len(set(ids)) != 3 or min(ids) < 0:
                raise UsageError(f"aux layer ids {ids}: need three distinct non-negative layer ids")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UsageError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.device_map not in (None, "auto"):
            raise UsageError(f"device_map {self.device_map!r}: only 'auto' is supported")
        if self.device_map is not None and self.nproc > 1:
            raise UsageError("device_map 'auto' spreads one target over all GPUs; it cannot be "
                             "combined with nproc > 1")
        if self.target != "demo" and not (Path(self.target) / "config.json").exists():
            raise InputDataError("not a Hugging Face model folder (no config.json)", path=self.target)
        if self.vocab is not None and not Path(self.vocab).exists():
            raise InputDataError("draft vocab folder not found", path=self.vocab)
        return self


@dataclass
class CacheResult:
    output_dir: str
    samples: int  # samples in the cache
    shards: int
    tokens: int
    bytes: int  # bytes of all shard files
    bytes_per_sample: float
    skipped: int  # conversations dropped (no supervised tokens, template failures)
    coverage: float  # draft-vocab coverage of supervised tokens
    resumed: bool
    shards_written: int  # shards written by this run (0 when resuming a complete cache)
    seconds: float
    samples_per_s: float | None
    tokens_per_s: float | None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
