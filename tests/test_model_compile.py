"""torch.compile of the draft layer's dense blocks (core.model.compile): off unless asked (CUDA's
default waits for a device measurement), equal to eager in loss and gradients on CPU when asked,
and a failing compiler falls back to eager."""

from __future__ import annotations

import pytest
import torch

import core.model.compile as C
from core.model import ttt_forward_loss
from tests.test_model_ttt import grads, load_bench, make_docs, make_draft


def _batch():
    docs, _ = make_docs([9, 14, 6, 11])
    return load_bench().pack_docs(docs, 24)


def _run(batch):
    d = make_draft(2)
    out = ttt_forward_loss(d, batch, ttt_length=3)
    out.loss.backward()
    return out, grads(d)


def test_default_by_device_and_the_environment_override(monkeypatch):
    monkeypatch.delenv(C.ENV, raising=False)
    assert not C.compile_wanted(torch.device("cuda")) and not C.compile_wanted(torch.device("cpu"))
    monkeypatch.setenv(C.ENV, "1")
    assert C.compile_wanted(torch.device("cpu")) and C.compile_wanted(torch.device("cuda"))
    monkeypatch.setenv(C.ENV, "0")
    assert not C.compile_wanted(torch.device("cuda"))


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    batch = _batch()
    monkeypatch.setenv(C.ENV, "0")
    ref, ref_g = _run(batch)

    def broken(fn, **_kw):
        def call(*a):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setenv(C.ENV, "1")
    monkeypatch.setattr(C, "_failed", False)
    monkeypatch.setattr(C, "_compiled", C.weakref.WeakKeyDictionary())
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        out, g = _run(batch)
    assert C._failed
    assert torch.equal(out.loss.detach(), ref.loss.detach())
    assert all(torch.equal(g[k], ref_g[k]) for k in ref_g)


@pytest.mark.slow
def test_compiled_blocks_equal_eager_on_cpu(monkeypatch):
    batch = _batch()
    monkeypatch.setenv(C.ENV, "0")
    ref, ref_g = _run(batch)
    monkeypatch.setenv(C.ENV, "1")
    monkeypatch.setattr(C, "_failed", False)
    out, g = _run(batch)
    assert not C._failed
    torch.testing.assert_close(out.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    assert out.per_step_acc == ref.per_step_acc
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6)
