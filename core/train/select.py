"""Held-out real τ during training: choose the checkpoint to serve by what engines will measure.

Loss and τ_sim can keep improving while real accept length falls (DeepSpec #84), so at every
checkpoint rank 0 runs the `eagle eval` chain speculative decoding (core.evaluate.spec_decode) with
the real target on a few held-out prompts, within a time bound, and `best` follows the highest τ.
The draft is loaded back from the checkpoint just written: what is measured is what gets exported,
whatever DDP/FSDP did to the live module.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from core.events import EventSink, Log


class HeldOutTau:
    def __init__(self, target: Path, data: str, num_prompts: int, num_draft_tokens: int,
                 max_new_tokens: int, max_seconds: float, device: torch.device, events: EventSink):
        self.target, self.data, self.events = target, data, events
        self.k, self.max_new, self.max_seconds = num_draft_tokens, max_new_tokens, max_seconds
        self.num_prompts, self.device = num_prompts, device
        self._model = None

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from core.evaluate import EvalConfig, eos_ids, load_prompts

        tok = AutoTokenizer.from_pretrained(str(self.target))
        ec = EvalConfig(target=str(self.target), draft="", data=self.data, num_prompts=self.num_prompts)
        self.prompts = load_prompts(ec, tok, self.events)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._model = AutoModelForCausalLM.from_pretrained(str(self.target), dtype=dtype).to(self.device).eval()
        self.eos = eos_ids(tok, self._model)

    @torch.no_grad()
    def measure(self, step_dir: Path) -> dict[str, float]:
        """tau, acc_pos_i (acceptance per draft position), prompts measured, seconds."""
        from core.evaluate.cpu_matmul import fast_cpu_linears
        from core.evaluate.report import acceptance
        from core.evaluate.spec_decode import AuxCapture, speculative_generate
        from core.model import Eagle3Draft

        if self._model is None:
            self._load()
        draft = Eagle3Draft.from_pretrained(step_dir, device=self.device)
        capture = AuxCapture(self._model, draft.config.aux_layer_ids)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        accepted: list[int] = []
        t0, done = time.monotonic(), 0
        with contextlib.closing(capture), autocast, fast_cpu_linears(self._model, draft):
            for _index, _sha, ids in self.prompts:
                if done and time.monotonic() - t0 > self.max_seconds:
                    break  # bounded: the prompts so far still give a τ (flagged below)
                x = torch.tensor([ids], device=self.device)
                r = speculative_generate(self._model, draft, capture, x, self.k, self.max_new, self.eos)
                accepted.extend(r.accepted_drafts)
                done += 1
        acc = acceptance(accepted, self.k)
        out: dict[str, Any] = {"tau": acc["tau"] or 1.0, "prompts": float(done),
                               "seconds": round(time.monotonic() - t0, 2)}
        out.update({f"acc_pos_{i}": r or 0.0 for i, r in enumerate(acc["accept_rate"])})
        if done < len(self.prompts):
            self.events(Log(stage="train", level="warning", message=(
                f"held-out τ measured on {done} of {len(self.prompts)} prompts (time bound "
                f"{self.max_seconds:.0f} s)")))
        return out
