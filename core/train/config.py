"""`TrainConfig`: every setting of `eagle train`, typed and validated before anything heavy loads.

Two modes: online (`data` + `target`: the frozen target runs inside the step) and offline
(`cache`: features come from `eagle cache` output). `settings()` is the part that shapes the
trained weights; `--resume` refuses a run whose stored settings differ from these.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from core.errors import InputDataError, UsageError

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "eager", "naive")  # core.model.attention
DEVICES = ("auto", "cpu", "cuda")
TRAIN_FORMAT_VERSION = 1

# Settings that do not change the trained weights: they may differ on --resume.
NON_CONTENT_FIELDS = ("output_dir", "resume", "save_every", "keep_last", "eval_every",
                      "log_every", "nproc", "tensorboard", "select_data", "select_prompts",
                      "select_draft_tokens", "select_max_new_tokens", "select_seconds")


def _looks_local(source: str) -> bool:
    """A path-like data source (a hub dataset name is `owner/name` and does not exist locally)."""
    return (os.sep in source and source.startswith((".", "/", "~"))) or Path(source).suffix in (
        ".json", ".jsonl", ".parquet") or Path(source).exists()


@dataclass
class TrainConfig:
    output_dir: str
    # ---- inputs: online (data + target) or offline (cache) ------------------------------------
    target: Optional[str] = None  # HF folder; offline: optional (default: the cache's target)
    data: Optional[str] = None
    cache: Optional[str] = None
    data_split: Optional[str] = None
    messages_column: Optional[str] = None
    data_limit: Optional[int] = None
    data_shuffle_seed: Optional[int] = None  # online: the dataset's shuffle, as regen / cache use it
    data_strict: bool = False
    data_exclude: Optional[str] = None  # online: held-out conversations (JSONL) left out of training
    val_data: Optional[str] = None
    val_fraction: float = 0.05
    vocab: Optional[str] = None  # a prebuilt `eagle vocab` folder (online only)
    draft_vocab_size: Optional[int] = None  # default: 32000 for targets with >64k ids, else 8192
    aux_layer_ids: Optional[list[int]] = None
    max_length: int = 2048
    # ---- the draft and its objective ------------------------------------------------------------
    num_layers: int = 1
    ttt_length: int = 7
    decay: float = 0.8
    attention: str = "auto"
    head_init: str = "random"  # random | target: lm_head rows of the target's head (tied: embeddings), norm
    freeze_head: bool = False  # with head_init target: keep lm_head and norm fixed (speculators' choice)
    init_from: Optional[str] = None  # warm start: an exported draft or a run / checkpoint
    # ---- optimisation --------------------------------------------------------------------------
    lr: float = 1e-4
    warmup_ratio: float = 0.015
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 0.5  # 0 turns clipping off
    grad_accum: int = 1
    max_tokens_per_batch: int = 8192  # packing budget of one micro-batch (per process)
    epochs: int = 1
    max_steps: Optional[int] = None  # when set, overrides epochs (cycles the data as needed)
    seed: int = 0
    # ---- checkpoint choice by held-out real τ (not content: the weights do not change) --------
    select_data: Optional[str] = None  # held-out chat JSONL (eagle run: heldout.jsonl); None: best = latest
    select_prompts: int = 4  # its first N usable prompts, decoded at every checkpoint
    select_draft_tokens: int = 3
    select_max_new_tokens: int = 64
    select_seconds: float = 120.0  # bound per checkpoint; later prompts are skipped past it
    # ---- run management ------------------------------------------------------------------------
    save_every: int = 500
    keep_last: int = 2
    eval_every: Optional[int] = None  # default: save_every; validation also runs at start and end
    log_every: int = 1
    device: str = "auto"
    nproc: int = 1
    fsdp: bool = False
    tensorboard: bool = True  # used when the tensorboard package is installed
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self.cache is None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    def resolved_eval_every(self) -> int:
        return self.eval_every or self.save_every

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UsageError(f"unknown train setting(s): {', '.join(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(float(b) for b in d["betas"])
        return cls(**d)

    def settings(self, world_size: int | None = None, device_type: str | None = None) -> dict[str, Any]:
        """The content-shaping settings stored in the run manifest (compared on --resume).

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
        for k in ("target", "data", "cache", "val_data", "vocab", "init_from"):
            v = d.get(k)
            if v is not None and v != "demo" and _looks_local(v):
                d[k] = str(Path(v).expanduser().resolve())
        d["world_size"] = int(world_size if world_size is not None else self.nproc)
        d["format_version"] = TRAIN_FORMAT_VERSION
        return d

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise UsageError naming the field; checks that need no model or data loading."""
        def bad(name: str, msg: str) -> UsageError:
            return UsageError(f"--{name.replace('_', '-')}: {msg}")

        if not self.output_dir:
            raise bad("output_dir", "an output (run) directory is required")
        if (self.data is None) == (self.cache is None):
            raise UsageError("give exactly one of --data (online: the target runs inside the step) "
                             "or --cache (offline: features from `eagle cache`)")
        if self.online and not self.target:
            raise bad("target", "online training (--data) needs the target model folder")
        if not self.online and self.vocab:
            raise bad("vocab", "offline training uses the cache's own draft vocab")
        if not self.online and self.draft_vocab_size is not None:
            raise bad("draft_vocab_size", "offline training uses the cache's own draft vocab")
        if not self.online and self.aux_layer_ids is not None:
            raise bad("aux_layers", "offline training uses the cache's aux layers")
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
        ints = {"ttt_length": 1, "grad_accum": 1, "max_length": 2, "max_tokens_per_batch": 2,
                "epochs": 1, "save_every": 1, "keep_last": 1, "num_layers": 1, "nproc": 1,
                "log_every": 1, "select_prompts": 1, "select_draft_tokens": 1,
                "select_max_new_tokens": 1}
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise bad(name, f"must be an integer >= {lo} (got {v!r})")
        for name in ("max_steps", "eval_every", "draft_vocab_size", "data_limit"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise bad(name, f"must be a positive integer (got {v!r})")
        if self.select_data is not None and not Path(self.select_data).expanduser().is_file():
            raise InputDataError("held-out prompts for checkpoint selection not found", path=self.select_data)
        if not self.select_seconds > 0:
            raise bad("select_seconds", f"must be > 0 (got {self.select_seconds})")
        if self.max_tokens_per_batch < self.max_length:
            raise bad("max_tokens_per_batch", f"{self.max_tokens_per_batch} is below --max-length "
                      f"{self.max_length}: one sample must fit in a micro-batch")
        if not 0 < self.decay <= 1:
            raise bad("decay", f"must be in (0, 1] (got {self.decay})")
        if not self.lr > 0:
            raise bad("lr", f"must be > 0 (got {self.lr})")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", f"must be in [0, 1) (got {self.warmup_ratio})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", f"must be two numbers in [0, 1) (got {self.betas})")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"must be >= 0 (got {self.weight_decay})")
        if self.grad_clip < 0:
            raise bad("grad_clip", f"must be >= 0, 0 = off (got {self.grad_clip})")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", f"must be in [0, 1) (got {self.val_fraction})")
        if self.head_init not in ("random", "target"):
            raise bad("head_init", f"{self.head_init!r} is not one of random, target")
        if self.freeze_head and self.head_init != "target":
            raise bad("freeze_head", "freezes a head initialised from the target: add --head-init target")
        if self.init_from is not None and not Path(self.init_from).expanduser().is_dir():
            raise InputDataError("no such draft folder for --init-from", path=self.init_from)
        if self.attention not in ATTENTION_BACKENDS:
            raise bad("attention", f"{self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if self.device not in DEVICES:
            raise bad("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        if self.aux_layer_ids is not None:
            ids = list(self.aux_layer_ids)
            if len(ids) != 3 or len(set(ids)) != 3 or min(ids) < 0:
                raise bad("aux_layers", f"need three distinct non-negative layer ids (got {ids})")
        return self


def default_draft_vocab_size(target_vocab_size: int) -> int:
    """32000 (the anchors' default) for large vocabularies, 8192 for small targets."""
    return min(target_vocab_size, 32000 if target_vocab_size > 64000 else 8192)
