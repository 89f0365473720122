"""`eagle cache`: the offline feature cache (aux hidden states + target distributions as shards)."""

from __future__ import annotations

import sys

import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    from core.cache.config import CacheConfig as C

    @app.command("cache")
    @common.options(C, exclude=("strict", "command", "extra_provenance"), aliases={"output_dir": ("-o",)})
    def cache(settings: dict, ignore_disk_check: bool = common.IgnoreDiskOpt) -> None:
        """Run the target once over a dataset and store its features for offline training.

        Exit codes: 0 ok, 1 failure, 2 bad arguments or input, 130 interrupted (then --resume).
        """
        from core.cache import build_cache
        from core.budget import format_bytes

        cfg = C(**{**settings, "aux_layer_ids": common.int_list(settings["aux_layer_ids"], "--aux-layers"),
                   "command": "eagle " + " ".join(sys.argv[1:])})
        r = build_cache(cfg, common.make_sink("cache"))
        rate = f", {r.samples_per_s:.2f} samples/s" if r.samples_per_s else ""
        common.echo(f"cache {r.output_dir}: {r.samples} samples in {r.shards} shards, "
                    f"{format_bytes(r.bytes)} ({format_bytes(r.bytes_per_sample)}/sample), "
                    f"coverage {r.coverage:.2%}, {r.skipped} skipped{rate}")
