"""Draft initialisations that start from what is already known, not from noise.

- `init_head_from_target`: the draft's `lm_head` rows are the target's output-head rows of the draft
  vocab (the input embeddings for tied-embedding targets such as SmolLM2, Llama-3.2-1B, small
  Qwen3), and `norm` the target's final norm, as speculators, DeepSpec and ModelOpt do; `freeze`
  keeps them fixed.
- `warm_start`: every weight from an existing draft (an export, ours or converted by `eagle export
  --from`, or a run / checkpoint); its `lm_head` rows are remapped by target token id onto this
  draft's vocabulary, rows it lacks keep their initialisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.errors import InputDataError, UsageError
from core.model.weights import read_target_tensor

_HEAD_KEYS = ("lm_head.weight", "model.lm_head.weight", "language_model.lm_head.weight")
_NORM_KEYS = ("model.norm.weight", "norm.weight", "model.language_model.norm.weight",
              "language_model.model.norm.weight")
# Loaded from the source but owned by this draft: its vocab maps and the target's embeddings.
_OWN_KEYS = ("embed_tokens.weight", "d2t", "t2d", "lm_head.weight")


def draft_target_ids(draft: Any) -> torch.Tensor:
    """The target token id of every draft-vocab row."""
    return torch.arange(draft.d2t.numel()) + draft.d2t.long().cpu()


@torch.no_grad()
def init_head_from_target(draft: Any, target: str | Path, freeze: bool = False) -> dict[str, Any]:
    from transformers import AutoConfig

    target = Path(target)
    tied = bool(getattr(AutoConfig.from_pretrained(target), "tie_word_embeddings", False))
    head = None if tied else read_target_tensor(target, _HEAD_KEYS)
    source = "output head"
    if head is None:  # tied (or a checkpoint that leaves the tied head out): the embeddings are it
        head, source = draft.embed_tokens.weight.detach().cpu(), "tied input embeddings"
    norm = read_target_tensor(target, _NORM_KEYS)
    if norm is None:
        raise InputDataError(f"no final norm ({' / '.join(_NORM_KEYS[:2])}) in the target's weights",
                             path=str(target))
    if head.shape[1] != draft.lm_head.weight.shape[1] or norm.shape != draft.norm.weight.shape:
        raise UsageError(f"the target's head {tuple(head.shape)} / norm {tuple(norm.shape)} do not fit "
                         f"the draft's hidden size {draft.lm_head.weight.shape[1]}")
    draft.lm_head.weight.copy_(head[draft_target_ids(draft)].float())
    draft.norm.weight.copy_(norm.float())
    for p in (draft.lm_head.weight, draft.norm.weight):
        p.requires_grad_(not freeze)
    return {"head_init": "target", "head_source": source, "head_frozen": freeze}


def _source_state(source: Path) -> tuple[dict[str, torch.Tensor], str]:
    from core.export.check import check_folder, render_report

    if (source / "manifest.json").is_file() and (source / "checkpoints").is_dir() \
            or (source / "draft.safetensors").is_file():
        from core.model import Eagle3Draft

        d, info = Eagle3Draft.from_pretrained(source, with_info=True)
        return d.state_dict(), f"checkpoint {info.checkpoint_dir}"
    if not source.is_dir():
        raise InputDataError("no such draft folder for --init-from", path=str(source))
    report = check_folder(source)
    if report.layout not in ("eagle-tui", "sglang") or not report.ok:
        raise UsageError(f"--init-from {source}: a {report.layout} folder that is not loadable as is "
                         f"({render_report(report).splitlines()[-1].strip()})",
                         hint=f"convert it first: eagle export --from {source} --output DIR")
    from core.export.format import read_export

    _config, tensors, _meta = read_export(source)
    return tensors, f"export {source}"


@torch.no_grad()
def warm_start(draft: Any, source: str | Path) -> dict[str, Any]:
    """Copy an existing draft's weights into `draft` (same architecture and target)."""
    state, what = _source_state(Path(source).expanduser())
    own = draft.state_dict()
    if "d2t" not in state or "lm_head.weight" not in state:
        raise UsageError(f"--init-from {source}: no d2t / lm_head.weight in the draft")
    src_t2d_size = int(state["t2d"].numel()) if "t2d" in state else None
    if src_t2d_size is not None and src_t2d_size != draft.t2d.numel():
        raise UsageError(f"--init-from {source}: made for a target vocabulary of {src_t2d_size} ids, "
                         f"this target has {draft.t2d.numel()}")
    missing = sorted(k for k in own if k not in _OWN_KEYS and k not in state)
    extra = sorted(k for k in state if k not in own and k not in _OWN_KEYS)
    if missing or extra:
        raise UsageError(f"--init-from {source}: another draft architecture (missing {missing[:3]}, "
                         f"extra {extra[:3]})", hint="same --num-layers and target as the source draft")
    for k, v in own.items():
        if k in _OWN_KEYS:
            continue
        if tuple(state[k].shape) != tuple(v.shape):
            raise UsageError(f"--init-from {source}: {k} has shape {tuple(state[k].shape)}, this draft "
                             f"needs {tuple(v.shape)} (another target or hidden size)")
        v.copy_(state[k].to(v.dtype))
    # lm_head rows by target token id: the source's vocabulary may differ from this data's
    src_ids = torch.arange(state["d2t"].numel()) + state["d2t"].long()
    row_of = {int(t): i for i, t in enumerate(src_ids.tolist())}
    ours = draft_target_ids(draft).tolist()
    pairs = [(j, row_of[t]) for j, t in enumerate(ours) if t in row_of]
    if pairs:
        dst, src = (torch.tensor(x) for x in zip(*pairs))
        draft.lm_head.weight[dst] = state["lm_head.weight"][src].to(draft.lm_head.weight.dtype)
    return {"init_from": str(source), "init_source": what, "vocab_rows_matched": len(pairs),
            "vocab_rows": len(ours)}
