"""Target features for EAGLE-3: three aux hidden states and the target's draft-vocab distribution.

A frozen Hugging Face causal LM runs once per batch. Forward hooks on three decoder layers capture
their outputs (= `hidden_states[i + 1]` of `output_hidden_states`, without keeping every layer);
a hook on the final norm captures the pre-norm final hidden state and its normed output.

Everything is UNSHIFTED: index t describes position t (aux states of x<=t, the distribution of
x(t+1)). The trainer applies the shift of eagle3-reference.md section 4.

`position_mask` needs the target's full-vocab argmax, so the full `norm(h) @ W.T` is unavoidable;
it is computed over chunks of tokens (bounded bytes, never the whole batch at once), and the
draft-vocab columns are gathered from the same chunk instead of a second matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from core.errors import InputDataError, UsageError
from core.settings import default_aux_layers
from core.vocab import DraftVocab

LOGITS_CHUNK_BYTES = 64 << 20  # bound on one chunk of full-vocab logits


@dataclass
class FeatureSample:
    input_ids: torch.Tensor  # int64 [T]
    aux_hidden: torch.Tensor  # [T, 3*Ht], compute dtype (bf16 on CUDA, fp32 on CPU)
    target_probs: torch.Tensor  # float32 [T, Vd], rows sum to 1
    position_mask: torch.Tensor  # bool [T]: the target's full-vocab argmax at t is in the draft vocab
    final_hidden: torch.Tensor | None = None  # [T, Ht] before the final norm (when asked for)


def resolve_aux_layer_ids(num_layers: int, ids: Sequence[int] | None = None) -> list[int]:
    """Validated aux layer ids, ascending (the order engines concatenate them in).

    Valid ids are 0..N-2: engines capture "the residual entering layer i+1", so the last layer's
    output is never available to them. No ids: the engine default; for shallow targets (< 7
    layers) where that is not three distinct layers, [0, max(1, (N-2)//2), N-2] instead (an export
    must then name them explicitly).
    """
    if ids is None:
        if num_layers < 4:
            raise UsageError(f"the target has {num_layers} layers; EAGLE-3 needs at least 4")
        ids = default_aux_layers(num_layers)
        if len(set(ids)) != 3 or min(ids) < 0:
            ids = [0, max(1, (num_layers - 2) // 2), num_layers - 2]
        return sorted(ids)
    ids = [int(i) for i in ids]
    if len(ids) != 3 or len(set(ids)) != 3:
        raise UsageError(f"aux layer ids {ids}: need three distinct layer ids")
    bad = [i for i in ids if not 0 <= i <= num_layers - 2]
    if bad:
        raise UsageError(f"aux layer ids {ids}: {bad} out of range for a target with {num_layers} "
                         f"layers (valid 0..{num_layers - 2}: outputs of layers that feed another layer)")
    return sorted(ids)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-family RMSNorm, in float32."""
    h = h.float()
    return weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def probs_from_final_hidden(final_hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            lm_head_rows: torch.Tensor, lm_head_bias: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """softmax(norm(h) @ W[selected].T) in float32: the draft-vocab distribution from a final hidden."""
    logits = rms_norm(final_hidden, norm_weight, eps) @ lm_head_rows.float().T
    if lm_head_bias is not None:
        logits = logits + lm_head_bias.float()
    return torch.softmax(logits, dim=-1)


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class TargetFeatureExtractor:
    """Run a frozen target and return aux states and draft-vocab distributions per sample."""

    def __init__(self, model: Any, draft_vocab: DraftVocab, aux_layer_ids: Sequence[int] | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
                 device_map: str | None = None, final_hidden: bool = False,
                 max_batch_tokens: int = 4096, logits_chunk_bytes: int = LOGITS_CHUNK_BYTES,
                 check_head: bool = True):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.model = self._load(model, device_map)
        self.max_batch_tokens = int(max_batch_tokens)
        self.logits_chunk_bytes = int(logits_chunk_bytes)
        self.want_final_hidden = final_hidden
        self.vocab = draft_vocab

        cfg = self.model.config
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        self.decoder = decoder
        self.layers = getattr(decoder, "layers", None)
        self.norm = getattr(decoder, "norm", None)
        self.lm_head = self.model.get_output_embeddings()
        if self.layers is None or self.norm is None or self.lm_head is None:
            raise UsageError(f"unsupported target architecture {type(self.model).__name__}: "
                             "expected decoder.layers, decoder.norm and an lm_head (Llama family)")
        self.num_layers = len(self.layers)
        self.hidden_size = int(cfg.hidden_size)
        self.vocab_size = int(self.lm_head.weight.shape[0])
        if draft_vocab.target_vocab_size != self.vocab_size:
            raise UsageError(f"the draft vocab was built for a target vocab of "
                             f"{draft_vocab.target_vocab_size} ids; this target has {self.vocab_size}",
                             hint="rebuild the vocab with this target's tokenizer")
        self.aux_layer_ids = resolve_aux_layer_ids(self.num_layers, aux_layer_ids)
        self.norm_eps = float(getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", 1e-6)))

        head_dev = self.lm_head.weight.device
        self._selected = draft_vocab.selected.to(head_dev)
        self._t2d = draft_vocab.t2d.to(head_dev)
        self._captured: dict[Any, torch.Tensor] = {}
        self._active = False  # hooks record only during our own forwards (the model may be shared)
        self._hooks = [self.layers[i].register_forward_hook(self._aux_hook(i)) for i in self.aux_layer_ids]
        self._hooks.append(self.norm.register_forward_hook(self._norm_hook))
        if check_head:
            self._check_head()

    # ---- loading and hooks -------------------------------------------------------------------
    def _load(self, model: Any, device_map: str | None):
        if isinstance(model, (str, Path)):
            from transformers import AutoModelForCausalLM

            p = Path(model)
            if not (p / "config.json").exists():
                raise InputDataError("not a Hugging Face model folder (no config.json)", path=str(p))
            kw: dict[str, Any] = {"dtype": self.dtype}
            if device_map is not None:
                kw["device_map"] = device_map
            model = AutoModelForCausalLM.from_pretrained(str(p), **kw)
            if device_map is None:
                model = model.to(self.device)
        elif device_map is None and self.device is not None:
            model = model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        return model

    def _aux_hook(self, layer_id: int):
        def hook(_module, _args, out):
            if self._active:
                self._captured[layer_id] = _layer_output(out)
        return hook

    def _norm_hook(self, _module, args, out):
        if self._active:
            self._captured["pre_norm"] = args[0]
            self._captured["normed"] = out

    def close(self) -> None:
        """Remove the hooks (the model stays usable on its own)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._captured.clear()

    def __enter__(self) -> "TargetFeatureExtractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _input_device(self) -> torch.device:
        return self.decoder.get_input_embeddings().weight.device

    def _check_head(self) -> None:
        """The restricted head must reproduce the model's own logits (catches logit scaling,
        soft-capping or non-Llama norms that a plain norm + lm_head would silently get wrong)."""
        ids = (torch.arange(8) * 7919 % self.vocab_size).unsqueeze(0).to(self._input_device())
        with torch.no_grad():
            self._active = True
            try:
                ref = self.model(input_ids=ids).logits[0].float()
            finally:
                self._active = False
            normed = self._captured["normed"][0]
            ours = self._logits(normed).float()
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        scale = ref.abs().max().clamp(min=1.0)
        if not torch.allclose(ours, ref.to(ours.device), atol=tol * float(scale), rtol=0):
            raise UsageError(f"{type(self.model).__name__}: logits are not norm(h) @ lm_head.T "
                             "(logit scaling or soft-capping?); this target is not supported")
        if self.want_final_hidden:
            pre = self._captured["pre_norm"][0]
            w = self.norm.weight.detach()
            again = rms_norm(pre, w, self.norm_eps)
            if not torch.allclose(again, normed.float(), atol=tol * float(normed.abs().max().clamp(min=1.0))):
                raise UsageError(f"{type(self.norm).__name__}: the final norm is not a Llama RMSNorm; "
                                 "storing the final hidden state is not supported for this target")
        self._captured.clear()

    def _logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.lm_head(normed.to(self.lm_head.weight.device))

    # ---- the computation ---------------------------------------------------------------------
    def head_tensors(self) -> dict[str, torch.Tensor]:
        """What a reader needs to recompute the distribution from a stored final hidden state."""
        out = {"norm_weight": self.norm.weight.detach().float().cpu(),
               "lm_head_rows": self.lm_head.weight.detach()[self._selected].cpu().contiguous()}
        bias = getattr(self.lm_head, "bias", None)
        if bias is not None:
            out["lm_head_bias"] = bias.detach()[self._selected].float().cpu()
        return out

    @torch.no_grad()
    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Right-padded batch [B, T] -> aux_hidden [B,T,3Ht], target_probs f32 [B,T,Vd],
        position_mask bool [B,T] (False on padding), optional final_hidden [B,T,Ht]."""
        dev = self._input_device()
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        self._captured.clear()
        self._active = True
        try:
            self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self._active = False
        normed = self._captured["normed"]
        out_dev = normed.device
        aux = torch.cat([self._captured[i].to(out_dev) for i in self.aux_layer_ids], dim=-1)
        real = attention_mask.to(out_dev).bool()
        B, T = input_ids.shape
        Vd = self.vocab.draft_vocab_size
        probs = torch.zeros(B, T, Vd, dtype=torch.float32, device=out_dev)
        pmask = torch.zeros(B, T, dtype=torch.bool, device=out_dev)
        rows = normed[real]  # [N_real, Ht]: padding never reaches the head
        p_rows, m_rows = self._head_chunked(rows)
        probs[real] = p_rows.to(out_dev)
        pmask[real] = m_rows.to(out_dev)
        aux = aux * real.unsqueeze(-1).to(aux.dtype)
        result = {"aux_hidden": aux, "target_probs": probs, "position_mask": pmask}
        if self.want_final_hidden:
            result["final_hidden"] = self._captured["pre_norm"].to(out_dev) * real.unsqueeze(-1).to(aux.dtype)
        self._captured.clear()
        return result

    def _head_chunked(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        elsize = torch.finfo(self.lm_head.weight.dtype).bits // 8
        per_chunk = max(1, self.logits_chunk_bytes // (self.vocab_size * max(elsize, 4)))
        probs, masks = [], []
        for start in range(0, rows.shape[0], per_chunk):
            full = self._logits(rows[start:start + per_chunk])  # [n, V], bounded
            masks.append(self._t2d[full.argmax(dim=-1)])
            probs.append(torch.softmax(full[:, self._selected].float(), dim=-1))
            del full
        if not probs:
            Vd = self.vocab.draft_vocab_size
            return rows.new_zeros(0, Vd, dtype=torch.float32), rows.new_zeros(0, dtype=torch.bool)
        return torch.cat(probs), torch.cat(masks)

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Group sample indices (longest first) so each padded batch has <= max_batch_tokens."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        batches: list[list[int]] = []
        for i in order:
            if batches:
                cur = batches[-1]
                width = max(lengths[cur[0]], lengths[i])
                if width * (len(cur) + 1) <= self.max_batch_tokens:
                    cur.append(i)
                    continue
            batches.append([i])
        return batches

    def __call__(self, samples: Sequence[Sequence[int]], to_cpu: bool = True) -> list[FeatureSample]:
        seqs = []
        for row, s in enumerate(samples):
            t = torch.as_tensor(s, dtype=torch.long).flatten()
            if t.numel() == 0:
                raise InputDataError("empty sample", path="features", row=row)
            if int(t.max()) >= self.vocab_size or int(t.min()) < 0:
                raise InputDataError(f"token id outside the target vocab ({self.vocab_size})",
                                     path="features", row=row)
            seqs.append(t)
        out: list[FeatureSample | None] = [None] * len(seqs)
        for batch in self.plan_batches([s.numel() for s in seqs]):
            width = max(seqs[i].numel() for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, i in enumerate(batch):
                n = seqs[i].numel()
                ids[r, :n], mask[r, :n] = seqs[i], 1
            res = self.forward_padded(ids, mask)
            for r, i in enumerate(batch):
                n = seqs[i].numel()
                pick = {k: v[r, :n] for k, v in res.items()}
                if to_cpu:
                    pick = {k: v.cpu() for k, v in pick.items()}
                out[i] = FeatureSample(input_ids=seqs[i], aux_hidden=pick["aux_hidden"],
                                       target_probs=pick["target_probs"],
                                       position_mask=pick["position_mask"],
                                       final_hidden=pick.get("final_hidden"))
        return out  # type: ignore[return-value]

    def target_info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"model_type": getattr(cfg, "model_type", None), "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers, "vocab_size": self.vocab_size,
                "aux_layer_ids": list(self.aux_layer_ids), "norm_eps": self.norm_eps,
                "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device)}

