"""The draft vocabulary (eagle3-reference.md section 3).

Count target token ids under the loss mask, keep the `Vd` most frequent (ties: lower id first),
pad with the lowest unused ids when fewer than `Vd` distinct ids occur, sort ascending, and emit
`d2t[i] = selected[i] - i` (int64) and `t2d = isin(arange(V), selected)` (bool).

A saved vocabulary carries the fingerprint of what it was built from (token stream, tokenizer,
sizes); `load_vocab(..., expect=...)` refuses to reuse it when any of those changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from core.errors import CorruptDataError, InputDataError, SettingsMismatchError, UsageError
from core.manifest import atomic_path, canonical_json, diff_settings, settings_hash, write_json_atomic
from core.vocab_config import VocabConfig

VOCAB_TENSORS = "vocab.safetensors"
VOCAB_META = "vocab.json"
VOCAB_FORMAT = 1
# Fields of `source` that decide the content; others (e.g. the dataset's path) are informational.
FINGERPRINT_FIELDS = ("data", "tokenizer", "draft_vocab_size", "target_vocab_size")


@dataclass
class DraftVocab:
    selected: torch.Tensor  # int64 [Vd], ascending target ids
    d2t: torch.Tensor  # int64 [Vd]: target_id = draft_id + d2t[draft_id]
    t2d: torch.Tensor  # bool [V]
    counts: torch.Tensor  # int64 [V]: supervised occurrences of each target id
    coverage: float  # share of supervised tokens whose id is in the draft vocab
    target_vocab_size: int
    source: dict[str, Any] = field(default_factory=dict)  # what it was built from

    @property
    def draft_vocab_size(self) -> int:
        return int(self.selected.numel())

    @property
    def fingerprint(self) -> str:
        return settings_hash({k: self.source.get(k) for k in FINGERPRINT_FIELDS})

    def target_to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of `target_ids`; -1 where a target id is outside the draft vocab."""
        target_ids = torch.as_tensor(target_ids, dtype=torch.long)
        pos = torch.searchsorted(self.selected, target_ids.clamp(0, self.target_vocab_size - 1))
        pos = pos.clamp(max=self.draft_vocab_size - 1)
        hit = self.selected[pos] == target_ids
        return torch.where(hit, pos, torch.full_like(pos, -1))

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        draft_ids = torch.as_tensor(draft_ids, dtype=torch.long)
        return draft_ids + self.d2t[draft_ids]

    def metadata(self) -> dict[str, Any]:
        return {"format_version": VOCAB_FORMAT, "target_vocab_size": self.target_vocab_size,
                "draft_vocab_size": self.draft_vocab_size, "coverage": self.coverage,
                "supervised_tokens": int(self.counts.sum()), "fingerprint": self.fingerprint,
                "source": self.source}

    def save(self, directory: str | Path, npy: bool = False) -> Path:
        """Write vocab.safetensors (d2t, t2d, selected, counts) + vocab.json; `npy` adds d2t.npy, t2d.npy."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"d2t": self.d2t.contiguous(), "t2d": self.t2d.contiguous(),
                   "selected": self.selected.contiguous(), "counts": self.counts.contiguous()}
        with atomic_path(d / VOCAB_TENSORS) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": self.fingerprint})
        if npy:
            import numpy as np

            for name in ("d2t", "t2d"):
                with atomic_path(d / f"{name}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, tensors[name].numpy())
        write_json_atomic(d / VOCAB_META, self.metadata())
        return d


def count_tokens(samples: Iterable[tuple[Sequence[int], Sequence[int]]], target_vocab_size: int,
                 where: str = "dataset") -> torch.Tensor:
    """Occurrences of each target id where loss_mask == 1, over (input_ids, loss_mask) pairs."""
    counts = torch.zeros(target_vocab_size, dtype=torch.long)
    for row, (ids, mask) in enumerate(samples):
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        mask_t = torch.as_tensor(mask).bool()
        if ids_t.shape != mask_t.shape:
            raise InputDataError(f"input_ids ({ids_t.numel()}) and loss_mask ({mask_t.numel()}) "
                                 "differ in length", path=where, row=row)
        sup = ids_t[mask_t]
        if sup.numel() and (int(sup.max()) >= target_vocab_size or int(sup.min()) < 0):
            raise InputDataError(f"token id {int(sup.max())} is outside the target vocab "
                                 f"(size {target_vocab_size})", path=where, row=row,
                                 hint="the tokenizer does not match the target model")
        counts += torch.bincount(sup, minlength=target_vocab_size)
    return counts


def token_stream_hash(samples: Iterable[tuple[Sequence[int], Sequence[int]]]) -> str:
    """A hash of the tokenized dataset (ids and masks): changes with data, tokenizer or template."""
    h = hashlib.sha256()
    for ids, mask in samples:
        h.update(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
        h.update(torch.as_tensor(mask, dtype=torch.uint8).numpy().tobytes())
        h.update(b";")
    return h.hexdigest()[:16]


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of a tokenizer's vocabulary, special tokens and chat template."""
    parts = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
             "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
             "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:16]


