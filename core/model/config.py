"""DraftConfig: the shape of an EAGLE-3 draft, derived from a Hugging Face target config.

Works for Llama-family targets (Llama, Qwen2/3, Mistral, SmolLM). transformers 5 keeps RoPE
settings in `rope_parameters = {rope_theta, rope_type, ...}`, older configs in top-level
`rope_theta` / `rope_scaling`: both are read. The draft keeps the classic pair
(`rope_theta`, `rope_scaling`) because that is what serving engines read (reference section 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from core.errors import UsageError

SUPPORTED_ACTS = ("silu",)
DEFAULT_ROPE_THETA = 10000.0


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _text_config(cfg: Any) -> Any:
    """Multimodal wrappers keep the language model's settings in `text_config`."""
    inner = _get(cfg, "text_config")
    if inner is not None and _get(cfg, "hidden_size") is None:
        return inner
    return cfg


def read_rope(cfg: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either the transformers 4 or 5 layout."""
    params = _get(cfg, "rope_parameters")
    theta = _get(cfg, "rope_theta")
    scaling = _get(cfg, "rope_scaling")
    if isinstance(params, Mapping) and params:
        # transformers 5: one dict; per-layer-type dicts ({"full_attention": {...}}) take the full one.
        if "full_attention" in params and isinstance(params["full_attention"], Mapping):
            params = params["full_attention"]
        theta = params.get("rope_theta", theta)
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(scaling, Mapping):
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in (None, "default"):
            scaling = None
        else:
            scaling["rope_type"] = kind
            scaling.pop("type", None)
    else:
        scaling = None
    return float(theta if theta is not None else DEFAULT_ROPE_THETA), scaling


@dataclass
class DraftConfig:
    vocab_size: int  # target vocab V
    draft_vocab_size: int  # Vd
    hidden_size: int  # H
    target_hidden_size: int  # Ht
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    target_num_hidden_layers: int
    aux_layer_ids: list[int] = field(default_factory=list)  # 0-based layer OUTPUT ids
    rope_scaling: dict | None = None
    hidden_act: str = "silu"
    num_hidden_layers: int = 1
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.aux_layer_ids:
            from core.features import resolve_aux_layer_ids

            self.aux_layer_ids = resolve_aux_layer_ids(self.target_num_hidden_layers)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "draft_vocab_size", "hidden_size", "target_hidden_size",
                     "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "num_hidden_layers", "target_num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"draft config: {name} must be a positive integer, got {value!r}")
        if self.draft_vocab_size > self.vocab_size:
            raise UsageError(f"draft config: draft_vocab_size {self.draft_vocab_size} exceeds the "
                             f"target vocab size {self.vocab_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UsageError(f"draft config: num_attention_heads {self.num_attention_heads} is not a "
                             f"multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise UsageError(f"draft config: head_dim {self.head_dim} must be even for RoPE")
        if self.hidden_act not in SUPPORTED_ACTS:
            raise UsageError(f"draft config: hidden_act {self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ACTS)})")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise UsageError("draft config: rms_norm_eps and rope_theta must be positive")
        ids = list(self.aux_layer_ids)
        n = self.target_num_hidden_layers
        if len(ids) != 3 or len(set(ids)) != 3:
            raise UsageError(f"draft config: aux_layer_ids {ids}: need three distinct layer ids")
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i <= n - 2]
        if bad:
            raise UsageError(f"draft config: aux_layer_ids {ids}: {bad} out of range for a target with "
                             f"{n} layers (valid 0..{n - 2})")
        if self.rope_scaling is not None:
            from core.model.rope import SUPPORTED_ROPE_TYPES

            kind = self.rope_scaling.get("rope_type")
            if kind not in SUPPORTED_ROPE_TYPES:
                raise UsageError(f"draft config: rope_scaling type {kind!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def default_aux_layer_ids(self) -> bool:
        """True when aux ids are the engines' default (an export then omits eagle_config)."""
        n = self.target_num_hidden_layers
        return sorted(self.aux_layer_ids) == sorted([1, n // 2 - 1, n - 4])

    @classmethod
    def from_target_config(cls, hf_config: Any, draft_vocab_size: int,
                           aux_layer_ids: list[int] | None = None, num_layers: int = 1,
                           torch_dtype: str = "float32") -> "DraftConfig":
        """Draft shape from a target's config (a transformers config object or its dict)."""
        cfg = _text_config(hf_config)
        missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                               "intermediate_size") if _get(cfg, k) is None]
        if missing:
            raise UsageError(f"target config lacks {', '.join(missing)}: not a Llama-family decoder")
        hidden = int(_get(cfg, "hidden_size"))
        heads = int(_get(cfg, "num_attention_heads"))
        head_dim = _get(cfg, "head_dim") or hidden // heads
        theta, scaling = read_rope(cfg)
        n_layers = int(_get(cfg, "num_hidden_layers"))
        if aux_layer_ids is not None:
            from core.features import resolve_aux_layer_ids

            aux_layer_ids = resolve_aux_layer_ids(n_layers, aux_layer_ids)
        act = _get(cfg, "hidden_act") or _get(cfg, "hidden_activation") or "silu"
        return cls(
            vocab_size=int(_get(cfg, "vocab_size")),
            draft_vocab_size=int(draft_vocab_size),
            hidden_size=hidden,
            target_hidden_size=hidden,
            intermediate_size=int(_get(cfg, "intermediate_size")),
            num_attention_heads=heads,
            num_key_value_heads=int(_get(cfg, "num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(_get(cfg, "rms_norm_eps") or 1e-6),
            hidden_act=act,
            max_position_embeddings=int(_get(cfg, "max_position_embeddings") or 2048),
            rope_theta=theta,
            rope_scaling=scaling,
            num_hidden_layers=int(num_layers),
            aux_layer_ids=list(aux_layer_ids or []),
            target_num_hidden_layers=n_layers,
            torch_dtype=torch_dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DraftConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"draft config: unknown fields {', '.join(unknown)}")
        return cls(**dict(d))
