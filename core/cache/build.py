"""`build_cache`: dataset -> tokenized samples -> draft vocab -> sharded target features on disk.

Everything that can be checked is checked before the target is loaded (config, paths, aux layer
ids against the target's config, the dataset, the output directory's refusal rules). Shards are
split across `nproc` processes (one per GPU); only this process writes the manifest.
"""

from __future__ import annotations

import json
import os
import platform
import queue as queue_mod
import sys
import time
from pathlib import Path
from typing import Any

from core.cache import layout
from core.cache.config import CacheConfig, CacheResult
from core.cache.writer import ShardJob, WorkerJob, run_worker, worker_main
from core.data.identity import CACHE_PROMPTS, write_prompt_list
from core.errors import CorruptDataError, EagleError, InputDataError, UsageError
from core.events import EventSink, Log, NullSink, Progress, RateMeter, ShardDone, StageFinished, StageStarted
from core.manifest import MANIFEST, prepare_output_dir, read_json, sha256_file, target_fingerprint, write_bytes_atomic

STAGE = "cache"
TARGET_CONFIG = "target_config.json"
FAILURES = "failures.jsonl"


def resolve_target(target: str, events: EventSink | None = None) -> Path:
    if target == "demo":
        from core.assets import demo_target

        return demo_target(events)
    p = Path(target)
    if not (p / "config.json").exists():
        raise InputDataError("not a Hugging Face model folder (no config.json)", path=str(p))
    return p


def _keep_legacy_paths(out: Path, settings: dict[str, Any], resume: bool) -> None:
    """Older caches kept the target's path and the dataset's among their settings; the same model
    or the same conversations found elsewhere (another EAGLE_CACHE_DIR, a moved file) must still
    resume them."""
    old = read_json(out / MANIFEST) if resume and (out / MANIFEST).exists() else {}
    for section, path_key in (("target", "path"), ("data", "source")):
        recorded = (old.get("settings") or {}).get(section) or {}
        if path_key in recorded and {k: v for k, v in recorded.items() if k != path_key} == settings[section]:
            settings[section] = recorded


def get_vocab(cfg: CacheConfig, samples, tokens_hash: str, tokenizer_fp: str, vocab_size: int,
              events: EventSink):
    """The draft vocab: built from these samples, or a saved one checked against tokenizer and sizes."""
    from core.settings import default_draft_vocab
    from core.vocab import build_vocab, count_tokens, load_vocab

    pairs = [(ids, mask) for _, ids, mask in samples]
    source = {"data": tokens_hash, "tokenizer": tokenizer_fp, "dataset": cfg.data}
    counts = count_tokens(pairs, vocab_size, where=cfg.data)
    if cfg.vocab is None:
        size = cfg.draft_vocab_size or default_draft_vocab(vocab_size)
        return build_vocab(counts, size, vocab_size, source=source)
    expect = {"tokenizer": tokenizer_fp, "target_vocab_size": vocab_size}
    if cfg.draft_vocab_size is not None:  # not given: the saved vocab's size
        expect["draft_vocab_size"] = cfg.draft_vocab_size
    vocab = load_vocab(cfg.vocab, expect=expect)
    if vocab.source.get("data") != source["data"]:
        cov = float(counts[vocab.selected].sum()) / max(1, int(counts.sum()))
        events(Log(stage=STAGE, level="warning", message=f"draft vocab {cfg.vocab} was built from other "
                   f"data; it covers {cov:.1%} of this dataset's supervised tokens"))
    return vocab


def provenance(cfg: CacheConfig, device: str) -> dict[str, Any]:
    import safetensors
    import torch
    import transformers

    import core

    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(0)} x{torch.cuda.device_count()})"
    return {"command": cfg.command or " ".join(sys.argv), "device": dev, "nproc": cfg.nproc,
            "device_map": cfg.device_map, "host": platform.node(), "python": platform.python_version(),
            "versions": {"eagle-tui": core.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "safetensors": safetensors.__version__},
            **cfg.extra_provenance}


