"""Our serving format: one folder that SGLang and vLLM both load (eagle3-reference.md section 2).

    config.json        LlamaForCausalLMEagle3 config with classic top-level rope_theta / rope_scaling
    model.safetensors  keys WITHOUT a `model.` prefix: fc, midlayer.*, norm, lm_head, d2t, t2d
                       (+ embed_tokens: included by default, see below)
    eagle_export.json  what produced it, target, aux layers (ours and each engine's), chat template hash
    manifest.json      kind "export" with the weights' checksum (design.md rule 3)

embed_tokens is an exact copy of the target's frozen embedding table, so it makes no difference
whether an engine uses it or shares the target's own (SGLang's EAGLE-3 worker shares the target's,
except when the draft's hidden size differs from the target's: then the draft's own is required;
vLLM shares it when the draft ships none). We include it by default so the folder is
self-contained (our eval, third-party tools); `include_embed=False` drops it when that is safe.

Aux layers. Our convention (core.features): 0-based *layer outputs* O = [o1, o2, o3], default
[1, N//2-1, N-4]. Both engines capture "the residual entering layer i" and default to
i in [2, N//2, N-3], i.e. the same layers. Explicit ids differ per engine:
  - SGLang reads only `eagle_config.eagle_aux_hidden_state_layer_ids` and adds +1 -> write O;
  - vLLM reads the top-level `eagle_aux_hidden_state_layer_ids` first and uses ids as given
    (entering-layer convention) -> write O + 1 there.
So non-default layers get BOTH fields and both engines capture what we trained on. A vLLM build
that reads only `eagle_config` would be off by one: recorded as a warning in eagle_export.json.
The output of the last layer (o = N-1) is not capturable by either engine: refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from core import __version__
from core.errors import CorruptDataError, InputDataError, OutputExistsError, UsageError
from core.export.spec import ARCHITECTURE, default_aux_layers, engine_aux_fields

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
META = "eagle_export.json"
META_FORMAT = "eagle-tui-export"
META_VERSION = 1



# ---- config.json -------------------------------------------------------------------------------

def rope_fields(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """The draft's trained rope_theta / rope_scaling from a DraftConfig dict (never a default)."""
    theta = cfg.get("rope_theta")
    if theta is None:
        params = cfg.get("rope_parameters") or {}
        theta = params.get("rope_theta")
    if theta is None:
        raise UsageError("the draft config has no rope_theta: refusing to export, because the "
                         "engines would silently fall back to 10000")
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling["type"]
        if scaling.get("rope_type") == "default":
            scaling = None
    return float(theta), scaling


def build_serving_config(cfg: dict[str, Any], torch_dtype: str) -> dict[str, Any]:
    """config.json for SGLang and vLLM from a DraftConfig dict (core.model DraftConfig.to_dict())."""
    theta, scaling = rope_fields(cfg)
    hidden = int(cfg["hidden_size"])
    target_hidden = cfg.get("target_hidden_size") or hidden
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "tie_word_embeddings": False,
        "vocab_size": int(cfg["vocab_size"]),
        "draft_vocab_size": int(cfg["draft_vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "num_key_value_heads": int(cfg["num_key_value_heads"]),
        "head_dim": int(cfg["head_dim"]),
        "rms_norm_eps": float(cfg["rms_norm_eps"]),
        "hidden_act": cfg.get("hidden_act", "silu"),
        "max_position_embeddings": int(cfg["max_position_embeddings"]),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
    }
    if int(target_hidden) != hidden:
        out["target_hidden_size"] = int(target_hidden)
    aux = engine_aux_fields(cfg.get("aux_layer_ids"), cfg.get("target_num_hidden_layers"))
    if not aux["default"]:
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux["sglang"],
                               "use_aux_hidden_state": True}
        out["eagle_aux_hidden_state_layer_ids"] = aux["vllm"]
    return out


