"""torch.compile of the draft layer's dense blocks, where it pays.

What is compiled: per decoder layer, the block before attention (norms, concat, q/k/v projections,
RoPE) and the block after it (o_proj, residual, norm, SiLU MLP, residual), with dynamic shapes
(packed lengths and TTT row counts change every step). Attention itself stays with its backend
(core.model.attention: a custom autograd function on CPU, flex on CUDA), so compiling never sees it.

Where: only when asked, EAGLE_COMPILE_DRAFT=1, on any device. CPU, measured on the 2-core CPU
(SmolLM2 shapes, 2k-token rows, forward + backward of both blocks): about 27% faster per call, but
compiling took about 85 s on that loaded machine (paid back only after some hundreds of TTT steps)
and needs a C++ compiler at run time, so not by default. CUDA is where it is meant to be on by
default, but that is unmeasured so far (no device run yet) and bench/gpu_check.py's train check
wants at most 2 compiled graphs (flex alone); turn the CUDA default on (`compile_wanted`) once the
device check has timed it and counts these graphs apart. Numerics: inductor fuses the elementwise
math (float32 rounding differs, within 1e-5 in a test). Fallback: if compiling fails, a warning
and eager from then on.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any, Callable

import torch

ENV = "EAGLE_COMPILE_DRAFT"
_compiled: "weakref.WeakKeyDictionary[Any, dict[str, Callable]]" = weakref.WeakKeyDictionary()
_failed = False


def compile_wanted(device: torch.device) -> bool:
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    return False  # by default nowhere yet: see the module docstring (CUDA after a device measurement)


def run_block(owner: Any, name: str, fn: Callable, *args):
    """fn(*args), compiled (once per owner and block) where compile_wanted says so."""
    global _failed
    if _failed or not compile_wanted(args[0].device) or torch.compiler.is_compiling():
        return fn(*args)
    blocks = _compiled.setdefault(owner, {})
    if name not in blocks:
        blocks[name] = torch.compile(fn, dynamic=True)
    try:
        return blocks[name](*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager for good
        _failed = True
        warnings.warn(f"torch.compile of the draft layer failed ({type(e).__name__}: {str(e)[:200]}); "
                      "running eagerly", RuntimeWarning, stacklevel=2)
        return fn(*args)
