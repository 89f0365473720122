"""`eagle export --format speculators`: vLLM's speculators config (vllm-project/speculators).

config.json holds `speculators_model_type: "eagle3"`, the draft layer's llama config under
`transformer_layer_config`, `draft_vocab_size`, `target_hidden_size`, `norm_before_residual: false`
(written explicitly: vLLM's reader assumes true when it is absent, and our math is false), and
`speculators_config` (greedy proposal with `speculative_tokens`, default method, verifier).
Weights use the speculators names (`layers.0.*`); vLLM prefixes `model.` itself. Aux layer ids, when
not default, go to the top-level `eagle_aux_hidden_state_layer_ids` in vLLM's convention (the layer
whose input is captured = our layer output + 1). SGLang does not read this format.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from core import __version__
from core.errors import OutputExistsError, UsageError
from core.export.format import (CONFIG, META, META_FORMAT, META_VERSION, WEIGHTS, _serving_tensors, publish_folder,
                                default_aux_layers, engine_aux_fields, rope_fields)


def build_speculators_config(cfg: dict[str, Any], *, verifier: str, verifier_architectures: list[str],
                             speculative_tokens: int, torch_dtype: str) -> dict[str, Any]:
    theta, scaling = rope_fields(cfg)
    hidden = int(cfg["hidden_size"])
    target_hidden = int(cfg.get("target_hidden_size") or hidden)
    layer = {
        "model_type": "llama", "vocab_size": int(cfg["vocab_size"]), "hidden_size": hidden,
        "intermediate_size": int(cfg["intermediate_size"]), "num_hidden_layers": 1,
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "num_key_value_heads": int(cfg["num_key_value_heads"]), "head_dim": int(cfg["head_dim"]),
        "hidden_act": cfg.get("hidden_act", "silu"),
        "max_position_embeddings": int(cfg["max_position_embeddings"]),
        "rms_norm_eps": float(cfg["rms_norm_eps"]), "rope_theta": theta, "rope_scaling": scaling,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
    }
    aux = engine_aux_fields(cfg.get("aux_layer_ids"), cfg.get("target_num_hidden_layers"))
    out: dict[str, Any] = {
        "architectures": ["Eagle3DraftModel"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer,
        "draft_vocab_size": int(cfg["draft_vocab_size"]),
        "target_hidden_size": target_hidden if target_hidden != hidden else None,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "eagle_aux_hidden_state_layer_ids": aux["vllm"],
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures)},
        },
        "torch_dtype": torch_dtype,
    }
    return out


def write_speculators_export(out_dir: str | os.PathLike, draft_cfg: dict[str, Any],
                             state_dict: dict[str, Any], *, produced_by: dict[str, Any],
                             target: dict[str, Any], speculative_tokens: int = 3,
                             include_embed: bool = True, dtype: str = "auto") -> dict[str, Any]:
    """Validate (shape and config checks of check_folder) and write atomically."""
    from safetensors.torch import save_file

    from core.export.check import check_folder
    from core.export.validate import errors_only, format_problems
    from core.manifest import sha256_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} exists and is not empty",
                                hint="choose a new --output folder or remove it")
    verifier = target.get("name_or_path")
    if not verifier:
        raise UsageError("the speculators format names its verifier (target) model, which is unknown "
                         "here", hint="pass --target TARGET")
    if speculative_tokens < 1:
        raise UsageError("--num-speculative-tokens must be >= 1")
    tensors = _serving_tensors(state_dict, include_embed, dtype)
    renamed = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v
               for k, v in tensors.items()}
    torch_dtype = str(tensors["fc.weight"].dtype).replace("torch.", "")
    config = build_speculators_config(draft_cfg, verifier=str(verifier),
                                      verifier_architectures=target.get("architectures") or [],
                                      speculative_tokens=speculative_tokens, torch_dtype=torch_dtype)
    n = draft_cfg.get("target_num_hidden_layers")
    meta = {"format": META_FORMAT, "format_version": META_VERSION, "eagle_tui_version": __version__,
            "serving_format": "speculators", "created": time.time(), "produced_by": produced_by,
            "target": target, "aux_layer_ids": draft_cfg.get("aux_layer_ids") or (
                default_aux_layers(n) if n else None),
            "chat_template_sha256": target.get("chat_template_sha256"),
            "embed_tokens_included": "embed_tokens.weight" in tensors, "dtype": torch_dtype,
            "warnings": ["speculators format: loads in vLLM, not in SGLang"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in renamed.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        report = check_folder(tmp)
        errs = errors_only(report.problems)
        if errs:
            raise UsageError("refusing to write an invalid speculators export:\n" + format_problems(errs))
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        publish_folder(tmp, out, {"produced_by": produced_by, "format": "speculators",
                                  "dtype": torch_dtype})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def serving_view(config: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A speculators folder read as our serving format (flat config, `midlayer.*` keys), the inverse
    of write_speculators_export: what re-exporting one (`eagle export SPEC_DIR`) starts from.
    Aux layers (vLLM's top-level ids) become the eagle_config ids of our convention (id - 1)."""
    from core.export.check import speculators_flat_config
    from core.export.validate import normalize_key

    if config.get("norm_before_residual", True):
        raise UsageError("the speculators config sets norm_before_residual true (or leaves it unset, which "
                         "vLLM reads as true): its residual is taken after hidden_norm, which neither "
                         "eagle-tui's math nor the LlamaForCausalLMEagle3 format can express",
                         hint="serve that folder with vLLM as it is")
    flat = speculators_flat_config(config)
    vl = config.get("eagle_aux_hidden_state_layer_ids")
    if vl:
        flat["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [int(i) - 1 for i in vl]}
    return flat, {normalize_key(k): v for k, v in tensors.items()}
