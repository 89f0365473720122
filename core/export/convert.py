"""`eagle export --from DIR`: convert the anchors' checkpoints into our validated serving format.

Layouts read (checked against their public code):
  - NeMo Automodel: `epoch_<E>_step_<S>/` with `model/` (or `model/consolidated/`) holding
    config.json (the target's config copied, so `num_hidden_layers` is the target's, e.g. 32) and
    safetensors with `model.embed_tokens / model.fc / model.layers.0.* / model.norm / lm_head` keys,
    plus `eagle_meta.pt` (global_step, epoch, selected_token_ids [Vd], selected_token_mask [V]),
    read with torch.load(weights_only=True).
  - SpecForge: `epoch_<E>[_step_<S>]/` with config.json (LlamaForCausalLMEagle3) and
    model.safetensors (`midlayer.*`, fc, norm, lm_head, d2t, t2d; embeddings left out).
    training_state.pt beside it is a full pickle and is never read.
  - speculators: config.json with speculators_model_type "eagle3" + transformer_layer_config and
    `layers.0.*` keys.
  - our own export folders (re-export, e.g. to change dtype).
Defects fixed: key prefixes and names, an inherited layer count, a missing draft_vocab_size, RoPE
only in rope_parameters, aux layer ids in one engine's convention only. Defects that change the
math (P-EAGLE, norm_before_residual, extra layers) are refused with an explanation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputDataError, UsageError
from core.events import EventSink, Log, NullSink, StageFinished, StageStarted
from core.export.format import CONFIG, META, load_safetensors_dir, read_json_file, write_export
from core.export.spec import OPTIONAL_KEYS, REQUIRED_KEYS
from core.export.check import speculators_flat_config
from core.export.settings import ConvertConfig
from core.export.validate import PEAGLE_HINT, normalize_key

STAGE = "export"


@dataclass
class ConvertResult:
    output_dir: str
    source_layout: str
    fixes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def detect_source(path: Path) -> tuple[str, Path, Path | None]:
    """(layout, folder holding config.json + weights, NeMo eagle_meta.pt or None)."""
    if not path.is_dir():
        raise InputDataError("not a folder", path=str(path))
    for root in (path, path.parent, path.parent.parent):
        if (root / "eagle_meta.pt").is_file():
            for inner in (path, path / "model" / "consolidated", path / "model"):
                if (inner / CONFIG).is_file():
                    return "nemo", inner, root / "eagle_meta.pt"
    if (path / CONFIG).is_file():
        cfg = read_json_file(path / CONFIG)
        if "speculators_model_type" in cfg:
            return "speculators", path, None
        if (path / META).is_file():
            return "eagle-tui", path, None
        return "specforge", path, None
    for inner in (path / "model" / "consolidated", path / "model"):
        if (inner / CONFIG).is_file():
            return "nemo", inner, None
    raise InputDataError("no config.json found (looked in it, model/ and model/consolidated/)",
                         path=str(path), hint="point --from at a checkpoint folder")


def _load_meta_pt(path: Path) -> dict[str, Any]:
    import torch

    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects: say so
        raise InputDataError(f"cannot read it with torch.load(weights_only=True): {e}",
                             path=str(path)) from e
    if not isinstance(meta, dict):
        raise InputDataError("expected a dict", path=str(path))
    return meta


def _rename_keys(tensors: dict[str, Any], fixes: list[str], layout: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    renamed = 0
    for k, v in tensors.items():
        if k.startswith("verifier_") or k in ("selected_token_ids", "selected_token_mask") or \
                k.endswith((".selected_token_ids", ".selected_token_mask")):
            continue  # speculators' frozen verifier copies / NeMo vocab buffers (handled separately)
        if k == "mask_hidden" or k.endswith(".mask_hidden"):
            raise UsageError("the source is a P-EAGLE (parallel drafting) head (mask_hidden): it "
                             "cannot be converted to an EAGLE-3 head", hint=PEAGLE_HINT)
        if re.match(r"^(model\.)?(layers|midlayers)\.[1-9]\d*\.", k):
            raise UsageError(f"the source has more than one decoder layer ({k}): the EAGLE-3 "
                             "serving format holds exactly one")
        nk = normalize_key(k)
        renamed += nk != k
        out[nk] = v
    if renamed:
        fixes.append(f"renamed {renamed} keys to the serving names (no 'model.' prefix, "
                     "'layers.0.' -> 'midlayer.')")
    unknown = sorted(set(out) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise UsageError(f"the source has tensors this format cannot hold: {unknown[:5]} (an "
                         "EAGLE-3.1 / gpt-oss variant?); SGLang would silently ignore them")
    return out


def _vocab_maps(tensors: dict, nemo_meta: dict | None, fixes: list[str]) -> None:
    import torch

    if nemo_meta is not None and "d2t" not in tensors:
        ids = nemo_meta.get("selected_token_ids")
        if ids is None:
            raise UsageError("eagle_meta.pt has no selected_token_ids: the draft-to-target vocab map "
                             "is unknown")
        ids = ids.to(torch.int64).flatten()
        tensors["d2t"] = ids - torch.arange(ids.numel())
        fixes.append("built d2t from eagle_meta.pt selected_token_ids")
        mask = nemo_meta.get("selected_token_mask")
        if mask is not None and "t2d" not in tensors:
            tensors["t2d"] = mask.to(torch.bool).flatten()
    if "d2t" in tensors and "t2d" not in tensors and "embed_tokens.weight" in tensors:
        v = tensors["embed_tokens.weight"].shape[0]
        t2d = torch.zeros(v, dtype=torch.bool)
        tid = tensors["d2t"].to(torch.int64) + torch.arange(tensors["d2t"].numel())
        t2d[tid.clamp(0, v - 1)] = True
        tensors["t2d"] = t2d
        fixes.append("rebuilt t2d from d2t")


def _target_config(target: str | None) -> dict[str, Any]:
    if not target:
        return {}
    p = Path(target)
    if not (p / CONFIG).is_file():
        raise InputDataError("--target must be a local model folder with config.json", path=str(p))
    cfg = read_json_file(p / CONFIG)
    return cfg.get("text_config") or cfg


def _target_embeddings(target: str) -> Any:
    from safetensors import safe_open

    from core.export.check import weight_files

    for f in weight_files(Path(target)):
        with safe_open(str(f), framework="pt") as st:
            for key in ("model.embed_tokens.weight", "embed_tokens.weight",
                        "model.language_model.embed_tokens.weight"):
                if key in st.keys():
                    return st.get_tensor(key)
    raise InputDataError("no embed_tokens weight found in the target's safetensors", path=target)


def _aux_layers(cfg: dict, layout: str, fixes: list[str]) -> list[int] | None:
    """Aux layers in our convention (0-based outputs) from either engine's field."""
    sg = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    vl = cfg.get("eagle_aux_hidden_state_layer_ids")
    if sg is not None and vl is not None and [int(i) + 1 for i in sg] != [int(i) for i in vl]:
        raise UsageError(f"the source's aux layer ids disagree (eagle_config {list(sg)}, top-level "
                         f"{list(vl)}): which layers the draft was trained on is ambiguous")
    if sg is not None:
        return [int(i) for i in sg]
    if vl is not None:
        fixes.append(f"aux layers {list(vl)} read in vLLM's convention (residual entering layer i) "
                     f"as outputs of {[int(i) - 1 for i in vl]}")
        return [int(i) - 1 for i in vl]
    return None


