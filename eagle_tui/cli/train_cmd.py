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
    @app.command("train", help=HELP)
    def train(
        output_dir: Path = typer.Option(..., "--output-dir", "--output", "-o", help="Run directory."),
        target: Optional[str] = typer.Option(None, "--target", help="Target model folder, or 'demo'. "
                                             "Offline: default is the folder the cache records."),
        data: Optional[str] = typer.Option(None, "--data", help="Online: dataset file, folder "
                                           "(e.g. `eagle regen` output), hub name, or 'demo'."),
        cache: Optional[str] = typer.Option(None, "--cache", help="Offline: an `eagle cache` folder."),
        split: Optional[str] = typer.Option(None, "--split", help="Dataset split / slice, e.g. train[:1000]."),
        messages_column: Optional[str] = typer.Option(None, "--messages-column"),
        limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many conversations."),
        shuffle_seed: Optional[int] = typer.Option(None, "--shuffle-seed", help="Online: shuffle the "
                                                   "rows first (as regen / cache do)."),
        strict: bool = typer.Option(False, "--strict", help="Online: fail at the first bad row."),
        exclude: Optional[str] = common.ExcludeOpt,
        val_data: Optional[str] = typer.Option(None, "--val-data", help="A separate validation "
                                               "dataset (online)."),
        val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share held out for "
                                           "validation when --val-data is not given (0: none)."),
        vocab: Optional[str] = typer.Option(None, "--vocab", help="Online: use this `eagle vocab` output."),
        draft_vocab_size: Optional[int] = typer.Option(None, "--draft-vocab-size", help="Online: "
                                                       "default 32000 (targets with >64k ids) or 8192."),
        aux_layers: Optional[str] = typer.Option(None, "--aux-layers", help="Online: three 0-based "
                                                 "layer outputs, e.g. 1,15,28 (default [1, N//2-1, N-4])."),
        max_length: int = typer.Option(2048, "--max-length", help="Tokens per conversation (truncated)."),
        num_layers: int = typer.Option(1, "--num-layers", help="Draft decoder layers. Deeper drafts "
                                       "serve only where the engine supports them (vLLM); SGLang "
                                       "serves 1."),
        ttt_length: int = typer.Option(7, "--ttt-length", help="TTT unroll length L."),
        decay: float = typer.Option(0.8, "--decay", help="Loss weight of TTT step k is decay^k."),
        attention: str = typer.Option("auto", "--attention", help="auto (flex on CUDA, sdpa on CPU) "
                                      "| sdpa | flex | eager | naive (reference)."),
        head_init: str = typer.Option("random", "--head-init", help="random | target: lm_head rows from "
                                      "the target's output head (tied targets: its embeddings), norm "
                                      "from its final norm."),
        freeze_head: bool = typer.Option(False, "--freeze-head", help="With --head-init target: keep "
                                         "lm_head and norm fixed."),
        init_from: Optional[str] = typer.Option(None, "--init-from", help="Warm start from a draft: an "
                                                "export (ours, or converted by `eagle export --from`) or "
                                                "a run; its vocabulary is remapped row by row."),
        lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW)."),
        warmup_ratio: float = typer.Option(0.015, "--warmup-ratio", help="Linear warmup share, then cosine."),
        betas: str = typer.Option("0.9,0.95", "--betas", help="AdamW betas."),
        weight_decay: float = typer.Option(0.0, "--weight-decay"),
        grad_clip: float = typer.Option(0.5, "--grad-clip", help="Max gradient norm (0: off)."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step "
                                       "and process."),
        max_tokens_per_batch: int = typer.Option(8192, "--max-tokens-per-batch", help="Packing budget: "
                                                 "tokens per micro-batch (whole conversations, no padding)."),
        epochs: int = typer.Option(1, "--epochs"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps; "
                                                "overrides --epochs (cycles the data)."),
        seed: int = typer.Option(0, "--seed"),
        save_every: int = typer.Option(500, "--save-every", help="Steps between checkpoints "
                                       "(and one at the end)."),
        keep_last: int = typer.Option(2, "--keep-last", help="Checkpoints kept."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Steps between validations "
                                                 "(default --save-every; also at start and end)."),
        select_data: Optional[str] = typer.Option(None, "--select-data", help="Held-out chat JSONL (eagle "
                                                  "run: WORKDIR/heldout.jsonl): at every checkpoint, real "
                                                  "speculative decoding on its first prompts picks `best`."),
        select_prompts: int = typer.Option(4, "--select-prompts", help="Prompts decoded per checkpoint."),
        select_seconds: float = typer.Option(120.0, "--select-seconds", help="Time bound per checkpoint."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        nproc: int = typer.Option(1, "--nproc", help="Processes on this machine (spawns torchrun)."),
        fsdp: bool = typer.Option(False, "--fsdp", help="Shard the draft with FSDP instead of DDP."),
        resume: bool = common.ResumeOpt,
        ignore_disk_check: bool = common.IgnoreDiskOpt,
    ) -> None:
        from core.train import TrainConfig

        cfg = TrainConfig(
            output_dir=str(output_dir), target=target, data=data, cache=cache, data_split=split,
            messages_column=messages_column, data_limit=limit, data_shuffle_seed=shuffle_seed,
            data_strict=strict, data_exclude=exclude, val_data=val_data,
            val_fraction=val_fraction, vocab=vocab, draft_vocab_size=draft_vocab_size,
            aux_layer_ids=common.int_list(aux_layers, "--aux-layers"), max_length=max_length,
            num_layers=num_layers, ttt_length=ttt_length, decay=decay, attention=attention,
            head_init=head_init, freeze_head=freeze_head, init_from=init_from, lr=lr,
            warmup_ratio=warmup_ratio, betas=_betas(betas), weight_decay=weight_decay,
            grad_clip=grad_clip, grad_accum=grad_accum, max_tokens_per_batch=max_tokens_per_batch,
            epochs=epochs, max_steps=max_steps, seed=seed, save_every=save_every,
            keep_last=keep_last, eval_every=eval_every, select_data=select_data,
            select_prompts=select_prompts, select_seconds=select_seconds, device=device, nproc=nproc, fsdp=fsdp,
            resume=resume).validate()
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
