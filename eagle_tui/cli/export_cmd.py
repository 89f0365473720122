"""`eagle export`: serving folders for SGLang / vLLM, `--check` any folder, `--from` convert others'."""

from __future__ import annotations

import json
from typing import Optional

import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    from core.export.settings import ConvertConfig as CC
    from core.export.settings import ExportConfig as C

    @app.command("export")
    def export(
        source: Optional[str] = typer.Argument(None, help=C.model_fields["source"].description),
        output: Optional[str] = typer.Option(None, "--output", "-o", help=C.model_fields["output_dir"].description),
        fmt: str = common.option(C, "format"),
        check: Optional[str] = typer.Option(None, "--check", help="Explain every problem of a draft "
                                            "folder (ours or a third party's); exit 1 if any error."),
        from_dir: Optional[str] = typer.Option(None, "--from", help=CC.model_fields["source"].description),
        target: Optional[str] = common.option(C, "target"),
        rope_theta: Optional[float] = common.option(CC, "rope_theta"),
        aux_layers: Optional[str] = common.option(CC, "aux_layer_ids"),
        dtype: str = common.option(C, "dtype"),
        include_embed: bool = common.option(C, "include_embed"),
        num_spec_tokens: int = common.option(C, "num_speculative_tokens"),
        as_json: bool = typer.Option(False, "--json", help="--check: print the report as JSON."),
        ignore_disk_check: bool = common.IgnoreDiskOpt,
        checkpoint: str = common.option(C, "checkpoint"),
    ) -> None:
        """Export a draft for serving, check a draft folder, or convert another tool's checkpoint.

        Exit codes: 0 ok, 1 problems found (--check) or failure, 2 bad arguments.
        """
        from core.errors import UsageError

        modes = [m for m in (source, check, from_dir) if m]
        if len(modes) != 1:
            raise UsageError("give exactly one of: SOURCE (run/checkpoint), --check DIR, --from DIR")
        if check:
            from core.export import check_folder, render_report

            report = check_folder(check)
            if as_json or common.jsonl_mode():
                print(json.dumps(report.to_dict(), indent=None if common.jsonl_mode() else 2))
            else:
                common.echo(render_report(report))
            if not report.ok:
                raise typer.Exit(1)
            return
        if not output:
            raise UsageError("--output DIR is required")
        sink = common.make_sink("export")
        if from_dir:
            if fmt != "sglang":
                raise UsageError("--from writes the sglang serving format; re-export it with "
                                 "--format speculators afterwards")
            from core.export import convert_checkpoint

            res = convert_checkpoint(CC(source=from_dir, output_dir=output, target=target, rope_theta=rope_theta,
                                        dtype=dtype, aux_layer_ids=common.int_list(aux_layers, "--aux-layers"),
                                        include_embed=include_embed), sink)
            common.echo(f"converted {from_dir} ({res.source_layout}) -> {res.output_dir}")
            for f in res.fixes:
                common.echo(f"  fixed: {f}")
            return
        from core.export import export_draft

        res = export_draft(C(source=source, output_dir=output, format=fmt, target=target,
                                        dtype=dtype, include_embed=include_embed,
                                        num_speculative_tokens=num_spec_tokens,
                                        checkpoint=checkpoint), sink)
        common.echo(f"exported {source} -> {res.output_dir} ({res.format} format)")
        for w in res.meta.get("warnings", []):
            common.echo(f"  note: {w}")
