"""Export an EAGLE-3 draft for serving: `export_draft(ExportConfig, events)`.

Sources: an eagle-tui training run or checkpoint (core.train), or an existing serving folder
(re-export, e.g. to the speculators format or another dtype). Third-party checkpoints go through
`convert_checkpoint` (`eagle export --from`). Every export is validated before it is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from core.data.identity import TRAINED_ON
from core import disk, locking
from core.errors import InputDataError, UsageError
from core.events import EventSink, NullSink, StageFinished, StageStarted
from core.export.check import CheckReport, check_folder, render_report
from core.export.convert import ConvertResult
from core.export.convert import convert_checkpoint as _convert_checkpoint
from core.export.settings import FORMATS, ConvertConfig, ExportConfig, ExportSettings
from core.export.format import (CONFIG, chat_template_hash, draft_config_from_serving,
                                read_export, write_export)

__all__ = ["ExportConfig", "ExportResult", "export_draft", "check_folder", "CheckReport",
           "render_report", "ConvertConfig", "ConvertResult", "convert_checkpoint", "ExportSettings",
           "FORMATS"]


@dataclass
class ExportResult:
    output_dir: str
    format: str
    meta: dict[str, Any] = field(default_factory=dict)


def _target_info(target: str | None, recorded: dict[str, Any]) -> dict[str, Any]:
    info = {k: v for k, v in (recorded or {}).items() if v is not None}
    if target:
        info["name_or_path"] = target
    tp = info.get("name_or_path")
    if tp and (Path(tp) / CONFIG).is_file():
        cfg = json.loads((Path(tp) / CONFIG).read_text())
        cfg = cfg.get("text_config") or cfg
        info.setdefault("num_hidden_layers", cfg.get("num_hidden_layers"))
        info.setdefault("hidden_size", cfg.get("hidden_size"))
        info.setdefault("vocab_size", cfg.get("vocab_size"))
        info.setdefault("architectures", cfg.get("architectures"))
        info["chat_template_sha256"] = chat_template_hash(tp) or info.get("chat_template_sha256")
    return info


def _metric_records(run_dir: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(split, metrics) of every readable line of a run's metrics.jsonl; none without one."""
    if run_dir is None or not (Path(run_dir) / "metrics.jsonl").is_file():
        return []
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append((str(rec.get("split", "train")), rec.get("metrics", rec)))
    return out


def _upto(metrics: dict[str, Any], step: int | None) -> bool:
    return step is None or not isinstance(metrics.get("step"), (int, float)) or metrics["step"] <= step


def run_tau_sims(run_dir: Path | None, step: int | None = None) -> tuple[float | None, float | None]:
    """(validation, own batches) simulated τ of a run, from what training logged up to `step` when
    given (the checkpoint eval or export took; `best` may come before the end), in one read:
    - validation: the last one logged (the training side's last when no validation was);
    - own batches: their last epoch, weighted by supervised tokens (one batch is too noisy). Next to
      validation's, the gap says how much of what the draft learned is memorized."""
    last: dict[str, float] = {}
    rows = []
    for split, metrics in _metric_records(run_dir):
        if not _upto(metrics, step):
            continue
        for k, v in metrics.items():
            if k.endswith("tau_sim") and isinstance(v, (int, float)):
                last[split] = float(v)
        if split == "train" and isinstance(metrics.get("tau_sim"), (int, float)) \
                and isinstance(metrics.get("epoch"), (int, float)):
            rows.append(metrics)
    own = None
    if rows:
        final = max(m["epoch"] for m in rows)
        epoch = [(float(m["tau_sim"]), float(m.get("supervised") or 1)) for m in rows if m["epoch"] == final]
        own = sum(t * w for t, w in epoch) / sum(w for _, w in epoch)
    return last.get("val", last.get("train")), own


def _from_run(source: Path, which: str = "best") -> tuple[dict, dict, dict, dict]:
    """(draft config dict, state dict, produced_by, recorded target info) of a run / checkpoint."""
    from core.manifest import sha256_file
    from core.model import Eagle3Draft
    from core.train.checkpoint import BEST_INFO, DRAFT_FILE

    draft, info = Eagle3Draft.from_pretrained(source, which=which, with_info=True)
    cfg = draft.config.to_dict()
    state = {k: v for k, v in draft.state_dict().items()}
    tau_sim, tau_sim_train = run_tau_sims(info.run_dir, info.step)
    produced_by = {"kind": "train", "source": str(Path(info.checkpoint_dir).resolve()),
                   "run_dir": str(info.run_dir) if info.run_dir else None, "step": info.step,
                   "tau_sim": tau_sim, "tau_sim_train": tau_sim_train, "checkpoint": which,
                   # the weights by content: an export is current for these weights wherever they lie
                   "weights_sha256": sha256_file(Path(info.checkpoint_dir) / DRAFT_FILE)}
    best = info.run_dir / BEST_INFO if info.run_dir else None
    if best is not None and best.is_file():  # the held-out τ that chose this checkpoint
        b = json.loads(best.read_text())
        if b.get("step") == info.step:
            produced_by["held_out_tau"] = b.get("tau")
    target = dict(info.target_info or {})
    if info.target:
        target["name_or_path"] = str(info.target)
    return cfg, state, produced_by, target


