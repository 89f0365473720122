"""Read an offline cache: sample i -> float32 features, UNSHIFTED (index t describes position t).

`reader[i]` gives dense draft-vocab target rows; `reader.get(i, dense_targets=False)` keeps a top-k
cache's targets as (ids, renormalised probs) [T, k] (what training reads: the loss consumes them
directly, so no [T, Vd] row is ever built).

Shards are memory-mapped (safetensors `safe_open`), checked against the manifest's sha256 the
first time they are opened, and their tensors against the layout; any failure is a
CorruptDataError naming the file. The reader pickles without its open handles, so DataLoader
workers reopen shards themselves.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from core.cache import layout, quant
from core.cache.layout import CacheDims, StorageOptions
from core.cache.quant import fp8_dequantize, topk_expand
from core.errors import CorruptDataError, InputDataError, UsageError
from core.manifest import load_manifest, sha256_file

MAX_OPEN_SHARDS = 8


class CacheReader:
    def __init__(self, directory: str | Path, verify: bool = True, allow_incomplete: bool = False):
        from core.vocab import load_vocab

        self.dir = Path(directory)
        m = load_manifest(self.dir, kind="cache")
        if m is None:
            raise InputDataError("no offline cache here (manifest.json missing)", path=str(self.dir),
                                 hint="build one with `eagle cache`")
        if m.format_version != layout.FORMAT_VERSION:
            raise UsageError(f"{self.dir}: cache format version {m.format_version}; this version reads "
                             f"{layout.FORMAT_VERSION}", hint="rebuild the cache")
        if not m.complete and not allow_incomplete:
            raise UsageError(f"{self.dir}: the cache is incomplete", hint="finish it with `eagle cache ... --resume`")
        self.manifest = m
        self.verify = verify
        self.storage = StorageOptions(**m.settings["storage"])
        self.vocab = load_vocab(self.dir)
        if self.vocab.fingerprint != m.settings["vocab"]["fingerprint"]:
            raise CorruptDataError(f"{self.dir}: vocab.safetensors does not match the manifest's draft vocab")
        info = dict(m.extra.get("target") or {})
        if not info:
            raise CorruptDataError(f"{self.dir}: manifest has no target information")
        info["aux_layer_ids"] = list(m.settings["aux_layer_ids"])
        info["target_path"] = m.extra.get("target_path") or m.settings["target"].get("path")
        info["max_length"] = m.settings["max_length"]
        info["draft_vocab_size"] = self.vocab.draft_vocab_size
        self.target_info = info
        self.dims = CacheDims(int(info["hidden_size"]), self.vocab.draft_vocab_size)
        self.shards = sorted(m.shards, key=lambda s: s["file"])
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + int(s["samples"]))
        self._handles: OrderedDict[int, tuple[Any, torch.Tensor]] = OrderedDict()
        self._verified: set[int] = set()
        self._head = self._load_head() if self.storage.target_store == "hidden" else None

    # ---- metadata ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def lengths(self) -> list[int]:
        """Token count of every sample, in order (for length-bucketed batching without I/O)."""
        return [int(n) for s in self.shards for n in s["lengths"]]

    def target_config(self):
        """The target's Hugging Face config, as saved into the cache (no target folder needed)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.dir / "target_config.json"))

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_handles"] = OrderedDict()
        return d

    # ---- shards ------------------------------------------------------------------------------
    def _bad(self, file: str, why: str) -> CorruptDataError:
        return CorruptDataError(f"{self.dir / file}: {why}",
                                hint="delete the shard and re-run `eagle cache ... --resume` to rebuild it")

    def _load_head(self) -> dict[str, Any]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        rec = self.manifest.extra.get("head")
        if not rec:
            raise CorruptDataError(f"{self.dir}: the manifest records no head.safetensors for target_store 'hidden'")
        p = self.dir / rec["file"]
        if not p.exists():
            raise CorruptDataError(f"{p}: missing")
        if self.verify and sha256_file(p) != rec["sha256"]:
            raise self._bad(rec["file"], "checksum mismatch (truncated or modified)")
        try:
            t = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise self._bad(rec["file"], f"unreadable ({e})") from e
        return {"norm_weight": t["norm_weight"].float(), "lm_head_rows": t["lm_head_rows"].float(),
                "lm_head_bias": t.get("lm_head_bias"), "eps": float(rec["norm_eps"])}

    def _open(self, k: int):
        if k in self._handles:
            self._handles.move_to_end(k)
            return self._handles[k]
        from safetensors import SafetensorError, safe_open

        rec = self.shards[k]
        p = self.dir / rec["file"]
        if not p.exists():
            raise self._bad(rec["file"], "shard listed in the manifest is missing")
        if self.verify and k not in self._verified:
            if sha256_file(p) != rec["sha256"]:
                raise self._bad(rec["file"], "checksum mismatch (truncated or modified shard)")
            self._verified.add(k)
        try:
            f = safe_open(str(p), framework="pt")
            specs = layout.shard_tensor_specs(rec["lengths"], self.dims, self.storage)
            if set(f.keys()) != set(specs):
                raise self._bad(rec["file"], f"tensors {sorted(f.keys())} differ from the layout {sorted(specs)}")
            for name, (dt, shape) in specs.items():
                sl = f.get_slice(name)
                if list(sl.get_shape()) != list(shape):
                    raise self._bad(rec["file"], f"{name} has shape {sl.get_shape()}, expected {list(shape)}")
            offsets = f.get_tensor("offsets")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise self._bad(rec["file"], f"unreadable ({e})") from e
        expect = torch.tensor([0, *torch.tensor(rec["lengths"]).cumsum(0).tolist()], dtype=torch.int64)
        if not torch.equal(offsets, expect):
            raise self._bad(rec["file"], "offsets disagree with the manifest's sample lengths")
        self._handles[k] = (f, offsets)
        while len(self._handles) > MAX_OPEN_SHARDS:
            self._handles.popitem(last=False)
        return self._handles[k]

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (cache holds {len(self)})")
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def raw(self, i: int) -> dict[str, torch.Tensor]:
        """Sample i as stored (compact dtypes)."""
        k, j = self.locate(i)
        f, offsets = self._open(k)
        a, b = int(offsets[j]), int(offsets[j + 1])
        try:
            out = {name: f.get_slice(name)[a:b] for name in layout.token_tensor_specs(self.dims, self.storage)}
            out["sample_index"] = f.get_slice("sample_index")[j:j + 1]
        except Exception as e:  # a mapped file changed under us
            raise self._bad(self.shards[k]["file"], f"unreadable ({e})") from e
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """input_ids int64 [T], loss_mask bool [T], aux_hidden f32 [T, 3Ht], target_probs f32 [T, Vd],
        position_mask bool [T], sample_index int (position in the input dataset)."""
        return self.get(i)

    def get(self, i: int, dense_targets: bool = True) -> dict[str, torch.Tensor]:
        """reader[i]; with dense_targets=False a top-k cache gives target_topk_ids int64 [T, k] and
        target_topk_probs f32 [T, k] (each row renormalised to sum 1, as the dense row) instead."""
        r = self.raw(i)
        if self.storage.aux_dtype == "fp8":
            aux = fp8_dequantize(r["aux_fp8"], r["aux_scale"])
        else:
            aux = r["aux_hidden"].float()
        if self.storage.target_store == "probs":
            probs = r["target_probs"].float()
            probs = probs / probs.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        elif self.storage.target_store == "topk" and not dense_targets and topk_expand is quant.topk_expand:
            # (a swapped-in expansion, e.g. bench/cache_accept.py's, is honoured by the dense branch)
            v = r["topk_values"].float()
            probs = None
            sparse = {"target_topk_ids": r["topk_indices"].long(),
                      "target_topk_probs": v / v.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)}
        elif self.storage.target_store == "topk":
            probs = topk_expand(r["topk_values"], r["topk_indices"], self.dims.draft_vocab_size)
        else:
            from core.features import probs_from_final_hidden

            h = self._head
            probs = probs_from_final_hidden(r["final_hidden"], h["norm_weight"], h["eps"],
                                            h["lm_head_rows"], h["lm_head_bias"])
        out = {"input_ids": r["input_ids"].long(), "loss_mask": r["loss_mask"].to(torch.bool),
               "aux_hidden": aux, "position_mask": r["position_mask"].to(torch.bool),
               "sample_index": int(r["sample_index"][0])}
        if probs is None:
            out.update(sparse)
        else:
            out["target_probs"] = probs
        return out

    def verify_all(self) -> None:
        """Open (and checksum) every shard; raises CorruptDataError naming the first bad one."""
        for k in range(len(self.shards)):
            self._open(k)

