"""`eagle cache` settings and result, validated before any model is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from core.cache.layout import AUX_DTYPES, TARGET_DTYPES, TARGET_STORES, StorageOptions
from core.errors import InputDataError
from core.settings import (DataSelection, Settings, aux_layers_field, check_aux_layers,
                           draft_vocab_size_field, refuse)

_D = StorageOptions  # the storage defaults live with the format


class CacheSettings(Settings):
    """The feature-cache knobs: `eagle cache` options; `eagle run`'s `features` section is derived."""

    cli_names = {"aux_layer_ids": "--aux-layers"}

    draft_vocab_size: Optional[int] = draft_vocab_size_field()
    aux_layer_ids: Optional[list[int]] = aux_layers_field()
    max_length: int = Field(2048, ge=2, description="Tokens per conversation (truncated).")
    aux_dtype: Literal[AUX_DTYPES] = Field(_D.aux_dtype, description="Stored aux hidden states: bf16 | "
                                           "fp16 | fp8 (e4m3 + per-token scales).")
    target_store: Literal[TARGET_STORES] = Field(_D.target_store, description="probs (all Vd) | topk | "
                                                 "hidden (final hidden state; distribution recomputed "
                                                 "when read).")
    topk: int = Field(_D.topk, ge=1, description="k for target_store topk.")
    target_dtype: Literal[TARGET_DTYPES] = Field(_D.target_dtype, description="bf16 | fp16 for stored "
                                                 "probs / hidden.")
    shard_size: int = Field(256, ge=1, description="Samples per shard.")
    batch_tokens: int = Field(4096, ge=1, description="Padded tokens per target forward.")
    nproc: int = Field(1, ge=1, description="Worker processes (one per GPU).")
    device_map: Optional[Literal["auto"]] = Field(None, description="'auto': spread a target larger "
                                                  "than one GPU over all GPUs.")

    @model_validator(mode="after")
    def _knobs_agree(self):
        check_aux_layers(self.aux_layer_ids, "aux_layer_ids")
        if self.target_store == "topk" and self.draft_vocab_size is not None and self.topk > self.draft_vocab_size:
            raise refuse("topk", f"{self.topk} exceeds {{draft_vocab_size}} {self.draft_vocab_size}")
        if self.batch_tokens < self.max_length:
            raise refuse("batch_tokens", f"{self.batch_tokens} must be >= {{max_length}} ({self.max_length}) "
                         "so the longest sample fits one forward")
        if self.device_map is not None and self.nproc > 1:
            raise refuse("device_map", "'auto' spreads one target over all GPUs; it cannot be "
                         "combined with nproc > 1")
        return self


class CacheConfig(CacheSettings, DataSelection):
    """Every setting of `eagle cache`: the knobs plus target, data, output and resume."""

    cli_names = {**CacheSettings.cli_names, "output_dir": "--output"}

    target: str = Field(description="Target model folder, or 'demo' (embedded SmolLM2-135M-Instruct).")
    data: str = Field(description="Dataset: file, folder (e.g. `eagle regen` output), hub name, or 'demo'.")
    output_dir: str = Field(description="Cache folder to write.")
    vocab: Optional[str] = Field(None, description="Use this `eagle vocab` output instead of building "
                                 "the vocab from the data.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    resume: bool = Field(False, description="Continue the work found in the output directory.")
    command: Optional[str] = None  # provenance: the command line that made it
    extra_provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _device_ok(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise refuse("device", f"{self.device!r} is not one of auto, cpu, cuda, cuda:N")
        return self

    @property
    def storage(self) -> StorageOptions:
        return StorageOptions(aux_dtype=self.aux_dtype, target_store=self.target_store,
                              topk=self.topk, target_dtype=self.target_dtype)

    def check_inputs(self) -> None:
        if self.target != "demo" and not (Path(self.target) / "config.json").exists():
            raise InputDataError("not a Hugging Face model folder (no config.json)", path=self.target)
        if self.vocab is not None and not Path(self.vocab).exists():
            raise InputDataError("draft vocab folder not found", path=self.vocab)


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
