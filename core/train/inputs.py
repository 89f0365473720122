"""What a training run reads: the target, the data (online or offline), the draft vocab, the draft.

Online: tokenize the conversations with the target's chat template, build (or load) the draft vocab
from them, and run the frozen target inside each step (core.features.TargetFeatureExtractor).
Offline: read `eagle cache` output through core.cache.CacheReader; the vocab, aux layer ids and the
target's config come from the cache.

The draft's frozen `embed_tokens` in offline mode: the cache stores no weights of the target, so
only the embedding tensor is read, by name, from the target's safetensors (the cache records the
target folder; `--target` overrides it). No other target weight is loaded. The matrix is then
stored once in the run directory (embed_tokens.safetensors), so eval/export never need it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from core.data.identity import CACHE_PROMPTS, read_prompt_list
from core.errors import InputDataError, SettingsMismatchError, UsageError
from core.events import EventSink, Log
from core.settings import draft_vocab
from core.train.config import TrainConfig
from core.train.data import OfflineSource, OnlineSource, cache_lengths, split_indices

STAGE = "train"


def resolve_target(target: str, events: EventSink) -> Path:
    if target == "demo":
        from core.assets import demo_target

        return demo_target(events)
    p = Path(target).expanduser()
    if not (p / "config.json").exists():
        raise InputDataError("not a Hugging Face model folder (no config.json)", path=str(p))
    return p


@dataclass
class TrainInputs:
    train: Any  # OnlineSource | OfflineSource
    val: Any | None
    vocab: Any  # DraftVocab
    target: Path  # folder: config.json (+ the embedding tensor)
    aux_layer_ids: list[int]
    data_fingerprint: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the run manifest
    prompts: list[tuple[int, str]] | None = None  # (index, prompt sha256) of every sample; None: unknown


def _data_spec(cfg: TrainConfig, source: str) -> SimpleNamespace:
    return SimpleNamespace(data=source, split=cfg.data_split, messages_column=cfg.messages_column,
                           shuffle_seed=cfg.data_shuffle_seed, limit=cfg.data_limit,
                           strict=cfg.data_strict, exclude=cfg.data_exclude,
                           max_length=cfg.max_length)


def _tokenized(cfg: TrainConfig, source: str, tokenizer: Any, events: EventSink,
               prompts: list[tuple[int, str]] | None = None):
    from core.vocab import tokenize_dataset

    ids_of: dict[int, str] = {}
    samples, skipped = tokenize_dataset(_data_spec(cfg, source), tokenizer, events, stage=STAGE,
                                        prompt_ids=ids_of)
    if prompts is not None:
        prompts.extend((s[0], ids_of[s[0]]) for s in samples)
    if skipped:
        events(Log(stage=STAGE, level="warning",
                   message=f"{len(skipped)} conversation(s) of {source} skipped (e.g. "
                           f"{skipped[0]['reason']})"))
    ids = [torch.tensor(s[1], dtype=torch.long) for s in samples]
    masks = [torch.tensor(s[2], dtype=torch.bool) for s in samples]
    return ids, masks


def _vocab_online(cfg: TrainConfig, run_dir: Path, resumed: bool, pairs, tokens_hash: str,
                  tokenizer, target_vocab_size: int, events: EventSink):
    from core.vocab import build_vocab, load_vocab, tokenizer_hash

    from core.train.checkpoint import VOCAB_DIR

    tok_fp = tokenizer_hash(tokenizer)
    source = {"data": tokens_hash, "tokenizer": tok_fp, "dataset": cfg.data}
    run_vocab = run_dir / VOCAB_DIR
    if resumed and (run_vocab / "vocab.json").exists():
        # refuses (naming the fields) when the data or tokenizer changed since the run started
        return load_vocab(run_vocab, expect={**source, "target_vocab_size": target_vocab_size}), False
    if cfg.vocab is not None:
        want = {"tokenizer": tok_fp, "target_vocab_size": target_vocab_size,
                "draft_vocab_size": cfg.draft_vocab_size}
        vocab = load_vocab(cfg.vocab, expect=want)
        if vocab.source.get("data") != source["data"]:
            events(Log(stage=STAGE, level="warning",
                       message=f"draft vocab {cfg.vocab} was built from other data than --data"))
        return vocab, True
    size = draft_vocab(cfg.draft_vocab_size, target_vocab_size)
    return build_vocab(pairs, size, target_vocab_size, source=source), True


def load_online(cfg: TrainConfig, run_dir: Path, resumed: bool, device: torch.device,
                events: EventSink) -> tuple[TrainInputs, bool]:
    """(inputs, vocab_is_new). Loads the tokenizer and the full target (it runs in the step)."""
    from transformers import AutoConfig

    from core.features import TargetFeatureExtractor
    from core.tokenize import load_tokenizer
    from core.vocab import chat_template_hash, token_stream_hash, tokenizer_hash

    target = resolve_target(cfg.target, events)
    hf_cfg = AutoConfig.from_pretrained(str(target))
    max_pos = getattr(hf_cfg, "max_position_embeddings", None)
    if max_pos is not None and cfg.max_length > max_pos:
        raise UsageError(f"--max-length {cfg.max_length} exceeds the target's "
                         f"max_position_embeddings {max_pos}")
    tokenizer = load_tokenizer(str(target))
    prompts: list[tuple[int, str]] = []
    ids, masks = _tokenized(cfg, cfg.data, tokenizer, events, prompts)
    if cfg.val_data is not None:
        v_ids, v_masks = _tokenized(cfg, cfg.val_data, tokenizer, events, prompts)
        train_idx, val_idx = list(range(len(ids))), []
    else:
        train_idx, val_idx = split_indices(len(ids), cfg.val_fraction, cfg.seed)
        v_ids, v_masks = [ids[i] for i in val_idx], [masks[i] for i in val_idx]
    pairs = list(zip(ids, masks))
    tokens_hash = token_stream_hash(pairs)
    vocab, new_vocab = _vocab_online(cfg, run_dir, resumed, pairs, tokens_hash, tokenizer,
                                     int(hf_cfg.vocab_size), events)
    extractor = TargetFeatureExtractor(str(target), vocab, aux_layer_ids=cfg.aux_layer_ids,
                                       device=device, max_batch_tokens=cfg.max_tokens_per_batch)
    train = OnlineSource([ids[i] for i in train_idx], [masks[i] for i in train_idx], extractor)
    val = OnlineSource(v_ids, v_masks, extractor) if v_ids else None
    fp = {"tokens": tokens_hash, "tokenizer": tokenizer_hash(tokenizer),
          "train_samples": len(train), "val_samples": len(val) if val else 0}
    if cfg.val_data is not None:
        fp["val_tokens"] = token_stream_hash(list(zip(v_ids, v_masks)))
    extra = {"mode": "online", "target_info": extractor.target_info(),
             "chat_template_hash": chat_template_hash(tokenizer)}
    return TrainInputs(train, val, vocab, target, list(extractor.aux_layer_ids), fp, extra,
                       prompts), new_vocab


def load_offline(cfg: TrainConfig, events: EventSink) -> TrainInputs:
    """Features from an `eagle cache` folder; the target folder only for config + embeddings."""
    from core.cache import CacheReader

    reader = CacheReader(cfg.cache)
    info = reader.target_info
    target = Path(cfg.target or info.get("target_path") or "")
    if cfg.target is None and not (target / "config.json").exists():
        raise InputDataError(f"the cache's target folder {target} is gone; the draft needs the target's "
                             "input embeddings", path=cfg.cache,
                             hint="pass --target with the target model folder")
    target = resolve_target(str(target), events)
    lengths = cache_lengths(reader)
    if max(lengths) > cfg.max_length:
        events(Log(stage=STAGE, message=f"cache samples longer than --max-length {cfg.max_length} "
                                        "are truncated"))
    n = min(len(reader), cfg.data_limit or len(reader))  # --limit: the cache's first n samples
    if cfg.val_data is not None:
        raise UsageError("--val-data is for online training; offline, use --val-fraction "
                         "(or build a second cache and train with it as --cache)")
    train_idx, val_idx = split_indices(n, cfg.val_fraction, cfg.seed)
    train = OfflineSource(reader, train_idx, cfg.max_length, lengths)
    val = OfflineSource(reader, val_idx, cfg.max_length, lengths) if val_idx else None
    fp = {"cache_settings_hash": reader.manifest.settings_hash, "samples": n,
          "vocab": reader.vocab.fingerprint}
    extra = {"mode": "offline", "cache": str(Path(cfg.cache).resolve()),
             "target_info": {k: v for k, v in info.items() if k != "target_path"},
             "chat_template_hash": reader.manifest.settings.get("chat_template")}
    record = Path(cfg.cache) / CACHE_PROMPTS  # absent in caches written before it existed
    prompts = ([(r["index"], r["prompt_sha256"]) for r in read_prompt_list(record)][:n]
               if record.is_file() else None)
    return TrainInputs(train, val, reader.vocab, target, list(info["aux_layer_ids"]), fp, extra,
                       prompts)


def check_fingerprint(run_dir: Path, stored: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """--resume: the data the run was started on must be the data it continues with."""
    if stored is None:
        return
    from core.manifest import diff_settings

    diff = diff_settings(stored, now)
    if diff:
        raise SettingsMismatchError(str(run_dir), {f"data.{k}": v for k, v in diff.items()})


def build_draft(cfg: TrainConfig, inputs: TrainInputs):
    """A fresh draft (seeded init) with the target's frozen embeddings and the draft vocab."""
    from core.model import Eagle3Draft

    torch.manual_seed(cfg.seed)
    draft = Eagle3Draft.from_target(str(inputs.target), inputs.vocab,
                                    aux_layer_ids=inputs.aux_layer_ids, num_layers=cfg.num_layers)
    if cfg.head_init == "target":
        from core.model.init import init_head_from_target

        inputs.extra.update(init_head_from_target(draft, inputs.target, cfg.freeze_head))
    if cfg.init_from:
        from core.model.init import warm_start

        inputs.extra.update(warm_start(draft, cfg.init_from))
    return draft
