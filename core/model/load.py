"""Reading a trained draft from disk, whatever folder holds it: the one loader behind
`Eagle3Draft.from_pretrained`.

- a training run (its `best` checkpoint by held-out τ, `latest`, or a step) or one checkpoint
  folder: weights without the frozen embedding, which comes from the run's embed_tokens file or,
  for a step folder copied elsewhere, from the target recorded with it;
- a serving folder (our export, or a third party's in the same format): config.json +
  model.safetensors; embed_tokens may be absent (the engines share the target's) and then comes
  from the loaded target model.

Returns the config, the tensors and what else is known (`DraftInfo`); constructing the module is
the caller's (Eagle3Draft.from_pretrained), so this module never imports the model class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import InputDataError, UsageError
from core.model.config import DraftConfig

EMBED_KEY = "embed_tokens.weight"


@dataclass
class DraftInfo:
    kind: str  # "checkpoint" (a run or one of its checkpoints) | "export"
    path: Path
    draft_config: dict[str, Any]
    aux_layer_ids: list[int]
    checkpoint_dir: Path | None = None
    run_dir: Path | None = None
    step: int | None = None
    vocab_dir: Path | None = None
    target: str | None = None  # the target model folder the draft was trained for
    target_info: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # the run manifest's extra fields
    meta: dict[str, Any] = field(default_factory=dict)  # an export's eagle_export.json
    serving_config: dict[str, Any] = field(default_factory=dict)  # an export's config.json

    def load_vocab(self):
        from core.vocab import load_vocab

        if self.vocab_dir is None:
            raise InputDataError("no draft vocab next to this checkpoint", path=str(self.path))
        return load_vocab(self.vocab_dir)


def locate_draft(path: str | Path, which: str = "best") -> tuple[Path, bool]:
    """(folder, True for a run or checkpoint / False for a serving folder): cheap, so a wrong --draft
    or checkpoint is refused before a target model loads."""
    from core.train.checkpoint import find_checkpoint

    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputDataError("no such draft folder (run, checkpoint or export)", path=str(p))
    if find_checkpoint(p, which) is not None:
        return p, True
    if (p / "config.json").is_file():
        return p, False
    raise InputDataError("neither a training run / checkpoint nor a serving folder (no manifest.json, "
                         "draft.safetensors or config.json)", path=str(p))


def read_draft(path: str | Path, target_model: Any = None, which: str = "best",
               target_num_layers: int | None = None) -> tuple[DraftConfig, dict[str, torch.Tensor], DraftInfo]:
    p, is_run = locate_draft(path, which)
    return _read_checkpoint(p, which) if is_run else _read_serving(p, target_model, target_num_layers)


def _read_checkpoint(path: Path, which: str):
    from safetensors.torch import load_file

    from core.manifest import load_manifest, read_json
    from core.model.weights import read_embeddings
    from core.train import checkpoint as ck

    step_dir, run_dir = ck.resolve_checkpoint(path, which)
    ck_cfg = read_json(step_dir / ck.DRAFT_CONFIG)
    state_json = read_json(step_dir / ck.STATE_FILE)
    manifest = load_manifest(run_dir) if run_dir is not None else None
    extra = dict(manifest.extra) if manifest else {}
    target = extra.get("target") or state_json.get("target")
    tensors = load_file(str(step_dir / ck.DRAFT_FILE))
    if EMBED_KEY not in tensors:
        emb_file = run_dir / ck.EMBED_FILE if run_dir is not None else None
        if emb_file is not None and emb_file.exists():
            tensors[EMBED_KEY] = load_file(str(emb_file))[EMBED_KEY]
        elif target and Path(target).exists():
            tensors[EMBED_KEY] = read_embeddings(Path(target)).float()
        else:
            raise InputDataError("the draft's embedding matrix is not next to this checkpoint and "
                                 "the target folder is unknown", path=str(step_dir))
    vocab_dir = run_dir / ck.VOCAB_DIR if run_dir is not None and (run_dir / ck.VOCAB_DIR).exists() else None
    info = DraftInfo(kind="checkpoint", path=path, draft_config=ck_cfg,
                     aux_layer_ids=list(extra.get("aux_layer_ids") or ck_cfg.get("aux_layer_ids") or []),
                     checkpoint_dir=step_dir, run_dir=run_dir, step=int(state_json["step"]), vocab_dir=vocab_dir,
                     target=target, target_info=extra.get("target_info", {}),
                     settings=manifest.settings if manifest else {}, extra=extra)
    return DraftConfig.from_dict(ck_cfg), tensors, info


def _read_serving(folder: Path, target_model: Any, target_num_layers: int | None):
    from core.export.check import check_folder, render_report
    from core.export.format import draft_config_from_serving, read_export

    report = check_folder(folder)
    if not report.ok or report.layout not in ("eagle-tui", "sglang"):
        raise UsageError(f"{folder} is not a loadable serving folder:\n{render_report(report)}",
                         hint=f"convert it: eagle export --from {folder} --output DIR")
    config, tensors, meta = read_export(folder)
    d = draft_config_from_serving(config, meta)
    if d.get("target_num_hidden_layers") is None:
        d["target_num_hidden_layers"] = target_num_layers
    if d.get("target_num_hidden_layers") is None and target_model is not None:
        d["target_num_hidden_layers"] = int(target_model.config.num_hidden_layers)
    d["torch_dtype"] = str(tensors["fc.weight"].dtype).replace("torch.", "")
    if d.get("aux_layer_ids") is None:
        d["aux_layer_ids"] = []  # DraftConfig fills in the default for the target's depth
    cfg = DraftConfig.from_dict(d)
    tensors = dict(tensors)
    if EMBED_KEY not in tensors:
        if target_model is None:
            raise UsageError(f"{folder} has no embed_tokens; the target's embeddings are needed")
        tensors[EMBED_KEY] = target_model.get_input_embeddings().weight.detach().cpu()
    if "t2d" not in tensors:
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[tensors["d2t"].long() + torch.arange(tensors["d2t"].numel())] = True
        tensors["t2d"] = t2d
    produced = meta.get("produced_by") or {}
    info = DraftInfo(kind="export", path=folder, draft_config=d, aux_layer_ids=list(cfg.aux_layer_ids),
                     target=(meta.get("target") or {}).get("name_or_path"), target_info=meta.get("target") or {},
                     meta=meta, serving_config=config, step=produced.get("step"))
    return cfg, tensors, info
