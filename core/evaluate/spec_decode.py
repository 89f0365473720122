"""Chain speculative decoding, greedy, batch 1: a Hugging Face target and an EAGLE-3 draft.

Per iteration (EAGLE-3, top-k 1):
  1. draft step 0 over the newly committed positions: hidden = fc(target aux states there), token =
     the token after each position; the last position's logits give draft token d1;
  2. k-1 more draft steps, each on one position with the previous step's (un-normed) hidden output;
  3. ONE target forward over [pending, d1..dk] with its KV cache: the target's greedy choice at each
     position; accept the longest prefix where the draft agrees, plus the target's bonus token;
  4. crop both KV caches to the committed positions (transformers DynamicCache.crop for the target).
Accept length per iteration = accepted drafts + 1 (the bonus token), as SGLang counts it.

Positions: draft step j of an iteration sits at position (last committed) + j, which is what the
TTT training unroll uses (positions + k at step k). Aux states are captured with forward hooks on
the target's decoder layers (0-based layer outputs, the core.features convention).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from core.errors import UsageError
from core.features import _layer_output


@dataclass
class GreedyResult:
    tokens: list[int]
    forward_times: list[float]  # one per single-token decode forward (prefill excluded)
    top2_margin: list[float] = field(default_factory=list)  # logit(top1) - logit(top2) per token


@dataclass
class SpecResult:
    tokens: list[int]
    accept_lengths: list[int]  # per iteration, bonus token included
    accepted_drafts: list[int]  # per iteration, 0..k
    draft_step_times: list[float]  # single-position draft steps (steps 1..k-1)
    draft_times: list[float] = field(default_factory=list)  # whole drafting phase per iteration
    verify_times: list[float] = field(default_factory=list)
    wall_s: float = 0.0


class AuxCapture:
    """Forward hooks that keep the outputs of the aux layers from the last target forward."""

    def __init__(self, model: Any, layer_ids: Sequence[int]):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise UsageError(f"unsupported target {type(model).__name__}: no decoder.layers")
        self.layer_ids = list(layer_ids)
        bad = [i for i in self.layer_ids if not 0 <= i < len(layers)]
        if bad:
            raise UsageError(f"aux layers {bad} do not exist in a {len(layers)}-layer target")
        self.captured: dict[int, torch.Tensor] = {}
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in self.layer_ids]

    def _hook(self, i: int):
        def hook(_m, _a, out):
            self.captured[i] = _layer_output(out)
        return hook

    def aux(self) -> torch.Tensor:
        """[B, T, 3*Ht] of the last forward, low-mid-high (the order the draft's fc expects)."""
        return torch.cat([self.captured[i] for i in self.layer_ids], dim=-1)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _new_cache(model: Any):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


def crop_cache(cache: Any, keep: int) -> None:
    """Keep the first `keep` positions of a transformers DynamicCache (negative crop = remove n,
    which old and new transformers both read the same way)."""
    remove = int(cache.get_seq_length()) - int(keep)
    if remove > 0:
        cache.crop(-remove)
    elif remove < 0:
        raise UsageError(f"target KV cache holds {cache.get_seq_length()} positions, fewer than {keep}")


def _top1_margin(logits: torch.Tensor) -> tuple[int, float]:
    """(argmax, logit(top1) - logit(top2)). Not torch.topk: on CPU it took 1.7 ms per token inside
    the decode loop (3% of a SmolLM2 forward), which would slow the baseline of a measured speedup."""
    tok = int(logits.argmax())
    rest = logits.clone()
    rest[tok] = float("-inf")
    return tok, float(logits[tok] - rest.max())


@torch.no_grad()
def greedy_generate(model: Any, prompt_ids: torch.Tensor, max_new_tokens: int,
                    eos_ids: set[int]) -> GreedyResult:
    """The target's own greedy output (the lossless reference), one token per forward, timed."""
    dev = prompt_ids.device
    cache = _new_cache(model)
    out = model(input_ids=prompt_ids, past_key_values=cache, use_cache=True)
    logits = out.logits[0, -1].float()
    tokens, times, margins = [], [], []
    while True:
        tok, margin = _top1_margin(logits)
        tokens.append(tok)
        margins.append(margin)
        if tok in eos_ids or len(tokens) >= max_new_tokens:
            break
        _sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([[tok]], device=dev), past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return GreedyResult(tokens, times, margins)


@torch.no_grad()
def speculative_generate(model: Any, draft: Any, capture: AuxCapture, prompt_ids: torch.Tensor,
                         num_draft_tokens: int, max_new_tokens: int, eos_ids: set[int]) -> SpecResult:
    from core.model import DraftKVCache

    k = int(num_draft_tokens)
    if k < 1:
        raise UsageError("--num-draft-tokens must be >= 1")
    dev = prompt_ids.device
    wall0 = time.perf_counter()
    cache = _new_cache(model)
    out = model(input_ids=prompt_ids, past_key_values=cache, use_cache=True)
    seq = prompt_ids[0].tolist()
    pending = int(out.logits[0, -1].argmax())  # the target's first token (prefill)
    generated = [pending]
    new_aux = capture.aux()  # aux states of the positions not yet given to the draft
    committed = 0  # positions the draft has processed in step 0 (== its KV cache length)
    dcache = DraftKVCache()
    res = SpecResult([], [], [], [])
    while pending not in eos_ids and len(generated) < max_new_tokens:
        # ---- draft: step 0 over the new positions, then k-1 single steps ------------------------
        _sync(dev)
        t_draft = time.perf_counter()
        full = seq + [pending]
        n_new = new_aux.shape[1]
        ids0 = torch.tensor([full[committed + 1: committed + 1 + n_new]], device=dev)
        pos0 = torch.arange(committed, committed + n_new, device=dev).unsqueeze(0)
        logits, hidden = draft.decode_step(ids0, draft.project_aux(new_aux), pos0, dcache)
        committed += n_new
        drafts: list[int] = []
        d = int(draft.draft_to_target(logits[0, -1].argmax().view(1)))
        drafts.append(d)
        h = hidden[:, -1:]
        for j in range(1, k):
            _sync(dev)
            ts = time.perf_counter()
            pos = torch.tensor([[committed - 1 + j]], device=dev)
            logits, h = draft.decode_step(torch.tensor([[d]], device=dev), h, pos, dcache)
            d = int(draft.draft_to_target(logits[0, -1].argmax().view(1)))
            drafts.append(d)
            _sync(dev)
            res.draft_step_times.append(time.perf_counter() - ts)
        _sync(dev)
        res.draft_times.append(time.perf_counter() - t_draft)
        dcache.crop(committed)  # steps 1..k-1 were on draft hiddens: recomputed from target aux
        # ---- verify: one target forward over [pending, d1..dk] ----------------------------------
        t_ver = time.perf_counter()
        ver = torch.tensor([[pending] + drafts], device=dev)
        out = model(input_ids=ver, past_key_values=cache, use_cache=True)
        choice = out.logits[0].float().argmax(-1).tolist()  # target's token after each position
        _sync(dev)
        res.verify_times.append(time.perf_counter() - t_ver)
        n = 0
        while n < k and drafts[n] == choice[n]:
            n += 1
        bonus = choice[n]
        aux_all = capture.aux()
        seq.append(pending)
        seq.extend(drafts[:n])
        crop_cache(cache, len(seq))  # keep pending + accepted drafts; the bonus is the next pending
        new_aux = aux_all[:, : n + 1]
        res.accepted_drafts.append(n)
        res.accept_lengths.append(n + 1)
        step_tokens = drafts[:n] + [bonus]
        for t in step_tokens:
            generated.append(t)
            if t in eos_ids or len(generated) >= max_new_tokens:
                break
        pending = generated[-1]
        if generated[-1] in eos_ids or len(generated) >= max_new_tokens:
            break
    res.tokens = generated[:max_new_tokens]
    res.wall_s = time.perf_counter() - wall0
    return res