def draft_config_from_serving(config: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inverse of build_serving_config: a DraftConfig dict from an export's config.json.

    Aux layers come from eagle_export.json when present (our convention), else from the SGLang
    field (same convention), else default (None).
    """
    meta = meta or {}
    theta = config.get("rope_theta")
    if theta is None:
        theta = (config.get("rope_parameters") or {}).get("rope_theta")
    aux = meta.get("aux_layer_ids")
    if aux is None:
        aux = ((config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids"))
    target = meta.get("target") or {}
    hidden = int(config["hidden_size"])
    return {
        "vocab_size": int(config["vocab_size"]),
        "draft_vocab_size": int(config.get("draft_vocab_size") or config["vocab_size"]),
        "hidden_size": hidden,
        "target_hidden_size": int(config.get("target_hidden_size") or hidden),
        "intermediate_size": int(config["intermediate_size"]),
        "num_attention_heads": int(config["num_attention_heads"]),
        "num_key_value_heads": int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        "head_dim": int(config.get("head_dim") or hidden // int(config["num_attention_heads"])),
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "hidden_act": config.get("hidden_act", "silu"),
        "max_position_embeddings": int(config.get("max_position_embeddings", 2048)),
        "rope_theta": float(theta) if theta is not None else None,
        "rope_scaling": config.get("rope_scaling"),
        "num_hidden_layers": 1,
        "aux_layer_ids": list(aux) if aux is not None else None,
        "target_num_hidden_layers": target.get("num_hidden_layers"),
    }


# ---- files -------------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chat_template_hash(target: str | os.PathLike | None) -> str | None:
    """sha256 of the target's chat template, first 16 hex digits (as core.vocab hashes it)."""
    if not target:
        return None
    d = Path(target)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return sha256_bytes(jinja.read_bytes())[:16]
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        try:
            tmpl = json.loads(tc.read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(tmpl, list):  # named templates
            tmpl = json.dumps(tmpl, sort_keys=True)
        if tmpl:
            return sha256_bytes(tmpl.encode())[:16]
    return None


def read_json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputDataError("file not found", path=str(path)) from None
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise CorruptDataError(f"{path}: expected a JSON object")
    return data


def load_safetensors_dir(folder: Path, *, exclude_prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """All tensors of a folder: model.safetensors, an index's shards, or every *.safetensors."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json_file(index).get("weight_map", {}).values()))
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors")
                       if not p.name.startswith(exclude_prefix))
    if not files:
        raise InputDataError("no .safetensors weights found", path=str(folder))
    out: dict[str, Any] = {}
    for name in files:
        try:
            part = load_file(str(folder / name))
        except Exception as e:  # safetensors raises its own error types
            raise CorruptDataError(f"{folder / name}: cannot read safetensors ({e})") from e
        dup = set(part) & set(out)
        if dup:
            raise CorruptDataError(f"{folder / name}: tensors {sorted(dup)[:3]} appear in two files")
        out.update(part)
    return out


def write_export(out_dir: str | os.PathLike, draft_cfg: dict[str, Any], state_dict: dict[str, Any],
                 *, produced_by: dict[str, Any], target: dict[str, Any] | None = None,
                 include_embed: bool = True, dtype: str = "auto",
                 extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate, then write the serving folder atomically (temp folder + rename). Returns the meta.

    Refuses a non-empty `out_dir`. Nothing is left under `out_dir` if validation fails.
    """
    from safetensors.torch import save_file

    from core.export.validate import errors_only, format_problems, validate_export_contents

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} exists and is not empty",
                                hint="choose a new --output folder or remove it")
    target = dict(target or {})
    if not target.get("chat_template_sha256") and target.get("name_or_path"):
        target["chat_template_sha256"] = chat_template_hash(target["name_or_path"])
    tensors = _serving_tensors(state_dict, include_embed, dtype)
    float_dtype = next(t.dtype for k, t in tensors.items() if k == "fc.weight")
    torch_dtype = str(float_dtype).replace("torch.", "")
    config = build_serving_config(draft_cfg, torch_dtype)
    aux = engine_aux_fields(draft_cfg.get("aux_layer_ids"), draft_cfg.get("target_num_hidden_layers"))
    n_layers = draft_cfg.get("target_num_hidden_layers") or target.get("num_hidden_layers")
    if n_layers is not None:
        target["num_hidden_layers"] = int(n_layers)
    meta: dict[str, Any] = {
        "format": META_FORMAT, "format_version": META_VERSION, "eagle_tui_version": __version__,
        "created": time.time(), "produced_by": produced_by, "target": target,
        "aux_layer_ids": draft_cfg.get("aux_layer_ids") or (
            default_aux_layers(n_layers) if n_layers else None),
        "aux_layer_convention": "0-based outputs of target layers (hidden_states[i+1] in transformers)",
        "engine_aux_layer_ids": {"default": aux["default"], "sglang_eagle_config": aux["sglang"],
                                 "vllm_top_level": aux["vllm"]},
        "chat_template_sha256": target.get("chat_template_sha256"),
        "embed_tokens_included": "embed_tokens.weight" in tensors,
        "dtype": torch_dtype, "warnings": list(aux["warnings"]),
    }
    meta.update(extra_meta or {})
    shapes = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in tensors.items()}
    d2t = tensors["d2t"] if "d2t" in tensors else None
    problems = validate_export_contents(config, shapes, d2t=d2t, t2d=tensors.get("t2d"), meta=meta)
    errs = errors_only(problems)
    if errs:
        raise UsageError("refusing to write an invalid export:\n" + format_problems(errs))
    meta["warnings"] += [p.message for p in problems if p.severity == "warning"]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        meta["weights_sha256"] = _sha256_file(tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        publish_folder(tmp, out, {"produced_by": produced_by, "dtype": torch_dtype,
                                  "include_embed": include_embed})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def publish_folder(tmp: Path, out: Path, settings: dict[str, Any]) -> None:
    """Seal a staged export (manifest with the weights' checksum) and rename it onto `out`,
    so the whole folder appears at once or not at all."""
    from core.manifest import Manifest

    m = Manifest(kind="export", format_version=META_VERSION, settings=settings, complete=True)
    m.add_shard(tmp, WEIGHTS, samples=0)
    m.save(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def _sha256_file(path: Path) -> str:
    from core.manifest import sha256_file

    return sha256_file(path)


def _serving_tensors(state_dict: dict[str, Any], include_embed: bool, dtype: str) -> dict[str, Any]:
    """Our keys, floats cast to `dtype` ("auto" keeps them), d2t int64, t2d bool."""
    import torch

    cast = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}
    if dtype not in cast:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(cast)}")
    out = {}
    for k, v in state_dict.items():
        if k == "embed_tokens.weight" and not include_embed:
            continue
        v = v.detach().cpu()
        if k == "d2t":
            v = v.to(torch.int64)
        elif k == "t2d":
            v = v.to(torch.bool)
        elif cast[dtype] is not None and v.is_floating_point():
            v = v.to(cast[dtype])
        out[k] = v
    return out


def read_export(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(config.json, tensors, eagle_export.json or {}) of a folder in our serving format."""
    folder = Path(folder)
    config = read_json_file(folder / CONFIG)
    meta = read_json_file(folder / META) if (folder / META).is_file() else {}
    return config, load_safetensors_dir(folder), meta
