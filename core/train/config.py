"""`TrainConfig`: every setting of `eagle train`, typed and validated before anything heavy loads.

Two modes: online (`data` + `target`: the frozen target runs inside the step) and offline
(`cache`: features come from `eagle cache` output). `TrainSettings` are the knobs (also `eagle run`'s
`train` section); `TrainConfig` adds the inputs. `settings()` is the part that shapes the trained
weights; `--resume` refuses a run whose stored settings differ from these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from core.errors import InputDataError, UsageError
from core.manifest import target_fingerprint
from core.settings import (Device, Settings, aux_layers_field, check_aux_layers, draft_vocab_size_field,
                           refuse)

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "eager", "naive")  # core.model.attention
TRAIN_FORMAT_VERSION = 1

# Settings that do not change the trained weights: they may differ on --resume.
NON_CONTENT_FIELDS = ("output_dir", "resume", "save_every", "keep_last", "eval_every",
                      "log_every", "nproc", "tensorboard", "select_data", "select_prompts",
                      "select_draft_tokens", "select_max_new_tokens", "select_seconds")


def _looks_local(source: str) -> bool:
    """A path-like data source (a hub dataset name is `owner/name` and does not exist locally)."""
    return (os.sep in source and source.startswith((".", "/", "~"))) or Path(source).suffix in (
        ".json", ".jsonl", ".parquet") or Path(source).exists()


BY_CONTENT = "(by content)"  # a local dataset or cache in a run's settings


class TrainSettings(Settings):
    """The training knobs: `eagle train` options and `eagle run`'s `train` section."""

    # ---- the draft and its objective ------------------------------------------------------------
    num_layers: int = Field(1, ge=1, description="Draft decoder layers. Deeper drafts serve only where "
                            "the engine supports them (vLLM); SGLang serves 1.")
    ttt_length: int = Field(7, ge=1, description="TTT unroll length L.")
    decay: float = Field(0.8, gt=0, le=1, description="Loss weight of TTT step k is decay^k.")
    attention: Literal[ATTENTION_BACKENDS] = Field(
        "auto", description="auto (flex on CUDA, sdpa on CPU) | sdpa | flex | eager | naive (reference).")
    head_init: Literal["random", "target"] = Field(
        "random", description="random | target: lm_head rows from the target's output head (tied targets: "
        "its embeddings), norm from its final norm.")
    freeze_head: bool = Field(False, description="With head_init target: keep lm_head and norm fixed.")
    feature_noise: float = Field(0.0, ge=0, le=1, description="Training only: Gaussian noise on the "
                                 "target's aux states, this share of each layer's per-token RMS (EAGLE "
                                 "trains on noisy features too: the draft then meets its own errors).")
    init_from: Optional[str] = Field(None, description="Warm start from a draft: an export (ours, or "
                                     "converted by `eagle export --from`) or a run; its vocabulary is "
                                     "remapped row by row.")
    # ---- optimisation --------------------------------------------------------------------------
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.015, ge=0, lt=1, description="Linear warmup share, then cosine.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, two numbers in [0, 1).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(0.5, ge=0, description="Max gradient norm (0: off).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step and process.")
    max_tokens_per_batch: int = Field(8192, ge=2, description="Packing budget: tokens per micro-batch "
                                      "and process (whole conversations, no padding).")
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps; overrides epochs "
                                     "(cycles the data).")
    seed: int = Field(0, description="Seed of the draft's initialisation and the data order.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share held out for validation when no "
                                "validation dataset is given (0: none).")
    # ---- checkpoint choice by held-out real τ (not content: the weights do not change) --------
    select_prompts: int = Field(4, ge=0, description="Held-out prompts decoded at every checkpoint to "
                                "pick `best` by real τ (0: best = latest).")
    select_max_new_tokens: int = Field(64, ge=1, description="Tokens per selection prompt.")
    select_seconds: float = Field(120.0, gt=0, description="Time bound per checkpoint for the selection; "
                                  "later prompts are skipped past it.")
    # ---- run management ------------------------------------------------------------------------
    save_every: int = Field(500, ge=1, description="Steps between checkpoints (and one at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept.")
    eval_every: Optional[int] = Field(None, ge=1, description="Steps between validations (default: "
                                      "save_every; also at start and end).")
    log_every: int = Field(1, ge=1, description="Steps between metrics lines.")
    nproc: int = Field(1, ge=1, description="Processes on this machine (spawns torchrun).")
    fsdp: bool = Field(False, description="Shard the draft with FSDP instead of DDP.")
    tensorboard: bool = Field(True, description="Write TensorBoard logs when the package is installed.")

    @model_validator(mode="after")
    def _knobs_agree(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise refuse("betas", f"must be two numbers in [0, 1) (got {self.betas})")
        if self.freeze_head and self.head_init != "target":
            raise refuse("freeze_head", "freezes a head initialised from the target: set {head_init} target")
        return self


class TrainConfig(TrainSettings):
    """Everything `train()` needs: the knobs plus the inputs (online data + target, or a cache)."""

    cli_names = {"output_dir": "--output-dir", "data_split": "--split", "data_limit": "--limit",
                 "data_shuffle_seed": "--shuffle-seed", "data_strict": "--strict",
                 "data_exclude": "--exclude", "aux_layer_ids": "--aux-layers"}

    output_dir: str = Field(description="Run directory.")
    # ---- inputs: online (data + target) or offline (cache) ------------------------------------
    target: Optional[str] = Field(None, description="Target model folder, or 'demo'. Offline: default is "
                                  "the folder the cache records.")
    data: Optional[str] = Field(None, description="Online: dataset file, folder (e.g. `eagle regen` "
                                "output), hub name, or 'demo'.")
    cache: Optional[str] = Field(None, description="Offline: an `eagle cache` folder.")
    data_split: Optional[str] = Field(None, description="Dataset split / slice, e.g. train[:1000].")
    messages_column: Optional[str] = Field(None, description="Column with the turns.")
    data_limit: Optional[int] = Field(None, ge=1, description="Use at most this many conversations "
                                      "(offline: the cache's first N samples).")
    data_shuffle_seed: Optional[int] = Field(None, description="Online: shuffle the rows first (as "
                                             "regen / cache do).")
    data_strict: bool = Field(False, description="Online: fail at the first bad row.")
    data_exclude: Optional[str] = Field(None, description="Online: a JSONL of held-out conversations "
                                        "whose prompts are left out of training.")
    val_data: Optional[str] = Field(None, description="A separate validation dataset (online).")
    vocab: Optional[str] = Field(None, description="Online: use this `eagle vocab` output.")
    draft_vocab_size: Optional[int] = draft_vocab_size_field(None)
    aux_layer_ids: Optional[list[int]] = aux_layers_field()
    max_length: int = Field(2048, ge=2, description="Tokens per conversation (truncated).")
    select_data: Optional[str] = Field(None, description="Held-out chat JSONL (eagle run: "
                                       "WORKDIR/heldout.jsonl): at every checkpoint, real speculative "
                                       "decoding on its first prompts picks `best`.")
    select_draft_tokens: int = Field(3, ge=1, description="Draft tokens per verification when selecting.")
    device: Device = Field("auto", description="auto | cpu | cuda")
    resume: bool = Field(False, description="Continue the work found in the output directory.")
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _inputs_agree(self):
        if not self.output_dir:
            raise refuse("output_dir", "an output (run) directory is required")
        if (self.data is None) == (self.cache is None):
            raise refuse("data", "give exactly one of --data (online: the target runs inside the step) "
                         "or --cache (offline: features from `eagle cache`)")
        if self.online and not self.target:
            raise refuse("target", "online training (--data) needs the target model folder")
        for name in ("vocab", "draft_vocab_size", "aux_layer_ids"):
            if not self.online and getattr(self, name) is not None:
                what = "aux layers" if name == "aux_layer_ids" else "draft vocab"
                raise refuse(name, f"offline training uses the cache's {what}")
        check_aux_layers(self.aux_layer_ids, "aux_layer_ids")
        if self.max_tokens_per_batch < self.max_length:
            raise refuse("max_tokens_per_batch", f"{self.max_tokens_per_batch} is below {{max_length}} "
                         f"{self.max_length}: one sample must fit in a micro-batch")
        if self.select_data is not None and self.select_prompts < 1:
            raise refuse("select_prompts", "must be >= 1 with --select-data")
        return self

    # ---- derived -------------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self.cache is None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    def resolved_eval_every(self) -> int:
        return self.eval_every or self.save_every

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = sorted(set(d) - set(cls.model_fields))
        if unknown:
            raise UsageError(f"unknown train setting(s): {', '.join(unknown)}")
        return cls(**d)

    def settings(self, world_size: int | None = None, device_type: str | None = None,
                 recorded: dict[str, Any] | None = None) -> dict[str, Any]:
        """The content-shaping settings stored in the run manifest (compared on --resume).

        A local dataset or cache is known by its content (the run's data fingerprint, compared on
        --resume) and a local target folder by `target_fingerprint`, not their paths, so a moved
        or renamed workdir or model folder resumes; `recorded` (the manifest's settings) keeps the
        path an older run recorded instead.

        `device_type` ("cpu"/"cuda") replaces device "auto", and picks the attention backend
        "auto" stands for: resuming a CPU run on a GPU would change the numbers.
        """
        d = self.to_dict()
        if device_type is not None:
            d["device"] = device_type
            if d["attention"] == "auto":
                d["attention"] = "flex" if device_type == "cuda" else "sdpa"
        for k in NON_CONTENT_FIELDS:
            d.pop(k, None)
        for k in ("target", "data", "cache", "val_data", "vocab", "init_from", "data_exclude"):
            v = d.get(k)
            if v is not None and v != "demo" and _looks_local(v):
                d[k] = str(Path(v).expanduser().resolve())
                if k == "target" and (Path(d[k]) / "config.json").is_file():
                    if not isinstance((recorded or {}).get(k), str):  # older runs recorded the path
                        d[k] = target_fingerprint(d[k])
                if k in ("data", "cache", "val_data", "data_exclude"):  # all in the data fingerprint
                    old = (recorded or {}).get(k)
                    d[k] = old if old not in (None, BY_CONTENT) else BY_CONTENT
        d["world_size"] = int(world_size if world_size is not None else self.nproc)
        d["format_version"] = TRAIN_FORMAT_VERSION
        return d

    # ---- validation ----------------------------------------------------------------------------
    def check_inputs(self) -> None:
        """The files named must exist (bounds and choices were checked on construction)."""
        if self.target is not None and self.target != "demo":
            p = Path(self.target).expanduser()
            if not (p / "config.json").exists():
                raise InputDataError("not a Hugging Face model folder (no config.json)", path=str(p))
        if self.cache is not None and not (Path(self.cache).expanduser() / "manifest.json").exists():
            raise InputDataError("not an `eagle cache` folder (no manifest.json)", path=self.cache)
        for name in ("data", "val_data"):
            v = getattr(self, name)
            if v is not None and v.startswith((".", "/", "~")) and not Path(v).expanduser().exists():
                raise InputDataError("dataset not found", path=v)
        if self.vocab is not None and not (Path(self.vocab).expanduser() / "vocab.json").exists():
            raise InputDataError("not a draft vocab folder (no vocab.json)", path=self.vocab)
        if self.select_data is not None and not Path(self.select_data).expanduser().is_file():
            raise InputDataError("held-out prompts for checkpoint selection not found", path=self.select_data)
        if self.init_from is not None and not Path(self.init_from).expanduser().is_dir():
            raise InputDataError("no such draft folder for --init-from", path=self.init_from)

