"""Shapes, dtypes and bytes of the offline cache: ONE source for the writer, reader and budget.

A shard is one safetensors file holding many variable-length samples concatenated along the
token axis, plus `offsets` [n+1] (sample i is rows offsets[i]:offsets[i+1]) and `sample_index`
[n] (the sample's position in the input dataset). Per token (Ht target hidden, Vd draft vocab):

  input_ids int32, loss_mask bool, position_mask bool
  aux      bf16|fp16 [3Ht]            or  fp8: aux_fp8 uint8 [3Ht] + aux_scale f32 [3] (per token and layer)
  target   probs:  target_probs bf16|fp16 [Vd]
           topk:   topk_values f16 [k] + topk_indices int16 (int32 when Vd > 32767) [k]
           hidden: final_hidden bf16|fp16 [Ht]  (norm weight + lm_head rows stored once: head.safetensors)

The writer checks every tensor it writes against `shard_tensor_specs`, and the budget sums the
same specs, so the estimate cannot drift from what is written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

from core.errors import UsageError

FORMAT_VERSION = 1
AUX_DTYPES = ("bf16", "fp16", "fp8")
TARGET_STORES = ("probs", "topk", "hidden")
TARGET_DTYPES = ("bf16", "fp16")
NUM_AUX = 3

# safetensors dtype names and element sizes
_ST = {"bf16": ("BF16", 2), "fp16": ("F16", 2), "f32": ("F32", 4), "i64": ("I64", 8),
       "i32": ("I32", 4), "i16": ("I16", 2), "u8": ("U8", 1), "bool": ("BOOL", 1)}


def torch_dtype(key: str):
    """The torch dtype of a layout dtype key (torch imported lazily: budget needs no torch)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "f32": torch.float32, "i64": torch.int64,
            "i32": torch.int32, "i16": torch.int16, "u8": torch.uint8, "bool": torch.bool}[key]

# One key only: safetensors writes metadata in hash-map order, and shards must be bitwise
# reproducible (kill -9 + --resume gives the same bytes as an uninterrupted run).
SHARD_METADATA = {"format": f"eagle-tui-cache/{FORMAT_VERSION}"}


@dataclass(frozen=True)
class StorageOptions:
    aux_dtype: str = "fp8"  # bf16 | fp16 | fp8 (e4m3, per-token-and-layer scales)
    target_store: str = "topk"  # probs | topk | hidden
    topk: int = 64  # k for target_store == "topk"
    target_dtype: str = "bf16"  # dtype of stored probs / final hidden state

    def validate(self, draft_vocab_size: int | None = None) -> "StorageOptions":
        for name, value, options in (("aux dtype", self.aux_dtype, AUX_DTYPES),
                                     ("target store", self.target_store, TARGET_STORES),
                                     ("target dtype", self.target_dtype, TARGET_DTYPES)):
            if value not in options:
                raise UsageError(f"{name} {value!r} is not one of {', '.join(options)}")
        if self.target_store == "topk":
            if self.topk < 1:
                raise UsageError(f"topk must be >= 1, got {self.topk}")
            if draft_vocab_size is not None and self.topk > draft_vocab_size:
                raise UsageError(f"topk {self.topk} exceeds the draft vocab size {draft_vocab_size}")
        return self

    @property
    def label(self) -> str:
        t = {"probs": f"probs-{self.target_dtype}", "topk": f"top{self.topk}",
             "hidden": f"hidden-{self.target_dtype}"}[self.target_store]
        return f"aux-{self.aux_dtype}+{t}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.target_store != "topk":
            d.pop("topk")
        if self.target_store == "topk":
            d.pop("target_dtype")
        return d


@dataclass(frozen=True)
class CacheDims:
    hidden_size: int  # Ht of the target
    draft_vocab_size: int  # Vd


def index_dtype(draft_vocab_size: int) -> str:
    return "i16" if draft_vocab_size <= 32767 else "i32"


