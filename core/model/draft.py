"""The EAGLE-3 draft network (eagle3-reference.md section 2).

Module names are the export keys: `state_dict()` of a one-layer draft is exactly
embed_tokens.weight, fc.weight, midlayer.{input_layernorm, hidden_norm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}.weight, norm.weight, lm_head.weight, d2t, t2d.

One step (layer 0, "midlayer"):
    x = cat(input_layernorm(embed(tok)), hidden_norm(h_in))     # embeds FIRST
    h = h_in + o_proj(attention(x))                             # residual taken before hidden_norm
    h = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))

Deeper drafts (`num_hidden_layers > 1`): layer 0 stays `midlayer`; layers 1.. are plain Llama
decoder layers (q/k/v input H, no hidden_norm) stored as `layers.1.*`, `layers.2.*`, ... This is
the layout vLLM's Eagle3 Llama loader serves (it renames `midlayer.` to `layers.0.` and builds
`num_hidden_layers` layers, only the first taking 2H). SGLang's EAGLE-3 draft has a single
`midlayer` and does not serve deeper drafts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import InputDataError, UsageError
from core.model.compile import run_block
from core.model.config import DraftConfig
from core.model.rope import RotaryEmbedding, apply_rope
from core.model.weights import read_embeddings

# attend(layer_index, q [B,nh,T,hd], k [B,nkv,T,hd], v [B,nkv,T,hd]) -> [B,nh,T,hd]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class DraftAttention(nn.Module):
    def __init__(self, cfg: DraftConfig, in_features: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                            cfg.num_key_value_heads, cfg.head_dim)
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated q [B,nh,T,hd], k [B,nkv,T,hd], and v [B,nkv,T,hd]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class DraftMLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    """Layer 0 (`first`) takes cat(normed embeds, normed hidden); later layers are plain Llama."""

    def __init__(self, cfg: DraftConfig, first: bool):
        super().__init__()
        self.first = first
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        if first:
            self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg, 2 * h if first else h)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        # the two dense blocks around attention may run torch.compile'd (core.model.compile)
        q, k, v = run_block(self, "pre", self._pre_attention, embeds, hidden, cos, sin)
        out = attend(q, k, v)  # [B, nh, T, hd]
        return run_block(self, "post", self._post_attention, hidden, out)

    def _pre_attention(self, embeds, hidden, cos, sin):
        if self.first:
            x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)
        else:
            x = self.input_layernorm(hidden)
        return self.self_attn.qkv(x, cos, sin)

    def _post_attention(self, hidden, out):
        b, _, t, _ = out.shape
        h = hidden + self.self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.post_attention_layernorm(h))


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, nkv, S, hd] -> [B, nkv*groups, S, hd] (GQA)."""
    if groups == 1:
        return x
    b, n, s, d = x.shape
    return x[:, :, None].expand(b, n, groups, s, d).reshape(b, n * groups, s, d)


