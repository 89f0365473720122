"""TTT attention (eagle3-reference.md section 4), three interchangeable backends.

At TTT step k the query at position i sees
  * the step-0 keys j <= i of its own packed document (causal & same document), and
  * the keys that steps 1..k produced at the same position i (the diagonal).

Backends (held equal, outputs and gradients, in tests/test_model_attention.py):
  naive  reference: concatenates the keys of all steps [T*(k+1)] and builds the full explicit mask.
  eager  explicit scores for the causal block [T, T] plus the k diagonal scores as extra columns,
         one softmax over both. Any device.
  sdpa   CPU: the causal block runs in PyTorch's fused flash kernel for CPU (which also returns the
         log-sum-exp); the diagonal columns are merged through that log-sum-exp, and the backward
         pass reuses the fused kernel with the merged output and log-sum-exp (the standard
         split-softmax identity), so no [T, T] score tensor is kept per step.
  flex   CUDA: compiled torch flex attention with (causal & same document) | diagonal over the
         concatenated keys. On CPU, torch 2.13 runs flex forward only (no backward).

Flex without recompiles: a compiled kernel is specialised to its shapes, and packed batches and
TTT steps change them nearly every step (past dynamo's recompile limit it silently falls back to
the unfused path that materialises every score). So the flex path pads T up to a length bucket
(`bucket_length`: multiples of 128 up to 1024, then eighths of an octave, at most 12.5% more),
always concatenates the keys of all `max_steps` TTT steps (steps not run yet are zeros that no
block visits), and builds each step's BlockMask directly from the document boundaries (block
lists, no [T, T*k] mask evaluation). One compile per (bucket, batch rows, dtype, grad mode).
Documents are contiguous runs of equal doc id (as packing makes them).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from core.errors import UsageError

BACKENDS = ("auto", "naive", "eager", "sdpa", "flex")
_NEG_INF = float("-inf")


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise UsageError(f"attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "flex" if device.type == "cuda" else ("sdpa" if device.type == "cpu" else "eager")
    if name == "sdpa" and device.type != "cpu":
        return "eager"  # the fused kernel that returns the log-sum-exp is the CPU one
    return name


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, n, s, d = x.shape
    return x[:, :, None].expand(b, n, groups, s, d).reshape(b, n * groups, s, d)


def causal_doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, T, T]: key j visible to query i iff j <= i and both lie in the same document."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])


def attach_trailing_padding(doc_ids: torch.Tensor) -> torch.Tensor:
    """Padding (< 0) after a document joins that document for attention purposes.

    Real positions never see it (it comes later), so their results do not change, and every
    backend, including the maskless causal fast path, then treats padding the same way.
    """
    real = doc_ids >= 0
    if bool(real.all()):
        return doc_ids
    pos = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    last_real = torch.where(real, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    filled = doc_ids.gather(1, last_real.clamp(min=0))
    return torch.where(last_real >= 0, filled, doc_ids)


class _CausalPlusDiagonal(torch.autograd.Function):
    """softmax over [causal block scores | k diagonal scores], causal block in the fused CPU kernel."""

    @staticmethod
    def forward(ctx, q, k0, v0, kd, vd, mask, is_causal: bool, scale: float):
        o0, lse0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k0, v0, 0.0, is_causal, attn_mask=mask, scale=scale)
        if kd is None:
            out, lse = o0, lse0
        else:
            d = (q.unsqueeze(0) * kd).sum(-1).float() * scale  # [k, B, h, T]
            lse = torch.logsumexp(torch.cat((lse0.unsqueeze(0), d), 0), 0)
            out = (o0 * (lse0 - lse).exp().unsqueeze(-1).to(o0.dtype)
                   + ((d - lse).exp().unsqueeze(-1).to(vd.dtype) * vd).sum(0))
        ctx.save_for_backward(q, k0, v0, kd, vd, mask, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k0, v0, kd, vd, mask, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        # With the merged output and log-sum-exp, the fused backward yields exactly the causal
        # block's share of the gradient of the joint softmax.
        dq, dk0, dv0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k0, v0, out, lse, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale)
        dkd = dvd = None
        if kd is not None:
            d = (q.unsqueeze(0) * kd).sum(-1).float() * ctx.scale
            p = (d - lse).exp()  # [k, B, h, T]
            delta = (dout * out).sum(-1).float()  # [B, h, T]
            dp = (dout.unsqueeze(0) * vd).sum(-1).float()
            ds = (p * (dp - delta) * ctx.scale).to(q.dtype).unsqueeze(-1)
            dq = dq + (ds * kd).sum(0)
            dkd = ds * q.unsqueeze(0)
            dvd = p.unsqueeze(-1).to(dout.dtype) * dout.unsqueeze(0)
        return dq, dk0, dv0, dkd, dvd, None, None, None


class DocLayout:
    """Regroup packed positions [B, *, T, d] into one document per row [D, *, Lmax, d] and back.

    Causal attention of a row that starts a document at 0 and pads after it is exact for every real
    position, so in this layout the fused kernel needs no mask and never computes across documents:
    cost D * Lmax^2 instead of B * T^2. Slots past a document's end hold copies of position 0;
    real queries never see them (they come later) and `back` never reads them.
    """

    def __init__(self, starts: torch.Tensor):
        b, t = starts.shape
        flat = starts.reshape(-1)
        doc = flat.long().cumsum(0) - 1  # document index of every flat position
        pos = torch.arange(b * t, device=starts.device)
        first = pos[flat]  # flat start of each document
        lengths = torch.diff(torch.cat((first, first.new_tensor([b * t]))))
        self.num_docs, self.max_len = int(first.numel()), int(lengths.max())
        slot = doc * self.max_len + (pos - first[doc])
        self.gather = torch.zeros(self.num_docs * self.max_len, dtype=torch.long, device=starts.device)
        self.gather[slot] = pos
        self.scatter = slot
        self.b, self.t = b, t

    @classmethod
    def maybe(cls, starts: torch.Tensor) -> "DocLayout | None":
        lay = cls(starts)
        # worth it when it clearly cuts the causal work (many or short documents)
        return lay if lay.num_docs * lay.max_len ** 2 < 0.75 * lay.b * lay.t ** 2 else None

    def to(self, x: torch.Tensor) -> torch.Tensor:
        h, d = x.shape[1], x.shape[-1]
        rows = x.transpose(1, 2).reshape(self.b * self.t, h, d)[self.gather]
        return rows.view(self.num_docs, self.max_len, h, d).transpose(1, 2)

    def back(self, y: torch.Tensor) -> torch.Tensor:
        h, d = y.shape[1], y.shape[-1]
        rows = y.transpose(1, 2).reshape(self.num_docs * self.max_len, h, d)[self.scatter]
        return rows.view(self.b, self.t, h, d).transpose(1, 2)


FLEX_BLOCK = 128  # flex attention's default block size; buckets are multiples of it
# device type -> torch.compile backend for flex attention; elsewhere it runs eagerly (CPU: forward
# only, unfused). Tests put a counting backend under "cpu" to count compilations.
COMPILE_FLEX_ON: dict[str, Any] = {"cuda": "inductor"}
FLEX_RECOMPILE_LIMIT = 64  # buckets x grad modes x dtypes stay far below this
_compiled_flex: dict[Any, Callable] = {}


def bucket_length(t: int) -> int:
    """Padded length for flex: a multiple of 128; above 1024 a multiple of 1/8 of its octave."""
    n = -(-max(t, 1) // FLEX_BLOCK) * FLEX_BLOCK
    if n <= 8 * FLEX_BLOCK:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def _flex_fn(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    backend = COMPILE_FLEX_ON.get(device_type)
    if backend is None:
        return flex_attention
    if backend not in _compiled_flex:
        _compiled_flex[backend] = torch.compile(flex_attention, dynamic=False, backend=backend)
    fn = _compiled_flex[backend]

    def call(*args, **kw):
        import torch._dynamo

        limit = max(FLEX_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return fn(*args, **kw)
    return call


def _run_starts(doc_ids: torch.Tensor, padded: int) -> torch.Tensor:
    """[B, padded]: first position of each position's run of equal doc id; bucket padding
    (positions >= T) is one run of its own."""
    b, t = doc_ids.shape
    pos = torch.arange(padded, device=doc_ids.device).expand(b, padded)
    new = torch.ones(b, padded, dtype=torch.bool, device=doc_ids.device)
    new[:, 1:t] = doc_ids[:, 1:] != doc_ids[:, :-1]
    new[:, t + 1:] = False
    return torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values


def _ordered(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [B, nq, nk] -> (count [B, 1, nq], ascending column indices [B, 1, nq, nk]) int32."""
    num = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[:, None], idx[:, None]