def token_tensor_specs(dims: CacheDims, opts: StorageOptions) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Per-token tensors: name -> (dtype key, trailing shape)."""
    H, Vd = dims.hidden_size, dims.draft_vocab_size
    specs: dict[str, tuple[str, tuple[int, ...]]] = {
        "input_ids": ("i32", ()), "loss_mask": ("bool", ()), "position_mask": ("bool", ())}
    if opts.aux_dtype == "fp8":
        specs["aux_fp8"] = ("u8", (NUM_AUX * H,))
        specs["aux_scale"] = ("f32", (NUM_AUX,))
    else:
        specs["aux_hidden"] = (opts.aux_dtype, (NUM_AUX * H,))
    if opts.target_store == "probs":
        specs["target_probs"] = (opts.target_dtype, (Vd,))
    elif opts.target_store == "topk":
        specs["topk_values"] = ("fp16", (opts.topk,))
        specs["topk_indices"] = (index_dtype(Vd), (opts.topk,))
    else:
        specs["final_hidden"] = (opts.target_dtype, (H,))
    return specs


def shard_tensor_specs(lengths: Sequence[int], dims: CacheDims, opts: StorageOptions
                       ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of a shard holding samples of these lengths: name -> (dtype key, shape)."""
    total = int(sum(lengths))
    specs = {k: (dt, (total, *shape)) for k, (dt, shape) in token_tensor_specs(dims, opts).items()}
    specs["offsets"] = ("i64", (len(lengths) + 1,))
    specs["sample_index"] = ("i64", (len(lengths),))
    return specs


def tensor_bytes(dtype: str, shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * _ST[dtype][1]


def bytes_per_token(dims: CacheDims, opts: StorageOptions) -> int:
    return sum(tensor_bytes(dt, shape) for dt, shape in token_tensor_specs(dims, opts).values())


PER_SAMPLE_FIXED_BYTES = 16  # one offsets entry + one sample_index entry


def safetensors_header_bytes(specs: dict[str, tuple[str, tuple[int, ...]]],
                             metadata: dict[str, str] | None = None) -> int:
    """Size of a safetensors header (8-byte length + JSON padded to 8 bytes) for these tensors."""
    header: dict = {"__metadata__": metadata or {}} if metadata else {}
    offset = 0
    for name in sorted(specs):
        dt, shape = specs[name]
        nbytes = tensor_bytes(dt, shape)
        header[name] = {"dtype": _ST[dt][0], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    n = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + n + (-n % 8)


def shard_file_bytes(lengths: Sequence[int], dims: CacheDims, opts: StorageOptions) -> int:
    """Exact-to-a-few-bytes size of the shard file the writer produces for these samples."""
    specs = shard_tensor_specs(lengths, dims, opts)
    data = sum(tensor_bytes(dt, shape) for dt, shape in specs.values())
    return data + safetensors_header_bytes(specs, SHARD_METADATA)


def head_tensor_specs(dims: CacheDims, opts: StorageOptions) -> dict[str, tuple[str, tuple[int, ...]]]:
    """head.safetensors (hidden mode only): norm weight f32 [Ht] + lm_head rows [Vd, Ht]."""
    if opts.target_store != "hidden":
        return {}
    return {"norm_weight": ("f32", (dims.hidden_size,)),
            "lm_head_rows": (opts.target_dtype, (dims.draft_vocab_size, dims.hidden_size))}


def head_file_bytes(dims: CacheDims, opts: StorageOptions) -> int:
    specs = head_tensor_specs(dims, opts)
    if not specs:
        return 0
    return sum(tensor_bytes(dt, s) for dt, s in specs.values()) + safetensors_header_bytes(specs)


def vocab_file_bytes(target_vocab_size: int, draft_vocab_size: int) -> int:
    """vocab.safetensors: d2t, selected int64 [Vd]; t2d bool [V]; counts int64 [V]."""
    specs = {"d2t": ("i64", (draft_vocab_size,)), "selected": ("i64", (draft_vocab_size,)),
             "t2d": ("bool", (target_vocab_size,)), "counts": ("i64", (target_vocab_size,))}
    return (sum(tensor_bytes(dt, s) for dt, s in specs.values())
            + safetensors_header_bytes(specs, {"fingerprint": "0" * 16}))


def shard_groups(num_samples: int, shard_size: int) -> list[range]:
    """Sample positions of each shard, in order."""
    return [range(i, min(i + shard_size, num_samples)) for i in range(0, num_samples, shard_size)]


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.safetensors"
