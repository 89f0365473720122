"""core.evaluate.cpu_matmul: the faster small-batch CPU product equals F.linear and is undone after."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.evaluate.cpu_matmul import MAX_ROWS, fast_cpu_linears


class Scaled(nn.Linear):  # a subclass with its own meaning: must keep its forward
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_same_values_as_linear_for_every_row_count(rows, bias):
    torch.manual_seed(rows)
    small = nn.Linear(64, 48, bias=bias)
    big = nn.Linear(64, 4096, bias=bias)
    x = torch.randn(1, rows, 64)
    with torch.no_grad(), fast_cpu_linears(small, big) as n:
        assert n == 2
        got = [small(x), big(x)]
    for layer, y in zip((small, big), got):
        ref = F.linear(x, layer.weight, layer.bias)
        assert y.shape == ref.shape
        # contiguous like F.linear's: a strided result sent attention queries down SDPA's slow path
        assert y.is_contiguous()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_forward_is_restored_and_training_is_untouched():
    model = nn.Sequential(nn.Linear(8, 8), Scaled(8, 8))
    with fast_cpu_linears(model) as n:
        assert n == 1 and "forward" in vars(model[0]) and "forward" not in vars(model[1])
        x = torch.randn(3, 8, requires_grad=True)
        model(x).sum().backward()  # grad mode: the plain F.linear path, gradients flow
        assert x.grad is not None and model[0].weight.grad is not None
    assert "forward" not in vars(model[0])
    with fast_cpu_linears(model, enabled=False) as n:
        assert n == 0 and "forward" not in vars(model[0])


def test_an_error_inside_the_block_still_restores():
    layer = nn.Linear(4, 4)
    with pytest.raises(RuntimeError), fast_cpu_linears(layer):
        raise RuntimeError("boom")
    assert "forward" not in vars(layer)