def chat_template_hash(tokenizer: Any) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    return None if t is None else hashlib.sha256(str(t).encode()).hexdigest()[:16]


def build_vocab(counts_or_samples: torch.Tensor | Iterable[tuple[Sequence[int], Sequence[int]]],
                draft_vocab_size: int, target_vocab_size: int | None = None,
                source: dict[str, Any] | None = None) -> DraftVocab:
    """Select the draft vocab from token counts [V] or from (input_ids, loss_mask) samples."""
    if isinstance(counts_or_samples, torch.Tensor):
        counts = counts_or_samples.to(torch.long).flatten()
        if target_vocab_size is None:
            target_vocab_size = counts.numel()
        if counts.numel() != target_vocab_size:
            raise UsageError(f"token counts cover {counts.numel()} ids but the target vocab has "
                             f"{target_vocab_size}", hint="use counts made with this target's tokenizer")
        if bool((counts < 0).any()):
            raise UsageError("token counts must be non-negative")
    else:
        if target_vocab_size is None:
            raise UsageError("build_vocab from samples needs target_vocab_size")
        counts = count_tokens(counts_or_samples, target_vocab_size)
    if not 1 <= draft_vocab_size <= target_vocab_size:
        raise UsageError(f"draft vocab size {draft_vocab_size} must be in [1, {target_vocab_size}] "
                         "(the target vocab size)")
    total = int(counts.sum())
    if total == 0:
        raise InputDataError("no supervised tokens (loss_mask is 0 everywhere)",
                             hint="check the dataset has assistant turns")
    # Stable descending sort: equal counts keep ascending id order, so ties go to the lower id
    # and, after every seen id, the lowest unused ids fill the remaining slots.
    order = torch.sort(counts, descending=True, stable=True).indices
    selected = torch.sort(order[:draft_vocab_size]).values
    d2t = selected - torch.arange(draft_vocab_size, dtype=torch.long)
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[selected] = True
    coverage = float(counts[selected].sum()) / total
    src = dict(source or {})
    src.update(draft_vocab_size=draft_vocab_size, target_vocab_size=target_vocab_size)
    return DraftVocab(selected=selected, d2t=d2t, t2d=t2d, counts=counts, coverage=coverage,
                      target_vocab_size=target_vocab_size, source=src)


