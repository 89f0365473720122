"""Faster small-batch linears on CPU for speculative decoding's verify and draft steps.

On CPU, `F.linear` (x @ W^T) with 2..4 rows runs through a GEMM path that is much slower per row
than the one-row GEMV: on this 2-core AVX-512 machine a 4-token forward of SmolLM2-135M took 1.57x
the time of a 1-token one (bench/cpu_matmul.py), which alone made speculative decoding (k=3: a
4-token verify) slower than plain decoding. The same product computed as W @ x^T picks a faster
kernel for these shapes (the 49152x576 output head alone: 35 ms -> 9 ms for 2 rows). A one-row
product is faster padded to two rows: the one-row GEMV runs on one thread, and a decoder's weights
do not stay in cache, so it is bound by one core's memory bandwidth (30 distinct 576x1536 weights:
376 -> 175 us per layer). That makes plain decoding faster too, which is what the baseline of a
measured speedup must be. `fast_cpu_linears(*modules)` swaps the forward of every plain
`nn.Linear` under the modules for the time of a `with` block; results equal `F.linear`'s up to
float rounding (summation order).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 4  # measured faster up to here; 5-8 rows were mixed (0.89-1.10x), so they keep F.linear


def _fast_forward(layer: nn.Linear):
    weight, bias = layer.weight, layer.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if x.device.type != "cpu" or training or not 1 <= rows <= MAX_ROWS:
            return F.linear(x, weight, bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:
            flat = torch.cat([flat, flat])
        # contiguous: a transposed result reaches attention as a query whose last dim has stride
        # `rows`, which sends SDPA down its slow math path (300 vs 50 us per call here)
        y = (weight @ flat.T).T[:rows].contiguous()
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])

    return forward


@contextlib.contextmanager
def fast_cpu_linears(*modules: Any, enabled: bool = True) -> Iterator[int]:
    """Within the block, plain `nn.Linear`s under `modules` on CPU use the faster 1..MAX_ROWS-row
    product; yields how many were swapped (0 when disabled or nothing is on CPU)."""
    swapped: list[nn.Linear] = []
    if enabled:
        for m in modules:
            for layer in m.modules():
                # exact type only: quantized or LoRA subclasses keep their own forward
                if type(layer) is nn.Linear and layer.weight.device.type == "cpu" and "forward" not in vars(layer):
                    layer.forward = _fast_forward(layer)
                    swapped.append(layer)
    try:
        yield len(swapped)
    finally:
        for layer in swapped:
            del layer.forward
