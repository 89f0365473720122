"""`eagle train`: train the EAGLE-3 draft, online (target in the step) or offline (from `eagle cache`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from eagle_tui.cli import common

HELP = """Train the EAGLE-3 draft with training-time test (TTT).

Online: --target MODEL --data DATASET (the frozen target runs inside each step).
Offline: --cache DIR (features from `eagle cache`; of the target only config.json and the
embedding tensor are read).

The run directory holds manifest.json, vocab/, metrics.jsonl, checkpoints/step-N/ and `latest`.
A non-empty run directory is refused unless --resume, which continues bit-for-bit from the latest
checkpoint and refuses when the settings differ (naming the fields).

Several processes on one machine: --nproc N (DDP; --fsdp shards a large draft). Several nodes:
run on every node

  torchrun --nnodes NODES --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500
  --nproc-per-node GPUS $(which eagle) --events jsonl train ...same options...

Ctrl-C / SIGTERM: the current step finishes and is checkpointed (every process agrees on the step),
then exit 130; --resume continues from it.

Exit codes: 0 ok, 1 failure, 2 bad arguments or input, 130 interrupted (then --resume).
"""


def _betas(value: str) -> tuple[float, float]:
    from core.errors import UsageError

    try:
        b1, b2 = (float(x) for x in value.split(","))
    except ValueError:
        raise UsageError(f"--betas {value!r}: expected two numbers, e.g. 0.9,0.95") from None
    return b1, b2


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def register(app: typer.Typer) -> None:
    from core.train.config import TrainConfig as C

    @app.command("train", help=HELP)
    def train(
        output_dir: Path = common.option(C, "output_dir", "--output", "-o"),
        target: Optional[str] = common.option(C, "target"),
        data: Optional[str] = common.option(C, "data"),
        cache: Optional[str] = common.option(C, "cache"),
        data_split: Optional[str] = common.option(C, "data_split"),
        messages_column: Optional[str] = common.option(C, "messages_column"),
        data_limit: Optional[int] = common.option(C, "data_limit"),
        data_shuffle_seed: Optional[int] = common.option(C, "data_shuffle_seed"),
        data_strict: bool = common.option(C, "data_strict"),
        data_exclude: Optional[str] = common.option(C, "data_exclude"),
        val_data: Optional[str] = common.option(C, "val_data"),
        val_fraction: float = common.option(C, "val_fraction"),
        vocab: Optional[str] = common.option(C, "vocab"),
        draft_vocab_size: Optional[int] = common.option(C, "draft_vocab_size"),
        aux_layers: Optional[str] = common.option(C, "aux_layer_ids"),
        max_length: int = common.option(C, "max_length"),
        num_layers: int = common.option(C, "num_layers"),
        ttt_length: int = common.option(C, "ttt_length"),
        decay: float = common.option(C, "decay"),
        attention: str = common.option(C, "attention"),
        head_init: str = common.option(C, "head_init"),
        freeze_head: bool = common.option(C, "freeze_head"),
        init_from: Optional[str] = common.option(C, "init_from"),
        lr: float = common.option(C, "lr"),
        warmup_ratio: float = common.option(C, "warmup_ratio"),
        betas: str = common.option(C, "betas"),
        weight_decay: float = common.option(C, "weight_decay"),
        grad_clip: float = common.option(C, "grad_clip"),
        grad_accum: int = common.option(C, "grad_accum"),
        max_tokens_per_batch: int = common.option(C, "max_tokens_per_batch"),
        epochs: int = common.option(C, "epochs"),
        max_steps: Optional[int] = common.option(C, "max_steps"),
        seed: int = common.option(C, "seed"),
        save_every: int = common.option(C, "save_every"),
        keep_last: int = common.option(C, "keep_last"),
        eval_every: Optional[int] = common.option(C, "eval_every"),
        select_data: Optional[str] = common.option(C, "select_data"),
        select_prompts: int = common.option(C, "select_prompts"),
        select_seconds: float = common.option(C, "select_seconds"),
        device: str = common.option(C, "device"),
        nproc: int = common.option(C, "nproc"),
        fsdp: bool = common.option(C, "fsdp"),
        resume: bool = common.option(C, "resume"),
        ignore_disk_check: bool = common.IgnoreDiskOpt,
    ) -> None:
        cfg = common.build(C, locals(), output_dir=str(output_dir), betas=_betas(betas),
                           aux_layer_ids=common.int_list(aux_layers, "--aux-layers")).validate()
        sink = common.make_sink("train")
        if nproc > 1 and not _under_torchrun():
            from core.train.spawn import run_torchrun

            summary = run_torchrun(cfg, sink)
        else:
            from core.train import train as run

            if int(os.environ.get("RANK", "0")) != 0:
                from core.events import NullSink

                sink = NullSink()
            summary = run(cfg, sink).summary()
            if int(os.environ.get("RANK", "0")) != 0:
                return
        v0, v1 = summary.get("val_acc_0_first"), summary.get("val_acc_0")
        val = f", val acc_0 {v0:.3f} -> {v1:.3f}" if v0 is not None and v1 is not None else ""
        tps = summary.get("tokens_per_s")
        common.echo(f"run {summary.get('run_dir')}: step {summary.get('steps')}, checkpoint "
                    f"{summary.get('checkpoint')}" + (f", {tps:.0f} tokens/s" if tps else "") + val)
