"""Rotary position embeddings with the target's rope_theta / rope_scaling.

Scaled variants come from transformers' own init functions (the same numbers the target uses);
the plain case is computed here. cos/sin are computed in float32 from explicit position ids, so
packed documents (positions restarting at 0) and TTT steps (positions + k) need nothing special.
"""

from __future__ import annotations

import torch
from torch import nn

# "dynamic" changes frequencies with the running sequence length: not supported for drafts.
SUPPORTED_ROPE_TYPES = ("linear", "llama3", "yarn", "longrope")


def rope_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict | None,
                  max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention_scaling)."""
    if rope_scaling is None:
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        return (1.0 / (rope_theta ** exponent)).float(), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(rope_scaling)
    params["rope_theta"] = rope_theta
    cfg = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                      max_position_embeddings=max_position_embeddings, rope_parameters=params)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict | None,
                 max_position_embeddings: int):
        super().__init__()
        with torch.device("cpu"):  # real numbers even when the model is built on "meta"
            inv_freq, self.attention_scaling = rope_inv_freq(head_dim, rope_theta, rope_scaling,
                                                             max_position_embeddings)
        # Not persistent: derived from the config, never part of the exported state dict.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, 1, T, head_dim] for position ids [B, T]."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd]; cos/sin [B, 1, T, hd]."""
    return x * cos + rotate_half(x) * sin
