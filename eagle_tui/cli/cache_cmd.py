"""`eagle cache`: the offline feature cache (aux hidden states + target distributions as shards)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    from core.cache.config import CacheConfig as C

    @app.command("cache")
    def cache(
        target: str = common.option(C, "target"),
        data: str = common.option(C, "data"),
        output_dir: str = common.option(C, "output_dir", "-o"),
        draft_vocab_size: int = common.option(C, "draft_vocab_size"),
        vocab: Optional[str] = common.option(C, "vocab"),
        aux_layers: Optional[str] = common.option(C, "aux_layer_ids"),
        max_length: int = common.option(C, "max_length"),
        aux_dtype: str = common.option(C, "aux_dtype"),
        target_store: str = common.option(C, "target_store"),
        topk: int = common.option(C, "topk"),
        target_dtype: str = common.option(C, "target_dtype"),
        shard_size: int = common.option(C, "shard_size"),
        batch_tokens: int = common.option(C, "batch_tokens"),
        nproc: int = common.option(C, "nproc"),
        device: str = common.option(C, "device"),
        device_map: Optional[str] = common.option(C, "device_map"),
        split: Optional[str] = common.option(C, "split"),
        messages_column: Optional[str] = common.option(C, "messages_column"),
        limit: Optional[int] = common.option(C, "limit"),
        shuffle_seed: Optional[int] = common.option(C, "shuffle_seed"),
        exclude: Optional[str] = common.option(C, "exclude"),
        resume: bool = common.option(C, "resume"),
        ignore_disk_check: bool = common.IgnoreDiskOpt,
    ) -> None:
        """Run the target once over a dataset and store its features for offline training.

        Exit codes: 0 ok, 1 failure, 2 bad arguments or input, 130 interrupted (then --resume).
        """
        from core.cache import build_cache
        from core.budget import format_bytes

        cfg = common.build(C, locals(), aux_layer_ids=common.int_list(aux_layers, "--aux-layers"),
                           command="eagle " + " ".join(sys.argv[1:]))
        r = build_cache(cfg, common.make_sink("cache"))
        rate = f", {r.samples_per_s:.2f} samples/s" if r.samples_per_s else ""
        common.echo(f"cache {r.output_dir}: {r.samples} samples in {r.shards} shards, "
                    f"{format_bytes(r.bytes)} ({format_bytes(r.bytes_per_sample)}/sample), "
                    f"coverage {r.coverage:.2%}, {r.skipped} skipped{rate}")
