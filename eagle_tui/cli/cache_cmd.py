"""`eagle cache`: the offline feature cache (aux hidden states + target distributions as shards)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    @app.command("cache")
    def cache(
        target: str = typer.Option(..., "--target", help="Target model folder, or 'demo'."),
        data: str = typer.Option(..., "--data", help="Dataset: file, folder (e.g. `eagle regen` output), "
                                 "hub name, or 'demo'."),
        output: str = typer.Option(..., "--output", "-o", help="Cache folder to write."),
        draft_vocab_size: int = typer.Option(32000, "--draft-vocab-size"),
        vocab: Optional[str] = typer.Option(None, "--vocab", help="Use this `eagle vocab` output instead "
                                            "of building the vocab from the data."),
        aux_layers: Optional[str] = typer.Option(None, "--aux-layers", help="Three layer ids (0-based "
                                                 "layer outputs), e.g. 1,15,28. Default: the engines' "
                                                 "[1, N//2-1, N-4]."),
        max_length: int = typer.Option(2048, "--max-length"),
        aux_dtype: str = typer.Option("fp8", "--aux-dtype", help="bf16 | fp16 | fp8 (e4m3 + per-token scales)."),
        target_store: str = typer.Option("topk", "--target-store", help="probs (all Vd) | topk | hidden "
                                         "(final hidden state; distribution recomputed when read)."),
        topk: int = typer.Option(64, "--topk", help="k for --target-store topk."),
        target_dtype: str = typer.Option("bf16", "--target-dtype", help="bf16 | fp16 for probs / hidden."),
        shard_size: int = typer.Option(256, "--shard-size", help="Samples per shard."),
        batch_tokens: int = typer.Option(4096, "--batch-tokens", help="Padded tokens per target forward."),
        nproc: int = typer.Option(1, "--nproc", help="Worker processes (one per GPU)."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
        device_map: Optional[str] = typer.Option(None, "--device-map", help="'auto': spread a target "
                                                 "larger than one GPU over all GPUs."),
        split: Optional[str] = typer.Option(None, "--split"),
        messages_column: Optional[str] = typer.Option(None, "--messages-column"),
        limit: Optional[int] = typer.Option(None, "--limit"),
        shuffle_seed: Optional[int] = typer.Option(None, "--shuffle-seed"),
        exclude: Optional[str] = common.ExcludeOpt,
        resume: bool = common.ResumeOpt,
        ignore_disk_check: bool = common.IgnoreDiskOpt,
    ) -> None:
        """Run the target once over a dataset and store its features for offline training.

        Exit codes: 0 ok, 1 failure, 2 bad arguments or input, 130 interrupted (then --resume).
        """
        from core.cache import CacheConfig, build_cache
        from core.budget import format_bytes

        cfg = CacheConfig(target=target, data=data, output_dir=output, draft_vocab_size=draft_vocab_size,
                          vocab=vocab, aux_layer_ids=common.int_list(aux_layers, "--aux-layers"), max_length=max_length,
                          aux_dtype=aux_dtype, target_store=target_store, topk=topk, target_dtype=target_dtype,
                          shard_size=shard_size, batch_tokens=batch_tokens, nproc=nproc, device=device,
                          device_map=device_map, split=split, messages_column=messages_column, limit=limit,
                          shuffle_seed=shuffle_seed, exclude=exclude, resume=resume, command="eagle " + " ".join(sys.argv[1:]))
        r = build_cache(cfg, common.make_sink("cache"))
        rate = f", {r.samples_per_s:.2f} samples/s" if r.samples_per_s else ""
        common.echo(f"cache {r.output_dir}: {r.samples} samples in {r.shards} shards, "
                    f"{format_bytes(r.bytes)} ({format_bytes(r.bytes_per_sample)}/sample), "
                    f"coverage {r.coverage:.2%}, {r.skipped} skipped{rate}")
