"""Checks that decide whether a draft folder serves correctly, each problem explained.

Used on write (our exports refuse to be written with an error) and by `eagle export --check DIR`
on any folder, ours or a third party's. Every check names what is wrong, what the engines do with
it (see eagle3-reference.md section 2, "loader facts") and how to fix it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from core.export.spec import ARCHITECTURE, OPTIONAL_KEYS, REQUIRED_KEYS, engine_aux_fields

CONVERT_HINT = "convert it: eagle export --from DIR --output NEW_DIR"
PEAGLE_HINT = ("P-EAGLE heads only load in vLLM's parallel-drafting runtime (vLLM >= 0.16): "
               "vllm serve TARGET --speculative-config "
               "'{\"method\": \"eagle3\", \"model\": DRAFT, \"parallel_drafting\": true, ...}'")


@dataclass
class Problem:
    code: str
    severity: str  # "error" (does not serve correctly) | "warning"
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def errors_only(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def format_problems(problems: list[Problem]) -> str:
    lines = []
    for p in problems:
        lines.append(f"  [{p.severity}] {p.code}: {p.message}")
        if p.fix:
            lines.append(f"      fix: {p.fix}")
    return "\n".join(lines)


def normalize_key(key: str) -> str:
    """Map the anchors' key spellings to ours (model. prefix, layers.0. -> midlayer.)."""
    k = key[len("model."):] if key.startswith("model.") else key
    if k.startswith("layers.0."):
        k = "midlayer." + k[len("layers.0."):]
    return k


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of every known key for a flat (serving-style) config."""
    h = int(cfg["hidden_size"])
    ht = int(cfg.get("target_hidden_size") or h)
    nh = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = int(cfg.get("head_dim") or h // nh)
    i = int(cfg["intermediate_size"])
    v = int(cfg["vocab_size"])
    vd = int(cfg.get("draft_vocab_size") or v)
    return {
        "fc.weight": (h, 3 * ht),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (nh * hd, 2 * h),
        "midlayer.self_attn.k_proj.weight": (nkv * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": (nkv * hd, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, nh * hd),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.mlp.gate_proj.weight": (i, h),
        "midlayer.mlp.up_proj.weight": (i, h),
        "midlayer.mlp.down_proj.weight": (h, i),
        "norm.weight": (h,),
        "lm_head.weight": (vd, h),
        "d2t": (vd,),
        "t2d": (v,),
        "embed_tokens.weight": (v, h),
    }


# ---- config ------------------------------------------------------------------------------------

SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")


def check_config(cfg: dict[str, Any], *, architecture: bool = True) -> list[Problem]:
    P: list[Problem] = []
    absent = [f for f in SIZE_FIELDS if not isinstance(cfg.get(f), int)]
    if absent:
        P.append(Problem("config_fields", "error", f"config.json lacks {absent}: the engines cannot "
                         "build the draft", "write the draft's sizes into config.json"))
    arch = cfg.get("architectures")
    if architecture and arch != [ARCHITECTURE]:
        P.append(Problem("architectures", "error",
                         f"architectures is {arch!r}, not [\"{ARCHITECTURE}\"]: SGLang picks the model "
                         "class from this field and refuses (or mis-loads) any other name",
                         f"set \"architectures\": [\"{ARCHITECTURE}\"] or {CONVERT_HINT}"))
    if cfg.get("model_type") != "llama":
        P.append(Problem("model_type", "error", f"model_type is {cfg.get('model_type')!r}, not "
                         "\"llama\": both engines build the Llama EAGLE-3 head from a llama config",
                         "set \"model_type\": \"llama\""))
    n = cfg.get("num_hidden_layers")
    if n != 1:
        P.append(Problem("num_hidden_layers", "error",
                         f"num_hidden_layers is {n!r}, not 1 (inherited from the target?): vLLM builds "
                         "that many draft layers and SGLang adds num_hidden_layers-1 extra layers; only "
                         "layer 0 has weights, the rest run with random weights",
                         f"set \"num_hidden_layers\": 1 or {CONVERT_HINT}"))
    if cfg.get("tie_word_embeddings", False):
        P.append(Problem("tied_head", "error",
                         "tie_word_embeddings is true: SGLang then uses the embedding table "
                         "(target vocab) as the draft head instead of the trained draft-vocab "
                         "lm_head", "set \"tie_word_embeddings\": false (an EAGLE-3 head is never tied)"))
    if cfg.get("draft_vocab_size") is None:
        P.append(Problem("draft_vocab_size", "error",
                         "draft_vocab_size is missing: SGLang then loads the target's full-vocab "
                         "lm_head instead of the draft's, and vLLM expects a full-vocab head",
                         "add \"draft_vocab_size\": <rows of lm_head.weight>"))
    P += _check_rope(cfg)
    if cfg.get("parallel_drafting") or "ptd_token_id" in cfg or "mask_token_id" in cfg:
        P.append(Problem("p_eagle", "error", "this is a P-EAGLE (parallel drafting) head "
                         "(parallel_drafting / ptd_token_id / mask_token_id in config.json): SGLang "
                         "serves it as a plain EAGLE-3 head and drafts garbage", PEAGLE_HINT))
    for flag in ("fc_norm", "norm_output", "norm_before_fc"):
        if cfg.get(flag):
            P.append(Problem(flag, "error", f"{flag} is true (EAGLE-3.1 / gpt-oss variant): SGLang's "
                             "LlamaForCausalLMEagle3 ignores it and computes different activations",
                             "serve it with an engine build that supports this variant"))
    if cfg.get("norm_before_residual"):
        P.append(Problem("norm_before_residual", "error", "norm_before_residual is true: SGLang "
                         "ignores it (its residual is taken before hidden_norm), so the served draft "
                         "differs from the trained one", "serve it with vLLM in speculators format"))
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        P.append(Problem("hidden_act", "warning", f"hidden_act is {act!r}; EAGLE-3 heads use silu"))
    P += _check_aux_fields(cfg)
    return P


def _check_rope(cfg: dict[str, Any]) -> list[Problem]:
    params = cfg.get("rope_parameters") or {}
    if cfg.get("rope_theta") is None:
        if params.get("rope_theta") is not None:
            return [Problem("rope_parameters_only", "error",
                            f"RoPE is only in rope_parameters (transformers 5 style, rope_theta "
                            f"{params.get('rope_theta')}); the engines read the classic top-level "
                            "rope_theta and silently fall back to 10000",
                            f"add \"rope_theta\": {params.get('rope_theta')} at the top level")]
        return [Problem("rope_theta_missing", "error",
                        "rope_theta is missing: the engines use 10000; a draft trained with another "
                        "value (SmolLM2 100000, Llama-3 500000) loses accept length without any error",
                        "add the trained \"rope_theta\" explicitly (10000.0 if that is what it used)")]
    ptype = params.get("rope_type")
    if ptype not in (None, "default") and not cfg.get("rope_scaling"):
        return [Problem("rope_scaling_missing", "error",
                        f"rope_parameters has rope_type {ptype!r} but there is no classic "
                        "rope_scaling: the engines run plain RoPE",
                        "copy the scaling settings into \"rope_scaling\"")]
    return []


def _check_aux_fields(cfg: dict[str, Any]) -> list[Problem]:
    sg = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    vl = cfg.get("eagle_aux_hidden_state_layer_ids")
    if sg is None and vl is None:
        return []
    if sg is not None and vl is not None:
        if [int(i) + 1 for i in sg] != [int(i) for i in vl]:
            return [Problem("aux_layers_disagree", "error",
                            f"SGLang captures the outputs of layers {list(sg)} (eagle_config ids, it "
                            f"adds +1) but vLLM the outputs of {[int(i) - 1 for i in vl]} (top-level "
                            "ids name the layer whose input is captured): they serve different drafts",
                            "make the top-level ids equal the eagle_config ids + 1")]
        return []
    if sg is not None:
        return [Problem("aux_layers_vllm", "error",
                        f"only eagle_config.eagle_aux_hidden_state_layer_ids {list(sg)} is set: SGLang "
                        f"captures the outputs of {list(sg)}, but vLLM reads these ids as the layers "
                        "whose input it captures (one layer earlier), or ignores them",
                        f"add top-level \"eagle_aux_hidden_state_layer_ids\": {[int(i) + 1 for i in sg]}"
                        f" or {CONVERT_HINT}")]
    return [Problem("aux_layers_sglang", "error",
                    f"only the top-level eagle_aux_hidden_state_layer_ids {list(vl)} is set: vLLM "
                    "uses them, SGLang ignores them and captures its default layers",
                    f"add \"eagle_config\": {{\"eagle_aux_hidden_state_layer_ids\": "
                    f"{[int(i) - 1 for i in vl]}}}")]


# ---- tensors -----------------------------------------------------------------------------------

def check_keys(cfg: dict[str, Any], shapes: dict[str, tuple[tuple[int, ...], str]],
               *, layers_prefix_ok: bool = False) -> list[Problem]:
    """Key names and shapes. `shapes`: raw key -> (shape, dtype). `layers_prefix_ok`: speculators."""
    P: list[Problem] = []
    keys = list(shapes)
    prefixed = [k for k in keys if k.startswith("model.")]
    if prefixed:
        P.append(Problem("model_prefix", "error",
                         f"{len(prefixed)} keys start with 'model.' (e.g. {prefixed[0]}): vLLM prefixes "
                         "'model.' itself and fails on 'model.model.*'",
                         f"strip the prefix: {CONVERT_HINT}"))
    layer_keys = [k for k in keys if re.match(r"^(model\.)?layers\.0\.", k)]
    if layer_keys and not layers_prefix_ok:
        P.append(Problem("layers_0_keys", "error",
                         f"{len(layer_keys)} keys use '{layer_keys[0].split('layers.0.')[0]}layers.0.*' "
                         "(NeMo / speculators naming): SGLang only loads 'midlayer.*' and silently "
                         "ignores these, serving the decoder layer with random weights (accept length ~1)",
                         f"rename to midlayer.*: {CONVERT_HINT}"))
    deeper = sorted({m.group(2) for k in keys if (m := re.match(r"^(model\.)?(?:layers|midlayers)\.(\d+)\.", k))
                     and m.group(2) != "0"})
    if deeper:
        P.append(Problem("extra_layers", "error", f"weights for decoder layers {deeper} besides layer 0: "
                         "a multi-layer draft; the single-layer EAGLE-3 loaders drop them",
                         "export a single-layer draft"))
    if any(k == "mask_hidden" or k.endswith(".mask_hidden") for k in keys):
        P.append(Problem("p_eagle", "error", "a 'mask_hidden' tensor marks a P-EAGLE (parallel "
                         "drafting) head: SGLang ignores it and drafts garbage", PEAGLE_HINT))
    norm = {normalize_key(k): v for k, v in shapes.items()}
    known = set(REQUIRED_KEYS) | set(OPTIONAL_KEYS) | {"mask_hidden"}
    unknown = [k for k in keys if normalize_key(k) not in known
               and not re.match(r"^(model\.)?(layers|midlayers)\.[1-9]", k)]
    if unknown:
        P.append(Problem("unknown_keys", "error",
                         f"{len(unknown)} unknown keys (e.g. {unknown[:3]}): SGLang silently ignores "
                         "keys it does not know, so whatever they were meant to hold serves with "
                         "random weights", "rename them to the keys of eagle3-reference.md section 2"))
    missing = [k for k in REQUIRED_KEYS if k not in norm]
    if "lm_head.weight" in missing:
        P.append(Problem("lm_head_missing", "error", "lm_head.weight is missing: with an untied "
                         "config the engines serve a randomly initialised draft head",
                         "export the trained draft-vocab head as lm_head.weight"))
    if "d2t" in missing:
        v, vd = cfg.get("vocab_size"), cfg.get("draft_vocab_size") or cfg.get("vocab_size")
        if v is None or vd is None or int(vd) < int(v):
            P.append(Problem("d2t_missing", "error",
                             "d2t is missing: the engines then read draft ids as target ids, so every "
                             "drafted token is a different word", "add d2t (target_id - draft_id, int64)"))
    rest = [k for k in missing if k not in ("lm_head.weight", "d2t")]
    if rest:
        P.append(Problem("missing_keys", "error", f"missing weights {rest}: the engines serve them "
                         "randomly initialised", "export every key of eagle3-reference.md section 2"))
    if "embed_tokens.weight" not in norm and cfg.get("target_hidden_size") not in (
            None, cfg.get("hidden_size")):
        P.append(Problem("embed_missing", "error", "embed_tokens.weight is missing and the draft's "
                         "hidden size differs from the target's: SGLang does not share the target's "
                         "embeddings then, so they stay random", "include embed_tokens.weight"))
    if any(not isinstance(cfg.get(f), int) for f in SIZE_FIELDS):
        return P
    exp = expected_shapes(cfg)
    for k, (shape, _dt) in norm.items():
        if k in exp and tuple(shape) != exp[k]:
            what = ("lm_head rows != draft_vocab_size" if k == "lm_head.weight" and
                    tuple(shape[1:]) == exp[k][1:] else "shape does not match config.json")
            P.append(Problem("shape", "error", f"{k} has shape {list(shape)}, config.json implies "
                             f"{list(exp[k])} ({what}); loading fails or misreads the weights",
                             "fix config.json (sizes, head_dim, draft_vocab_size, target_hidden_size) "
                             "or re-export"))
    if "d2t" in norm and not norm["d2t"][1].startswith(("int", "uint")):
        P.append(Problem("d2t_dtype", "error", f"d2t has dtype {norm['d2t'][1]}, not an integer type",
                         "store d2t as int64"))
    return P


def check_vocab_maps(cfg: dict[str, Any], d2t: Any, t2d: Any) -> list[Problem]:
    """d2t must map every draft id inside the target vocab; t2d (optional) must agree."""
    import torch

    P: list[Problem] = []
    if d2t is None:
        return P
    v = int(cfg["vocab_size"])
    d2t = d2t.to(torch.int64).flatten()
    tid = d2t + torch.arange(d2t.numel())
    bad = ((tid < 0) | (tid >= v)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        P.append(Problem("d2t_range", "error", f"d2t maps {bad.numel()} draft ids outside the target "
                         f"vocab [0, {v}) (e.g. draft id {i} -> target id {int(tid[i])}): the engines "
                         "index past the target vocabulary", "rebuild d2t from the draft vocab"))
        return P
    if torch.unique(tid).numel() != tid.numel():
        P.append(Problem("d2t_duplicates", "warning", "d2t maps several draft ids to the same target id"))
    if t2d is not None:
        t2d = t2d.to(torch.bool).flatten()
        if t2d.numel() == v and (int(t2d.sum()) != tid.numel() or not bool(t2d[tid].all())):
            P.append(Problem("t2d_mismatch", "warning", "t2d does not mark exactly the target ids of "
                             "d2t (the engines ignore t2d; our tools rebuild it from d2t)"))
    return P


def check_meta(cfg: dict[str, Any], meta: dict[str, Any], *, speculators: bool = False) -> list[Problem]:
    """Our eagle_export.json: the engines must capture the aux layers the draft was trained on.
    `speculators`: a speculators config, where only vLLM's top-level ids count."""
    if not meta:
        return []
    n = (meta.get("target") or {}).get("num_hidden_layers")
    aux = meta.get("aux_layer_ids")
    if n is None or aux is None:
        return []
    try:
        want = engine_aux_fields(aux, n)
    except Exception as e:  # noqa: BLE001 - an uncapturable layer is itself the problem
        return [Problem("aux_layers_uncapturable", "error", str(e))]
    sg = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    vl = cfg.get("eagle_aux_hidden_state_layer_ids")
    if speculators:  # vLLM's speculators reader takes the top-level ids when non-empty
        vl = list(vl) if vl else None
        if vl != want["vllm"]:
            return [Problem("aux_layers_mismatch", "error",
                            f"the draft was trained on the outputs of target layers {aux} (N={n}) but "
                            f"config.json makes vLLM capture the inputs of layers {vl} (expected "
                            f"{want['vllm']}, None = engine default): it serves with other features "
                            "and silently loses accept length", "re-export from the run")]
        return []
    if (sg, vl) != (want["sglang"], want["vllm"]):
        return [Problem("aux_layers_mismatch", "error",
                        f"the draft was trained on the outputs of target layers {aux} (N={n}) but "
                        f"config.json makes the engines capture eagle_config={sg}, top-level={vl} "
                        f"(expected {want['sglang']} / {want['vllm']}, None = engine default)",
                        "re-export from the run")]
    return []


def validate_export_contents(config: dict[str, Any], shapes: dict[str, tuple[tuple[int, ...], str]],
                             *, d2t: Any = None, t2d: Any = None,
                             meta: dict[str, Any] | None = None) -> list[Problem]:
    """All checks for a serving-format folder's contents."""
    P = check_config(config)
    P += check_keys(config, shapes)
    P += check_vocab_maps(config, d2t, t2d)
    P += check_meta(config, meta or {})
    return P