def export_lock_file(output_dir: str | Path) -> Path:
    """An export folder appears whole (staged beside it, then renamed into place), so its writer
    lock (core.locking) lives beside it: `.NAME.eagle.lock`."""
    return locking.beside(output_dir)


def export_bytes(state: dict[str, Any], dtype: str) -> int:
    """Bytes of the serving weights: the state's tensors, floats at the export dtype."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype)
    return sum(t.numel() * (size if size and t.is_floating_point() else t.element_size())
               for t in state.values()) + 64 * 1024  # + config, metadata, safetensors header


def export_draft(cfg: ExportConfig, events: EventSink | None = None) -> ExportResult:
    """Write a serving folder from a run, checkpoint or serving folder (one writer at a time)."""
    cfg.validate()  # bad arguments leave no lock file behind
    with locking.held(cfg.output_dir, export_lock_file(cfg.output_dir)):
        return _export_draft(cfg, events)


def convert_checkpoint(cfg: ConvertConfig, events: EventSink | None = None) -> ConvertResult:
    """`eagle export --from`: core.export.convert.convert_checkpoint, one writer at a time."""
    with locking.held(cfg.output_dir, export_lock_file(cfg.output_dir)):
        return _convert_checkpoint(cfg, events)


def _export_draft(cfg: ExportConfig, events: EventSink | None = None) -> ExportResult:
    from core.train.checkpoint import find_checkpoint

    events = events or NullSink()
    cfg.validate()
    source = Path(cfg.source)
    events(StageStarted(stage="export", settings={"source": str(source), "format": cfg.format,
                                                  "output_dir": cfg.output_dir}))
    trained_on = None
    if find_checkpoint(source, cfg.checkpoint) is not None:
        draft_cfg, state, produced_by, recorded = _from_run(source, cfg.checkpoint)
        run_dir = produced_by.get("run_dir")
        trained_on = Path(run_dir) / TRAINED_ON if run_dir else None
    elif (source / CONFIG).is_file():
        report = check_folder(source)
        if not report.ok:
            raise UsageError(f"{source} has problems; convert it instead of re-exporting",
                             hint=f"eagle export --from {source} --output {cfg.output_dir}")
        config, state, meta = read_export(source)
        if report.layout == "speculators":  # config and key names of our serving format first
            from core.export.speculators import serving_view

            config, state = serving_view(config, state)
        draft_cfg = draft_config_from_serving(config, meta)
        produced_by = {"kind": "re-export", "source": str(source.resolve()),
                       "original": meta.get("produced_by")}
        recorded = meta.get("target") or {}
        trained_on = source / TRAINED_ON
    else:
        raise InputDataError("neither a training run/checkpoint nor a serving folder", path=str(source),
                             hint="third-party checkpoints: eagle export --from DIR --output OUT")
    target = _target_info(cfg.target, recorded)
    if draft_cfg.get("target_num_hidden_layers") is None and target.get("num_hidden_layers"):
        draft_cfg["target_num_hidden_layers"] = int(target["num_hidden_layers"])
    disk.check_free(cfg.output_dir, export_bytes(state, cfg.dtype), f"the export to {cfg.output_dir}")
    if cfg.format == "speculators":
        from core.export.speculators import write_speculators_export

        meta = write_speculators_export(cfg.output_dir, draft_cfg, state, produced_by=produced_by,
                                        target=target, speculative_tokens=cfg.num_speculative_tokens,
                                        include_embed=cfg.include_embed, dtype=cfg.dtype)
    else:
        meta = write_export(cfg.output_dir, draft_cfg, state, produced_by=produced_by, target=target,
                            include_embed=cfg.include_embed, dtype=cfg.dtype)
    if trained_on is not None and trained_on.is_file():  # eval refuses prompts the draft trained on
        from core.manifest import write_bytes_atomic

        write_bytes_atomic(Path(cfg.output_dir) / TRAINED_ON, trained_on.read_bytes())
    events(StageFinished(stage="export", summary={"output_dir": cfg.output_dir, "format": cfg.format,
                                                  "aux_layer_ids": meta.get("aux_layer_ids"),
                                                  "warnings": meta.get("warnings", [])}))
    return ExportResult(cfg.output_dir, cfg.format, meta)
