"""Compact encodings of cache tensors and their exact inverses.

fp8 aux states: float8 e4m3 (3 mantissa bits, max 448) with one float32 scale per token and aux
layer (the three layers differ in magnitude by orders). scale = amax / 448, so every value maps
into range; the element error is at most 2^-4 relative (round-to-nearest with 3 mantissa bits)
for normal values, plus at most 2^-10 * scale absolute for values in the subnormal range.

Top-k target probabilities: the k largest draft-vocab probabilities (fp16) and their draft ids;
the reader scatters them into a dense row and renormalizes. Against the full distribution p, the
total-variation distance of that reconstruction is exactly 1 - (mass of the top k), plus fp16
rounding.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP8_REL_ERR = 2.0 ** -4  # half a unit in the last place, 3 mantissa bits
FP8_SUBNORMAL_ABS_ERR = 2.0 ** -10  # times the scale: half the subnormal spacing 2^-9


def fp8_quantize(x: torch.Tensor, groups: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, G*H] float -> (uint8 [T, G*H] raw e4m3 bytes, float32 scales [T, G])."""
    T, D = x.shape
    xg = x.float().reshape(T, groups, D // groups)
    amax = xg.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xg / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(T, D).view(torch.uint8), scale.float()


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of fp8_quantize -> float32 [T, G*H]."""
    T, D = q.shape
    groups = scale.shape[-1]
    x = q.contiguous().view(FP8).float().reshape(T, groups, D // groups) * scale.float().unsqueeze(-1)
    return x.reshape(T, D)


def topk_compress(probs: torch.Tensor, k: int, index_dtype: torch.dtype = torch.int16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, Vd] probabilities -> (fp16 values [T, k], draft ids [T, k])."""
    values, indices = torch.topk(probs.float(), k, dim=-1, sorted=True)
    return values.to(torch.float16), indices.to(index_dtype)


def topk_expand(values: torch.Tensor, indices: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """Dense float32 [T, Vd], zero outside the top k, each row renormalized to sum 1."""
    dense = torch.zeros(values.shape[0], draft_vocab_size, dtype=torch.float32)
    dense.scatter_(1, indices.long(), values.float())
    total = dense.sum(dim=-1, keepdim=True)
    return dense / total.clamp(min=torch.finfo(torch.float32).tiny)