def flex_block_mask(starts: torch.Tensor, steps: int, kv_steps: int):
    """BlockMask of TTT step `steps - 1` over padded queries [B, P] and keys [B, P * kv_steps].

    Query block i sees step-0 key blocks j from starts[first query] // 128 to i (those in
    [ceil(starts[last query] / 128), i) fully), plus the diagonal block of steps 1..steps-1.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bsz, p = starts.shape
    nq, bs = p // FLEX_BLOCK, FLEX_BLOCK
    lo = (starts[:, ::bs] // bs)[..., None]  # [B, nq, 1]
    fs = (-(-starts[:, bs - 1::bs] // bs))[..., None]
    i = torch.arange(nq, device=starts.device)[:, None]
    j = torch.arange(nq * kv_steps, device=starts.device)[None, :]
    full = (j >= fs) & (j < i)
    diag = (j >= nq) & (j < nq * steps) & (j % nq == i)
    partial = ((j >= lo) & (j < fs)) | (j == i) | diag
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full.expand(bsz, -1, -1))
    limit = torch.tensor(p * steps, device=starts.device)

    def mask_mod(b, h, q_idx, kv_idx):
        causal = (kv_idx < p) & (kv_idx <= q_idx) & (kv_idx >= starts[b, q_idx])
        return causal | ((kv_idx >= p) & (kv_idx < limit) & (kv_idx % p == q_idx))

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(p, p * kv_steps))


class TTTAttention:
    """Per-batch attention state for one TTT unroll: the keys/values each step left, per layer.

    `attend(step)` returns the callable Eagle3Draft.run_layers expects:
    attend(layer, q [B,nh,T,hd], k [B,nkv,T,hd], v [B,nkv,T,hd]) -> [B,nh,T,hd].
    """

    def __init__(self, doc_ids: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 backend: str = "auto", single_doc_rows: bool | None = None, regroup: bool | None = None,
                 max_steps: int | None = None):
        """regroup: use DocLayout on the fused path (None: when it cuts the causal work).
        max_steps: the TTT length; flex then keeps one key length for every step (no recompiles)."""
        self.doc_ids = doc_ids = attach_trailing_padding(doc_ids)
        self.groups = num_heads // num_kv_heads
        self.scale = 1.0 / math.sqrt(head_dim)
        self.backend = resolve_backend(backend, doc_ids.device)
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.values: dict[int, list[torch.Tensor]] = {}
        b, t = doc_ids.shape
        self.T = t
        # Rows holding one document from position 0 need no mask (padding after it was attached
        # to it above). Otherwise the fused path may regroup positions one document per row.
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        if single_doc_rows is None:
            single_doc_rows = bool((starts.sum(1) == 1).all() and (doc_ids[:, 0] >= 0).all())
        self.plain_causal = single_doc_rows
        self.layout = None
        if self.backend == "sdpa" and not single_doc_rows and regroup is not False:
            self.layout = DocLayout(starts) if regroup else DocLayout.maybe(starts)
        self._bool_mask: torch.Tensor | None = None
        self._float_mask: torch.Tensor | None = None
        self._block_masks: dict[int, object] = {}
        self.max_steps = max_steps
        self.padded = bucket_length(t) if self.backend == "flex" else t
        self._padded_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._fused_kv: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    # ---- masks, built once per batch -----------------------------------------------------------
    def bool_mask(self) -> torch.Tensor:
        if self._bool_mask is None:
            self._bool_mask = causal_doc_mask(self.doc_ids)[:, None]  # [B,1,T,T]
        return self._bool_mask

    def float_mask(self, dtype: torch.dtype) -> torch.Tensor:
        if self._float_mask is None or self._float_mask.dtype != dtype:
            m = self.bool_mask()
            self._float_mask = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, _NEG_INF)
        return self._float_mask

    def block_mask(self, num_steps: int):
        """The flex BlockMask for a step that has seen `num_steps` steps (cached for all layers)."""
        if num_steps not in self._block_masks:
            kv_steps = max(self.max_steps or num_steps, num_steps)
            self._block_masks[num_steps] = flex_block_mask(_run_starts(self.doc_ids, self.padded),
                                                           num_steps, kv_steps)
        return self._block_masks[num_steps]

    # ---- attention ------------------------------------------------------------------------------
    def attend(self, step: int) -> Callable:
        def fn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            ks = self.keys.setdefault(layer, [])
            vs = self.values.setdefault(layer, [])
            if len(ks) != step:
                raise RuntimeError(f"TTT attention: layer {layer} has {len(ks)} cached steps at step {step}")
            ks.append(k)
            vs.append(v)
            return getattr(self, f"_{self.backend}")(q, ks, vs)
        return fn

    def _naive(self, q, ks, vs):
        t, steps = self.T, len(ks)
        eye = torch.eye(t, dtype=torch.bool, device=q.device).expand(q.shape[0], 1, t, t)
        mask = torch.cat([self.bool_mask()] + [eye] * (steps - 1), dim=-1)  # [B,1,T,T*steps]
        k = repeat_kv(torch.cat(ks, dim=2), self.groups)
        v = repeat_kv(torch.cat(vs, dim=2), self.groups)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        probs = scores.masked_fill(~mask, _NEG_INF).softmax(-1)
        return probs @ v

    def _eager(self, q, ks, vs):
        t = self.T
        k0, v0 = repeat_kv(ks[0], self.groups), repeat_kv(vs[0], self.groups)
        scores = (q @ k0.transpose(-1, -2)) * self.scale + self.float_mask(q.dtype)
        extra = [(q * repeat_kv(kj, self.groups)).sum(-1, keepdim=True) * self.scale for kj in ks[1:]]
        probs = torch.cat([scores, *extra], dim=-1).softmax(-1)
        out = probs[..., :t] @ v0
        for j, vj in enumerate(vs[1:]):
            out = out + probs[..., t + j, None] * repeat_kv(vj, self.groups)
        return out

    def _sdpa(self, q, ks, vs):
        # Each step's keys/values enter the fused layout once per layer (regrouped per document,
        # step 0 also repeated for GQA and made contiguous) and are reused by every later step.
        lay, prepared = self.layout, self._fused_kv.setdefault(id(ks), ([], []))
        for j in range(len(prepared[0]), len(ks)):
            k, v = (ks[j], vs[j]) if lay is None else (lay.to(ks[j]), lay.to(vs[j]))
            if j == 0:
                k, v = repeat_kv(k, self.groups).contiguous(), repeat_kv(v, self.groups).contiguous()
            else:
                k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
            prepared[0].append(k)
            prepared[1].append(v)
        if lay is not None:  # one document per row, causal without a mask, then back
            return lay.back(self._fused(lay.to(q), *prepared, True))
        return self._fused(q, *prepared, self.plain_causal)

    def _fused(self, q, ks, vs, plain_causal: bool):
        """ks/vs: prepared by _sdpa (heads repeated, step 0 contiguous)."""
        kd = vd = None
        if len(ks) > 1:
            kd, vd = torch.stack(ks[1:]), torch.stack(vs[1:])
        # is_causal stays on with a document mask too: the kernel then skips blocks above the diagonal
        mask = None if plain_causal else self.float_mask(q.dtype)
        return _CausalPlusDiagonal.apply(q.contiguous(), ks[0], vs[0], kd, vd, mask, True, self.scale)

    def _flex(self, q, ks, vs):
        steps, pad = len(ks), self.padded - self.T
        kv_steps = max(self.max_steps or steps, steps)
        pk = self._padded_kv.setdefault(id(ks), [])  # one list per layer: pad each step's keys once
        for k, v in zip(ks[len(pk):], vs[len(pk):]):
            pk.append((torch.nn.functional.pad(k, (0, 0, 0, pad)), torch.nn.functional.pad(v, (0, 0, 0, pad))))
        zeros = [torch.zeros_like(pk[0][0])] * (kv_steps - steps)  # steps not run yet: no block visits them
        k = torch.cat([x for x, _ in pk] + zeros, dim=2)
        v = torch.cat([y for _, y in pk] + zeros, dim=2)
        qp = torch.nn.functional.pad(q, (0, 0, 0, pad))
        out = _flex_fn(q.device.type)(qp, k, v, block_mask=self.block_mask(steps), scale=self.scale,
                                      enable_gqa=self.groups > 1)
        return out[:, :, :self.T]
