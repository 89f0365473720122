"""The serving format's fixed facts, shared by the writer (format) and the checker (validate):
the architecture name, the tensor keys, and which aux-layer fields each engine reads."""

from __future__ import annotations

from typing import Any

from core.errors import UsageError
from core.settings import default_aux_layers

ARCHITECTURE = "LlamaForCausalLMEagle3"
REQUIRED_KEYS = (
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
)
OPTIONAL_KEYS = ("embed_tokens.weight", "t2d")


# ---- aux layers --------------------------------------------------------------------------------

def engine_aux_fields(aux_layer_ids: list[int] | None, num_target_layers: int | None) -> dict[str, Any]:
    """What to write so SGLang and vLLM capture the layers we trained on.

    Returns {"default": bool, "sglang": ids|None, "vllm": ids|None, "warnings": [...]} where
    "sglang" goes to eagle_config.eagle_aux_hidden_state_layer_ids and "vllm" to the top-level
    eagle_aux_hidden_state_layer_ids. Raises UsageError for layers no engine can capture.
    """
    if aux_layer_ids is None:
        if num_target_layers is not None and len(set(default_aux_layers(num_target_layers))) != 3:
            raise UsageError(f"the engines' default aux layers {default_aux_layers(num_target_layers)} "
                             f"are not three distinct layers for a {num_target_layers}-layer target; "
                             "the layers the draft was trained on must be given explicitly")
        return {"default": True, "sglang": None, "vllm": None, "warnings": []}
    ids = [int(i) for i in aux_layer_ids]
    if num_target_layers is None:
        raise UsageError("the target's layer count is unknown, so the aux layer ids cannot be "
                         "checked against the engines' defaults",
                         hint="record target_num_hidden_layers in the draft config")
    n = int(num_target_layers)
    if ids == default_aux_layers(n):
        return {"default": True, "sglang": None, "vllm": None, "warnings": []}
    bad = [i for i in ids if not 0 <= i <= n - 2]
    if bad:
        raise UsageError(f"aux layer outputs {bad} cannot be captured by SGLang or vLLM for a "
                         f"{n}-layer target (they capture the residual entering a layer, so layer "
                         f"outputs 0..{n - 2} only)")
    return {"default": False, "sglang": ids, "vllm": [i + 1 for i in ids],
            "warnings": ["non-default aux layers: written as eagle_config ids (SGLang adds +1) and "
                         "as top-level ids +1 (vLLM uses them as given); a vLLM build that reads "
                         "only eagle_config would capture the layer before each one"]}