def _draft_config(flat: dict, tensors: dict, tcfg: dict, cfg: ConvertConfig, fixes: list[str],
                  aux: list[int] | None) -> dict[str, Any]:
    h = int(flat["hidden_size"])
    nh = int(flat["num_attention_heads"])
    q_rows = tensors["midlayer.self_attn.q_proj.weight"].shape[0]
    head_dim = int(flat.get("head_dim") or q_rows // nh)
    if flat.get("num_hidden_layers") != 1:
        fixes.append(f"num_hidden_layers {flat.get('num_hidden_layers')} -> 1 (inherited from the target)")
    vd = int(tensors["lm_head.weight"].shape[0])
    if flat.get("draft_vocab_size") != vd:
        fixes.append(f"draft_vocab_size {flat.get('draft_vocab_size')} -> {vd} (rows of lm_head)")
    ht = int(tensors["fc.weight"].shape[1]) // 3
    theta = flat.get("rope_theta") or (flat.get("rope_parameters") or {}).get("rope_theta")
    if flat.get("rope_theta") is None and theta is not None:
        fixes.append(f"rope_theta {theta} copied from rope_parameters to the classic field")
    if theta is None and cfg.rope_theta is not None:
        theta = cfg.rope_theta
        fixes.append(f"rope_theta {theta} from --rope-theta")
    if theta is None:
        theta = tcfg.get("rope_theta") or (tcfg.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            fixes.append(f"rope_theta {theta} taken from the target's config")
    if theta is None:
        raise UsageError("the source does not record rope_theta, and the engines would silently use "
                         "10000", hint="pass --rope-theta VALUE (what it was trained with) or --target")
    scaling = flat.get("rope_scaling")
    params = flat.get("rope_parameters") or {}
    if scaling is None and params.get("rope_type") not in (None, "default"):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        fixes.append("rope_scaling copied from rope_parameters")
    n_target = tcfg.get("num_hidden_layers")
    return {
        "vocab_size": int(flat["vocab_size"]), "draft_vocab_size": vd, "hidden_size": h,
        "target_hidden_size": ht, "intermediate_size": int(flat["intermediate_size"]),
        "num_attention_heads": nh, "num_key_value_heads": int(flat.get("num_key_value_heads") or nh),
        "head_dim": head_dim, "rms_norm_eps": float(flat.get("rms_norm_eps", 1e-6)),
        "hidden_act": flat.get("hidden_act", "silu"),
        "max_position_embeddings": int(flat.get("max_position_embeddings") or 2048),
        "rope_theta": float(theta), "rope_scaling": scaling, "num_hidden_layers": 1,
        "aux_layer_ids": aux, "target_num_hidden_layers": n_target,
    }


def convert_checkpoint(cfg: ConvertConfig, events: EventSink | None = None) -> ConvertResult:
    from core.export.format import chat_template_hash

    events = events or NullSink()
    src = Path(cfg.source)
    layout, folder, meta_pt = detect_source(src)
    events(StageStarted(stage=STAGE, settings={"from": str(src), "layout": layout}))
    config = read_json_file(folder / CONFIG)
    if layout == "speculators":
        if config.get("speculators_model_type") == "peagle":
            raise UsageError("the source is a P-EAGLE (parallel drafting) speculator", hint=PEAGLE_HINT)
        if config.get("norm_before_residual", True):
            raise UsageError("the source uses norm_before_residual (true or unset, which vLLM reads as "
                             "true): its residual is taken after hidden_norm, which the "
                             "LlamaForCausalLMEagle3 format cannot express; serve it with vLLM as is")
        flat = speculators_flat_config(config)
        flat["eagle_aux_hidden_state_layer_ids"] = config.get("eagle_aux_hidden_state_layer_ids")
    else:
        flat = dict(config)
        if flat.get("parallel_drafting") or "ptd_token_id" in flat:
            raise UsageError("the source is a P-EAGLE (parallel drafting) head", hint=PEAGLE_HINT)
        if flat.get("norm_before_residual"):
            raise UsageError("the source sets norm_before_residual: true, which the "
                             "LlamaForCausalLMEagle3 format cannot express")
    for flag in ("fc_norm", "norm_output", "norm_before_fc"):
        if flat.get(flag) or config.get(flag):
            raise UsageError(f"the source sets {flag} (EAGLE-3.1 / gpt-oss variant), which the "
                             "LlamaForCausalLMEagle3 format cannot express")
    fixes: list[str] = []
    tensors = _rename_keys(load_safetensors_dir(folder, exclude_prefix=()), fixes, layout)
    missing = [k for k in REQUIRED_KEYS if k not in tensors and k != "d2t"]
    if missing:
        raise UsageError(f"the source lacks {missing}: nothing to convert them from")
    nemo_meta = _load_meta_pt(meta_pt) if meta_pt is not None else None
    tcfg = _target_config(cfg.target)
    if "embed_tokens.weight" not in tensors and cfg.include_embed and cfg.target:
        tensors["embed_tokens.weight"] = _target_embeddings(cfg.target)
        fixes.append("embed_tokens copied from the target")
    _vocab_maps(tensors, nemo_meta, fixes)
    if "d2t" not in tensors and tensors["lm_head.weight"].shape[0] == int(flat["vocab_size"]):
        import torch

        tensors["d2t"] = torch.zeros(int(flat["vocab_size"]), dtype=torch.int64)
        fixes.append("identity d2t added (draft vocab = target vocab)")
    aux = _aux_layers(flat, layout, fixes)
    if cfg.aux_layer_ids is not None:
        if aux is not None and list(aux) != list(cfg.aux_layer_ids):
            raise UsageError(f"--aux-layers {cfg.aux_layer_ids} contradicts the source's {aux}")
        aux = [int(i) for i in cfg.aux_layer_ids]
        fixes.append(f"aux layers {aux} from --aux-layers")
    if aux is not None and tcfg.get("num_hidden_layers") is None:
        raise UsageError("the source uses non-default aux layers; their meaning depends on the "
                         "target's layer count", hint="pass --target TARGET_FOLDER")
    draft_cfg = _draft_config(flat, tensors, tcfg, cfg, fixes, aux)
    target_info = {"name_or_path": cfg.target, "num_hidden_layers": tcfg.get("num_hidden_layers"),
                   "hidden_size": tcfg.get("hidden_size"), "vocab_size": tcfg.get("vocab_size"),
                   "chat_template_sha256": chat_template_hash(cfg.target)} if cfg.target else {}
    produced_by = {"kind": "convert", "source": str(src.resolve()), "source_layout": layout,
                   "fixes": fixes}
    if nemo_meta is not None:
        produced_by["step"] = int(nemo_meta.get("global_step", -1))
    for f in fixes:
        events(Log(stage=STAGE, message=f"fixed: {f}"))
    meta = write_export(cfg.output_dir, draft_cfg, tensors, produced_by=produced_by,
                        target=target_info, include_embed=cfg.include_embed, dtype=cfg.dtype)
    events(StageFinished(stage=STAGE, summary={"output_dir": str(cfg.output_dir), "layout": layout,
                                               "fixes": fixes}))
    return ConvertResult(str(cfg.output_dir), layout, fixes, meta)


