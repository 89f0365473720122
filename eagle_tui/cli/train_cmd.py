"""`eagle train`: train the EAGLE-3 draft, online (target in the step) or offline (from `eagle cache`)."""

from __future__ import annotations

import os
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
    @common.options(C, exclude=("select_draft_tokens", "select_max_new_tokens", "log_every", "tensorboard",
                                "extra"), aliases={"output_dir": ("--output", "-o")})
    def train(settings: dict, ignore_disk_check: bool = common.IgnoreDiskOpt) -> None:
        cfg = C(**{**settings, "betas": _betas(settings["betas"]),
                   "aux_layer_ids": common.int_list(settings["aux_layer_ids"], "--aux-layers")}).validate()
        nproc = cfg.nproc
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
