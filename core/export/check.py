"""`eagle export --check DIR`: explain every problem of any draft folder, ours or a third party's.

Reads only config.json and the safetensors headers (plus the small d2t / t2d tensors), so checking
an 8B draft is instant. Pickled weights (.bin / .pt) are never loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputDataError
from core.export.format import CONFIG, META, read_json_file
from core.export.validate import (CONVERT_HINT, PEAGLE_HINT, Problem, check_config, check_keys,
                                  check_meta, check_vocab_maps, errors_only)


@dataclass
class CheckReport:
    path: str
    layout: str  # eagle-tui | sglang | speculators | nemo | eagle-tui-run | unknown
    checked_dir: str
    problems: list[Problem] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not errors_only(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "layout": self.layout, "checked_dir": self.checked_dir,
                "ok": self.ok, "errors": len(errors_only(self.problems)),
                "problems": [p.to_dict() for p in self.problems], "info": self.info}


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json_file(index).get("weight_map", {}).values()))
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("shard-"))


def read_headers(files: list[Path]) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, Any]]:
    """(key -> (shape, dtype)) from safetensors headers, and the small d2t / t2d tensors."""
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    small: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shapes[k] = (tuple(sl.get_shape()), _dtype_name(sl.get_dtype()))
                if k.split(".")[-1] in ("d2t", "t2d"):
                    small[k.split(".")[-1]] = st.get_tensor(k)
    return shapes, small


def _dtype_name(st_dtype: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
            "BOOL": "bool", "U8": "uint8", "I8": "int8", "F64": "float64"}.get(st_dtype, st_dtype.lower())


def _find_serving_dir(root: Path) -> tuple[Path | None, str, list[Problem]]:
    """Where config.json lives, the layout name, and problems about the folder kind itself."""
    if (root / CONFIG).is_file():
        cfg = read_json_file(root / CONFIG)
        if "speculators_model_type" in cfg:
            return root, "speculators", []
        return root, ("eagle-tui" if (root / META).is_file() else "sglang"), []
    for inner in (root / "model" / "consolidated", root / "model"):
        if (inner / CONFIG).is_file():
            return inner, "nemo", [Problem(
                "training_checkpoint", "error",
                f"{root} is a NeMo Automodel training checkpoint, not a serving folder; its weights "
                f"live in {inner.relative_to(root)}/ with the target's layer count and model.layers.0.* "
                "keys, which the SGLang versions we read do not load", CONVERT_HINT)]
    if (root / "draft.safetensors").is_file() or (root / "checkpoints").is_dir() or (root / "latest").exists():
        return None, "eagle-tui-run", [Problem(
            "training_run", "error", f"{root} is an eagle-tui training run/checkpoint, not a serving "
            "folder", f"export it: eagle export {root} --output DIR")]
    return None, "unknown", [Problem("no_config", "error", f"{root} has no config.json",
                                     "point --check at the folder that holds config.json and the weights")]


def check_folder(path: str | os.PathLike) -> CheckReport:
    root = Path(path)
    if not root.is_dir():
        raise InputDataError("not a folder", path=str(root))
    folder, layout, problems = _find_serving_dir(root)
    report = CheckReport(str(root), layout, str(folder or root), list(problems))
    if folder is None:
        return report
    cfg = read_json_file(folder / CONFIG)
    files = weight_files(folder)
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        report.problems.append(Problem(
            "no_safetensors", "error",
            f"no .safetensors weights in {folder}" + (f" (only pickled {pickles}, which execute code "
                                                     "on load and are not read here)" if pickles else ""),
            "save the weights as safetensors (model.safetensors)"))
        return report
    shapes, small = read_headers(files)
    report.info = {"weights": [f.name for f in files], "num_tensors": len(shapes),
                   "dtypes": sorted({dt for _, dt in shapes.values()})}
    meta = read_json_file(folder / META) if (folder / META).is_file() else {}
    if layout == "speculators":
        report.problems += _check_speculators(cfg, shapes, small, meta)
    else:
        report.problems += check_config(cfg)
        report.problems += check_keys(cfg, shapes)
        if all(isinstance(cfg.get(f), int) for f in ("vocab_size",)):
            report.problems += check_vocab_maps(cfg, small.get("d2t"), small.get("t2d"))
        report.problems += check_meta(cfg, meta)
    report.problems += [Problem("export_note", "warning", str(w)) for w in meta.get("warnings", [])
                        if "speculators format" not in str(w)]
    report.info.update({k: cfg.get(k) for k in ("vocab_size", "draft_vocab_size", "hidden_size",
                                                 "num_hidden_layers", "rope_theta") if k in cfg})
    if meta:
        report.info["eagle_export"] = {k: meta.get(k) for k in ("produced_by", "target", "aux_layer_ids",
                                                                 "warnings")}
    return report


def speculators_flat_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A serving-style flat config from a speculators config (for the shape checks)."""
    flat = dict(cfg.get("transformer_layer_config") or {})
    flat["draft_vocab_size"] = cfg.get("draft_vocab_size")
    if cfg.get("target_hidden_size") is not None:
        flat["target_hidden_size"] = cfg["target_hidden_size"]
    return flat