def build_cache(cfg: CacheConfig, events: EventSink | None = None) -> CacheResult:
    """Write (or resume) an offline feature cache; returns what is on disk at the end."""
    import torch
    from transformers import AutoConfig

    from core.features import resolve_aux_layer_ids
    from core.tokenize import load_tokenizer
    from core.vocab import chat_template_hash, tokenize_dataset, tokenizer_hash

    events = events or NullSink()
    t_start = time.monotonic()
    cfg.validate()
    target = resolve_target(cfg.target, events)
    hf_cfg = AutoConfig.from_pretrained(str(target))
    num_layers, vocab_size = int(hf_cfg.num_hidden_layers), int(hf_cfg.vocab_size)
    aux_ids = resolve_aux_layer_ids(num_layers, cfg.aux_layer_ids)
    max_pos = getattr(hf_cfg, "max_position_embeddings", None)
    if max_pos is not None and cfg.max_length > max_pos:
        raise UsageError(f"max length {cfg.max_length} exceeds the target's max_position_embeddings {max_pos}")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {device}: CUDA is not available", hint="use --device cpu")
        if cfg.nproc > torch.cuda.device_count():
            raise UsageError(f"nproc {cfg.nproc} exceeds the {torch.cuda.device_count()} visible GPUs")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"

    tokenizer = load_tokenizer(str(target))
    tok_fp = tokenizer_hash(tokenizer)
    prompt_ids: dict[int, str] = {}
    samples, skipped = tokenize_dataset(cfg, tokenizer, events, stage=STAGE, prompt_ids=prompt_ids)
    tokens_hash = _tokens_hash(samples)
    vocab = get_vocab(cfg, samples, tokens_hash, tok_fp, vocab_size, events)
    opts = cfg.storage.validate(vocab.draft_vocab_size)
    settings = {
        "target": target_fingerprint(target),  # by content: a moved model folder keeps its cache
        "aux_layer_ids": aux_ids, "tokenizer": tok_fp, "chat_template": chat_template_hash(tokenizer),
        # the conversations by their tokens' hash: a moved or renamed dataset file keeps its cache
        "data": {"split": cfg.split, "messages_column": cfg.messages_column,
                 "shuffle_seed": cfg.shuffle_seed, "limit": cfg.limit, "tokens": tokens_hash},
        "max_length": cfg.max_length, "vocab": {"fingerprint": vocab.fingerprint,
                                                "draft_vocab_size": vocab.draft_vocab_size},
        "storage": opts.to_dict(), "shard_size": cfg.shard_size, "batch_tokens": cfg.batch_tokens,
        "compute_dtype": dtype,
    }
    out = Path(cfg.output_dir)
    from core import budget, disk  # the shards' exact size against the free space, before any write

    est = budget.estimate_cache_bytes(layout.CacheDims(int(hf_cfg.get_text_config().hidden_size), vocab.draft_vocab_size),
                                      opts, [len(s[1]) for s in samples], cfg.shard_size, vocab_size)
    disk.check_free(out, est.total_bytes - disk.bytes_under(out), f"the cache ({len(samples)} samples)")
    _keep_legacy_paths(out, settings, cfg.resume)
    manifest, resumed = prepare_output_dir(out, "cache", layout.FORMAT_VERSION, settings, cfg.resume)
    manifest.extra["target_path"] = str(Path(target).resolve())
    manifest.extra["data_source"] = cfg.data
    if not resumed or not (out / "vocab.json").exists():
        vocab.save(out)
        write_bytes_atomic(out / TARGET_CONFIG, (target / "config.json").read_bytes())
        write_bytes_atomic(out / FAILURES, "".join(json.dumps(s) + "\n" for s in skipped).encode())
    if not (out / CACHE_PROMPTS).exists():  # which conversations (a run records it as trained_on)
        write_prompt_list(out / CACHE_PROMPTS, [(s[0], prompt_ids[s[0]]) for s in samples])
    manifest.extra.update({"vocab": {"dir": ".", "coverage": vocab.coverage, "fingerprint": vocab.fingerprint},
                           "skipped": len(skipped), "failures_file": FAILURES,
                           "num_samples": len(samples), "provenance": provenance(cfg, device)})

    for stale in out.glob(".*.tmp"):  # temporaries of a killed run (atomic writes never finished)
        stale.unlink(missing_ok=True)
    groups = layout.shard_groups(len(samples), cfg.shard_size)
    done = set()
    for rec in list(manifest.shards):
        try:
            manifest.verify_shard(out, rec)
            done.add(rec["file"])
        except CorruptDataError as e:
            events(Log(stage=STAGE, level="warning", message=f"{e}; rewriting it"))
            manifest.shards = [s for s in manifest.shards if s["file"] != rec["file"]]
    need_head = opts.target_store == "hidden" and not _head_ok(out, manifest)
    todo = [k for k in range(len(groups)) if layout.shard_name(k) not in done]
    manifest.complete = False
    manifest.save(out)

    samples_done = sum(s["samples"] for s in manifest.shards)
    events(StageStarted(stage=STAGE, total=len(samples), unit="samples",
                        settings={"output_dir": str(out), "storage": opts.label, "shards": len(groups),
                                  "resumed": resumed, "shards_todo": len(todo)}))
    meter = RateMeter(total=len(samples), already_done=samples_done)
    state = {"samples": samples_done, "tokens": 0, "written": 0}

    def on_report(msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "ready" and "target" not in manifest.extra:
            manifest.extra["target"] = msg["target_info"]
            manifest.save(out)
        elif kind == "head":
            manifest.extra["head"] = {"file": msg["file"], "sha256": sha256_file(out / msg["file"]),
                                      "norm_eps": msg["norm_eps"]}
            manifest.save(out)
        elif kind == "batch":
            state["samples"] += msg["samples"]
            state["tokens"] += msg["tokens"]
            el = time.monotonic() - meter.start
            events(Progress(stage=STAGE, done=state["samples"], total=len(samples), unit="samples",
                            rate=meter.rate(state["samples"]), eta_s=meter.eta(state["samples"]),
                            extra={"tokens_per_s": round(state["tokens"] / el, 1) if el > 0 else None}))
        elif kind == "shard":
            manifest.add_shard(out, msg["file"], msg["samples"], tokens=msg["tokens"], lengths=msg["lengths"])
            manifest.save(out)
            state["written"] += 1
            events(ShardDone(stage=STAGE, shard=msg["shard"], samples=msg["samples"],
                             path=str(out / msg["file"]), shards_done=len(manifest.shards),
                             shards_total=len(groups)))

    if todo or need_head:
        jobs = _make_jobs(cfg, target, vocab, aux_ids, opts, samples, groups, todo, need_head, device, dtype)
        if len(jobs) == 1:
            run_worker(jobs[0], on_report)
        else:
            _run_processes(jobs, on_report)

    missing = [layout.shard_name(k) for k in range(len(groups))
               if layout.shard_name(k) not in {s["file"] for s in manifest.shards}]
    if missing:
        raise EagleError(f"{out}: {len(missing)} shards were not written (first: {missing[0]})",
                         hint="re-run with --resume")
    if "target" not in manifest.extra:
        raise EagleError(f"{out}: no target information recorded", hint="re-run with --resume")
    secs = time.monotonic() - t_start
    nbytes = sum((out / s["file"]).stat().st_size for s in manifest.shards)
    tokens = sum(s["tokens"] for s in manifest.shards)
    new_samples = state["samples"] - samples_done
    result = CacheResult(output_dir=str(out), samples=len(samples), shards=len(groups), tokens=tokens,
                         bytes=nbytes, bytes_per_sample=nbytes / len(samples), skipped=len(skipped),
                         coverage=vocab.coverage, resumed=resumed, shards_written=state["written"],
                         seconds=round(secs, 3),
                         samples_per_s=round(new_samples / secs, 3) if new_samples else None,
                         tokens_per_s=round(state["tokens"] / secs, 1) if state["tokens"] else None)
    manifest.complete = True
    manifest.extra["summary"] = {"samples": len(samples), "tokens": tokens, "bytes": nbytes,
                                 "bytes_per_sample": result.bytes_per_sample}
    manifest.save(out)
    events(StageFinished(stage=STAGE, summary=result.to_dict()))
    return result


def _tokens_hash(samples) -> str:
    from core.vocab import token_stream_hash

    return token_stream_hash((ids, mask) for _, ids, mask in samples)


def _head_ok(out: Path, manifest) -> bool:
    rec = manifest.extra.get("head")
    return bool(rec) and (out / rec["file"]).exists() and sha256_file(out / rec["file"]) == rec["sha256"]


def _make_jobs(cfg, target, vocab, aux_ids, opts, samples, groups, todo, need_head, device, dtype):
    import numpy as np
    import torch

    nproc = max(1, min(cfg.nproc, len(todo))) if todo else 1
    threads = max(1, torch.get_num_threads() // nproc) if (nproc > 1 and device == "cpu") else None
    jobs = []
    for rank in range(nproc):
        shards = []
        for k in todo[rank::nproc]:
            rows = [samples[i] for i in groups[k]]
            shards.append(ShardJob(shard_id=k, sample_index=[r[0] for r in rows],
                                   input_ids=[np.asarray(r[1], dtype=np.int32) for r in rows],
                                   loss_mask=[np.asarray(r[2], dtype=np.uint8) for r in rows]))
        dev = f"cuda:{rank}" if (device == "cuda" and nproc > 1) else device
        jobs.append(WorkerJob(target=str(target), vocab=vocab, aux_layer_ids=aux_ids, storage=opts,
                              output_dir=cfg.output_dir, shards=shards, device=dev, dtype=dtype,
                              device_map=cfg.device_map, batch_tokens=cfg.batch_tokens,
                              write_head=need_head and rank == 0, threads=threads, rank=rank,
                              parent_pid=os.getpid() if nproc > 1 else None))
    return jobs


def _run_processes(jobs: list[WorkerJob], on_report) -> None:
    """One spawned process per job; their reports arrive on a queue and are applied here."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker_main, args=(job, q), daemon=True, name=f"eagle-cache-{job.rank}")
             for job in jobs]
    for p in procs:
        p.start()
    finished: set[int] = set()
    try:
        while len(finished) < len(procs):
            try:
                msg = q.get(timeout=0.5)
            except queue_mod.Empty:
                for rank, p in enumerate(procs):
                    if rank not in finished and not p.is_alive() and p.exitcode not in (0, None):
                        raise EagleError(f"cache worker {rank} died (exit code {p.exitcode})",
                                         hint="re-run with --resume; finished shards are kept")
                continue
            if msg["type"] == "done":
                finished.add(msg["rank"])
            elif msg["type"] == "error":
                if msg.get("full_disk"):
                    from core.disk import full_disk_error

                    err = OSError(28, "No space left on device", msg.get("filename"))
                    raise full_disk_error(err, jobs[msg["rank"]].output_dir)
                cls = UsageError if msg.get("exit_code") == 2 else EagleError
                raise cls(f"cache worker {msg['rank']}: {msg['message']}")
            else:
                on_report(msg)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