def load_vocab(directory: str | Path, expect: dict[str, Any] | None = None) -> DraftVocab:
    """Load a saved vocab; with `expect` (a source dict), refuse one built from other inputs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    meta_p, tens_p = d / VOCAB_META, d / VOCAB_TENSORS
    for p in (meta_p, tens_p):
        if not p.exists():
            raise InputDataError("draft vocab file not found", path=str(p),
                                 hint="build one with `eagle vocab`")
    try:
        meta = json.loads(meta_p.read_text())
        t = load_file(str(tens_p))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CorruptDataError(f"{d}: draft vocab unreadable ({e})") from e
    try:
        v = DraftVocab(selected=t["selected"], d2t=t["d2t"], t2d=t["t2d"], counts=t["counts"],
                       coverage=float(meta["coverage"]),
                       target_vocab_size=int(meta["target_vocab_size"]), source=meta.get("source", {}))
    except KeyError as e:
        raise CorruptDataError(f"{d}: draft vocab lacks {e}") from e
    ok = (v.t2d.numel() == v.target_vocab_size and int(v.t2d.sum()) == v.draft_vocab_size
          and torch.equal(v.selected + 0, torch.arange(v.draft_vocab_size) + v.d2t)
          and bool((v.selected[1:] > v.selected[:-1]).all()))
    if not ok or meta.get("fingerprint") != v.fingerprint:
        raise CorruptDataError(f"{d}: draft vocab is inconsistent (d2t/t2d/selected disagree)")
    if expect is not None:
        want = {k: expect.get(k) for k in FINGERPRINT_FIELDS if expect.get(k) is not None}
        have = {k: v.source.get(k) for k in want}
        diff = diff_settings(have, want)
        if diff:
            raise SettingsMismatchError(f"draft vocab {d}", diff)
    return v


def load_token_counts(path: str | Path, target_vocab_size: int | None = None) -> torch.Tensor:
    """A saved token-frequency file: .safetensors ('counts'), .npy ([V]), or .json (list or {id: n}).

    Arrays must cover exactly the target vocab (checked by `build_vocab`); an {id: count} object
    is sparse, so it is padded to `target_vocab_size` (ids past it are refused).
    """
    p = Path(path)
    if not p.exists():
        raise InputDataError("token-frequency file not found", path=str(p))
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            t = load_file(str(p))
            if "counts" not in t:
                raise InputDataError(f"no 'counts' tensor (has {sorted(t)})", path=str(p))
            return t["counts"].to(torch.long).flatten()
        if p.suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(p, allow_pickle=False)).to(torch.long).flatten()
        if p.suffix == ".json":
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                data = data.get("counts", data)
            if isinstance(data, list):
                return torch.tensor(data, dtype=torch.long)
            if isinstance(data, dict):
                ids = {int(k): int(n) for k, n in data.items()}
                size = max(ids) + 1 if ids else 0
                if target_vocab_size is not None:
                    if size > target_vocab_size:
                        raise InputDataError(f"token id {size - 1} is outside the target vocab "
                                             f"(size {target_vocab_size})", path=str(p))
                    size = target_vocab_size
                counts = torch.zeros(size, dtype=torch.long)
                for k, n in ids.items():
                    counts[k] = n
                return counts
            raise InputDataError("expected a list of counts or an {id: count} object", path=str(p))
    except InputDataError:
        raise
    except Exception as e:  # malformed content of any of the formats
        raise InputDataError(f"cannot read token counts ({type(e).__name__}: {e})", path=str(p)) from e
    raise InputDataError("unknown token-frequency format (use .safetensors, .npy or .json)", path=str(p))


# ---- from a dataset: the `eagle vocab` stage -----------------------------------------------------
def tokenize_dataset(spec: Any, tokenizer: Any, events: Any = None, stage: str = "vocab",
                     prompt_ids: dict[int, str] | None = None,
                     ) -> tuple[list[tuple[int, list[int], list[int]]], list[dict[str, Any]]]:
    """(index, input_ids, loss_mask) of each usable conversation, and the skipped ones with reasons.

    `spec` has the dataset fields of CacheConfig / VocabConfig (data, split, messages_column,
    shuffle_seed, limit, strict, max_length, and optionally exclude). Conversations without
    supervised tokens (within max_length) or that the chat template cannot render are skipped and
    reported, not fatal. `prompt_ids`, when given, receives index -> prompt sha256 of every kept
    sample (the record of which conversations trained a draft).
    """
    from core.data import DataSpec, load_conversations, prompt_sha256
    from core.events import NullSink, SampleFailed
    from core.tokenize import ChatTemplateError, template_markers, tokenize_conversation

    events = events or NullSink()
    source = spec.data
    if source == "demo":
        from core.assets import demo_dataset

        source = str(demo_dataset(events=events))
    convs, _report = load_conversations(
        DataSpec(source=source, split=spec.split, messages_column=spec.messages_column,
                 shuffle_seed=spec.shuffle_seed, limit=spec.limit, strict=spec.strict,
                 exclude=getattr(spec, "exclude", None)), events=events)
    template_markers(tokenizer)  # a template that cannot work fails once, not per sample
    samples, skipped = [], []
    for conv in convs:
        try:
            tc = tokenize_conversation(tokenizer, conv.messages, spec.max_length)
        except ChatTemplateError as e:
            skipped.append({"index": conv.index, "reason": f"chat template: {e}"})
            continue
        if len(tc.input_ids) < 2:
            skipped.append({"index": conv.index, "reason": "fewer than 2 tokens"})
        elif sum(tc.loss_mask) == 0:
            skipped.append({"index": conv.index, "reason": "no supervised (assistant) tokens"
                            + (" within max_length" if len(tc.input_ids) >= spec.max_length else "")})
        else:
            samples.append((conv.index, list(tc.input_ids), list(tc.loss_mask)))
            if prompt_ids is not None:
                prompt_ids[conv.index] = prompt_sha256(conv.messages)
    for s in skipped:
        events(SampleFailed(stage=stage, index=s["index"], reason=s["reason"]))
    if not samples:
        raise InputDataError(f"no usable conversations ({len(skipped)} skipped"
                             + (f", e.g. {skipped[0]['reason']})" if skipped else ")"), path=spec.data)
    return samples, skipped


def make_vocab(cfg: VocabConfig, events: Any = None) -> DraftVocab:
    """Build a draft vocab from a dataset or a token-frequency file and write it to cfg.output_dir:
    vocab.safetensors (d2t, t2d, selected, counts), d2t.npy, t2d.npy, vocab.json, manifest.json."""
    from core.events import NullSink, StageFinished, StageStarted
    from core.manifest import prepare_output_dir, sha256_file
    from core.settings import default_draft_vocab

    events = events or NullSink()
    cfg.validate()
    target = Path(cfg.target)
    if cfg.target == "demo":
        from core.assets import demo_target

        target = demo_target(events)
    try:
        target_vocab_size = int(json.loads((target / "config.json").read_text())["vocab_size"])
    except (KeyError, ValueError) as e:
        raise InputDataError(f"config.json has no usable vocab_size ({e})", path=str(target)) from e
    draft_vocab_size = cfg.draft_vocab_size or default_draft_vocab(target_vocab_size)
    events(StageStarted(stage="vocab", unit="samples", settings={"draft_vocab_size": draft_vocab_size}))
    if cfg.token_freq is not None:
        counts = load_token_counts(cfg.token_freq, target_vocab_size)
        if counts.numel() != target_vocab_size:
            raise InputDataError(f"holds counts for {counts.numel()} ids but the target vocab has "
                                 f"{target_vocab_size}", path=cfg.token_freq,
                                 hint="use counts made with this target's tokenizer")
        source = {"data": "counts:" + sha256_file(cfg.token_freq)[:16], "token_freq": cfg.token_freq}
        tok_fp = None
        samples = None
    else:
        from core.tokenize import load_tokenizer

        tokenizer = load_tokenizer(str(target))
        tok_fp = tokenizer_hash(tokenizer)
        samples, skipped = tokenize_dataset(cfg, tokenizer, events)
        pairs = [(ids, mask) for _, ids, mask in samples]
        counts = count_tokens(pairs, target_vocab_size, where=cfg.data or "dataset")
        source = {"data": token_stream_hash(pairs), "dataset": cfg.data, "skipped": len(skipped),
                  "samples": len(samples), "max_length": cfg.max_length}
    if tok_fp is None:
        from core.tokenize import load_tokenizer

        tok_fp = tokenizer_hash(load_tokenizer(str(target)))
    source["tokenizer"] = tok_fp
    vocab = build_vocab(counts, draft_vocab_size, target_vocab_size, source=source)
    settings = {"fingerprint": vocab.fingerprint, **{k: vocab.source.get(k) for k in FINGERPRINT_FIELDS}}
    manifest, _resumed = prepare_output_dir(cfg.output_dir, "vocab", VOCAB_FORMAT, settings, cfg.resume)
    vocab.save(cfg.output_dir, npy=True)
    manifest.extra.update({"coverage": vocab.coverage, "target": str(target)})
    manifest.complete = True
    manifest.save(cfg.output_dir)
    events(StageFinished(stage="vocab", summary={
        "output_dir": cfg.output_dir, "draft_vocab_size": vocab.draft_vocab_size,
        "target_vocab_size": target_vocab_size, "coverage": round(vocab.coverage, 6),
        "supervised_tokens": int(counts.sum()), "distinct_tokens": int((counts > 0).sum()),
        "samples": len(samples) if samples is not None else None}))
    return vocab