def _check_speculators(cfg: dict[str, Any], shapes: dict, small: dict,
                       meta: dict[str, Any] | None = None) -> list[Problem]:
    P: list[Problem] = []
    kind = cfg.get("speculators_model_type")
    if kind == "peagle":
        P.append(Problem("p_eagle", "error", "speculators_model_type is \"peagle\": a P-EAGLE "
                         "(parallel drafting) head", PEAGLE_HINT))
    elif kind != "eagle3":
        P.append(Problem("speculators_type", "error", f"speculators_model_type {kind!r} is not an "
                         "EAGLE-3 head", "use an eagle3 speculator"))
    tl = cfg.get("transformer_layer_config")
    if not isinstance(tl, dict):
        P.append(Problem("transformer_layer_config", "error", "transformer_layer_config is missing: "
                         "vLLM refuses the config", "add the draft layer's llama config"))
        return P
    if "norm_before_residual" not in cfg:
        P.append(Problem("norm_before_residual_missing", "error", "norm_before_residual is not "
                         "written: vLLM's speculators reader then assumes true (residual after "
                         "hidden_norm); drafts trained with the EAGLE-3 math (false) lose accept length",
                         "write \"norm_before_residual\": false explicitly (if that is how it was trained)"))
    elif cfg["norm_before_residual"] and meta:
        # a third party's speculator may be trained that way (vLLM honours it); ours never are
        P.append(Problem("norm_before_residual", "error", "norm_before_residual is true, but this "
                         "eagle-tui export was trained with the residual taken before hidden_norm "
                         "(false): vLLM honours the field, serves a different draft and silently "
                         "loses accept length", "re-export it: eagle export RUN --format speculators "
                         "--output DIR (writes false)"))
    spec = cfg.get("speculators_config") or {}
    methods = spec.get("proposal_methods") or []
    if not methods or "speculative_tokens" not in methods[0]:
        P.append(Problem("proposal_methods", "error", "speculators_config.proposal_methods[0]."
                         "speculative_tokens is missing: vLLM refuses the config",
                         "add a greedy proposal method with speculative_tokens"))
    if not (spec.get("verifier") or {}).get("name_or_path"):
        P.append(Problem("verifier", "error", "speculators_config.verifier.name_or_path is missing: "
                         "vLLM refuses the config", "name the target model there"))
    flat = speculators_flat_config(cfg)
    P += [p for p in check_config(flat, architecture=False) if p.code not in (
        "aux_layers_vllm", "aux_layers_sglang", "aux_layers_disagree", "norm_before_residual")]
    P += check_keys(flat, shapes, layers_prefix_ok=True)
    P += check_vocab_maps(flat, small.get("d2t"), small.get("t2d")) if isinstance(
        flat.get("vocab_size"), int) else []
    P += check_meta(cfg, meta or {}, speculators=True)
    P.append(Problem("speculators_format", "warning", "speculators format loads in vLLM only; "
                     "SGLang needs the LlamaForCausalLMEagle3 format", CONVERT_HINT))
    return P


def render_report(report: CheckReport) -> str:
    lines = [f"{report.path}: {report.layout} layout" +
             (f" (checked {report.checked_dir})" if report.checked_dir != report.path else "")]
    if report.info:
        keep = {k: v for k, v in report.info.items() if k != "eagle_export"}
        lines.append("  " + json.dumps(keep, default=str))
    errs = errors_only(report.problems)
    if not report.problems:
        lines.append("  ok: no problems found")
    for p in report.problems:
        lines.append(f"  [{p.severity}] {p.code}: {p.message}")
        if p.fix:
            lines.append(f"      fix: {p.fix}")
    lines.append(f"  {len(errs)} error(s), {len(report.problems) - len(errs)} warning(s)")
    return "\n".join(lines)