class DraftKVCache:
    """Rotated keys and values of the positions drafted so far, one (k, v) per layer.

    `crop(n)` keeps the first n positions (roll back rejected draft tokens).
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else int(self.keys[0].shape[2])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def crop(self, n: int) -> None:
        if n < 0 or n > self.length:
            raise UsageError(f"cannot crop a draft KV cache of length {self.length} to {n}")
        self.keys = [None if k is None else k[:, :, :n] for k in self.keys]
        self.values = [None if v is None else v[:, :, :n] for v in self.values]


class Eagle3Draft(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        config.validate()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * config.target_hidden_size, h, bias=False)
        self.midlayer = DraftDecoderLayer(config, first=True)
        if config.num_hidden_layers > 1:
            self.layers = nn.ModuleDict({str(i): DraftDecoderLayer(config, first=False)
                                         for i in range(1, config.num_hidden_layers)})
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)
        self.reset_parameters()

    # ---- construction -------------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        """Llama-style init: normal(0, std) linears, ones for norms (embeddings left as they are)."""
        for name, p in self.named_parameters():
            if name == "embed_tokens.weight":
                continue
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std)

    def decoder_layers(self) -> list[DraftDecoderLayer]:
        extra = list(self.layers.values()) if self.config.num_hidden_layers > 1 else []
        return [self.midlayer, *extra]

    def set_vocab(self, draft_vocab: Any) -> None:
        d2t, t2d = _vocab_tensors(draft_vocab)
        cfg = self.config
        if d2t.shape != (cfg.draft_vocab_size,) or t2d.shape != (cfg.vocab_size,):
            raise UsageError(f"draft vocab shapes d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)} do not "
                             f"match the draft config (Vd {cfg.draft_vocab_size}, V {cfg.vocab_size})")
        target_ids = torch.arange(cfg.draft_vocab_size) + d2t.long()
        if int(target_ids.min()) < 0 or int(target_ids.max()) >= cfg.vocab_size \
                or not bool(t2d.bool()[target_ids].all()) or int(t2d.bool().sum()) != cfg.draft_vocab_size:
            raise UsageError("draft vocab is inconsistent: d2t and t2d do not describe the same ids")
        self.d2t.copy_(d2t.long())
        self.t2d.copy_(t2d.bool())

    @classmethod
    def from_target(cls, target: Any, draft_vocab: Any, draft_vocab_size: int | None = None,
                    aux_layer_ids: list[int] | None = None, num_layers: int = 1) -> "Eagle3Draft":
        """A fresh draft for `target` (a loaded HF model or a model folder): its config, its input
        embeddings copied and frozen, `d2t`/`t2d` from `draft_vocab` ((d2t, t2d) or .d2t/.t2d)."""
        d2t, _ = _vocab_tensors(draft_vocab)
        vd = int(draft_vocab_size or d2t.numel())
        if vd != d2t.numel():
            raise UsageError(f"draft_vocab_size {vd} does not match the draft vocab ({d2t.numel()} ids)")
        hf_config, embed = _target_config_and_embeddings(target)
        config = DraftConfig.from_target_config(hf_config, vd, aux_layer_ids, num_layers)
        if tuple(embed.shape) != (config.vocab_size, config.hidden_size):
            raise InputDataError(f"target input embeddings have shape {tuple(embed.shape)}, expected "
                                 f"[{config.vocab_size}, {config.hidden_size}]")
        draft = cls(config)
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(embed.float())
        draft.set_vocab(draft_vocab)
        return draft

    @classmethod
    def from_pretrained(cls, path: str | Path, target_model: Any = None, *, which: str = "best",
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        target_num_layers: int | None = None, with_info: bool = False):
        """A trained draft in eval mode from a run (its `which` checkpoint: best by held-out τ,
        latest, or a step), a checkpoint folder, or a serving folder (ours or a third party's in the
        same format; `target_model` supplies embeddings it leaves out). `dtype`: default float32
        for checkpoints, the stored dtype for exports. With `with_info`: (draft, DraftInfo)."""
        from core.errors import CorruptDataError
        from core.model.load import read_draft

        config, tensors, info = read_draft(path, target_model, which, target_num_layers)
        draft = cls(config)
        if dtype is None:
            dtype = torch.float32 if info.kind == "checkpoint" else tensors["fc.weight"].dtype
        draft.to(dtype)
        missing, unexpected = draft.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise CorruptDataError(f"{path}: draft weights do not match its config "
                                   f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        draft.to(device=device, dtype=dtype).eval()
        return (draft, info) if with_info else draft

    # ---- math shared by training and inference ------------------------------------------------
    def project_aux(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, 3*Ht] concat(low, mid, high) -> [B, T, H] (the step-0 hidden input)."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids).to(self.fc.weight.dtype)

    def run_layers(self, input_ids: torch.Tensor, hidden_in: torch.Tensor, position_ids: torch.Tensor,
                   attend: AttendFn) -> torch.Tensor:
        """One draft step through all layers; returns the un-normed output [B, T, H]."""
        embeds = self.embed(input_ids)
        cos, sin = self.rotary(position_ids, hidden_in.dtype)
        h = hidden_in
        for i, layer in enumerate(self.decoder_layers()):
            h = layer(embeds, h, cos, sin, lambda q, k, v, i=i: attend(i, q, k, v))
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head(norm(h)) over the draft vocab: [B, T, Vd]."""
        return self.lm_head(self.norm(hidden))

    # ---- inference API (speculative decoding) -------------------------------------------------
    def decode_step(self, input_ids: torch.Tensor, hidden_in: torch.Tensor, position_ids: torch.Tensor,
                    kv_cache: DraftKVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Process T new positions: causal attention over the cached keys plus the new ones.

        input_ids [B,T] (the token after each position), hidden_in [B,T,H] (project_aux of the
        target's aux states, or a previous step's hidden_out), position_ids [B,T]. Appends the
        new keys/values to `kv_cache` when given. Returns (logits [B,T,Vd], hidden_out [B,T,H]);
        hidden_out is un-normed: the next step takes it as hidden_in.

        Positions follow training: the prefix runs at the target's positions 0..p (index t pairs
        aux of x<=t with the token x(t+1)); the draft token proposed from the last index p is fed
        at position p+1 with hidden_out[:, -1:], the next at p+2, and so on. After verification,
        `kv_cache.crop(p_accepted + 1)` drops the rejected positions.
        """
        groups = self.config.num_attention_heads // self.config.num_key_value_heads

        def attend(layer: int, q, k, v):
            if kv_cache is not None:
                k, v = kv_cache.append(layer, k, v)
            t, s = q.shape[2], k.shape[2]
            # new query r sees every cached key and the new keys up to itself
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
            return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups),
                                                  attn_mask=mask)

        hidden_out = self.run_layers(input_ids, hidden_in, position_ids, attend)
        return self.compute_logits(hidden_out), hidden_out

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target token ids of draft ids: draft_id + d2t[draft_id]."""
        return draft_ids + self.d2t[draft_ids]


def _vocab_tensors(draft_vocab: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(draft_vocab, "d2t") and hasattr(draft_vocab, "t2d"):
        return torch.as_tensor(draft_vocab.d2t), torch.as_tensor(draft_vocab.t2d)
    if isinstance(draft_vocab, (tuple, list)) and len(draft_vocab) == 2:
        return torch.as_tensor(draft_vocab[0]), torch.as_tensor(draft_vocab[1])
    raise UsageError("draft_vocab must be a DraftVocab (with .d2t/.t2d) or a (d2t, t2d) pair")


def _target_config_and_embeddings(target: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(target, (str, Path)):
        path = Path(target)
        if not (path / "config.json").is_file():
            raise InputDataError("not a Hugging Face model folder (no config.json)", path=str(path))
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(path)
        return hf_config, read_embeddings(path)
    get = getattr(target, "get_input_embeddings", None)
    if get is None or getattr(target, "config", None) is None:
        raise UsageError("target must be a model folder or a transformers model")
    return target.config, get().weight.detach()
