"""`eagle eval`: real chain speculative decoding with the target and a draft; accept length report."""

from __future__ import annotations


import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    from core.evaluate import EvalConfig as C

    @app.command("eval")
    @common.options(C, aliases={"num_draft_tokens": ("-k",), "output": ("-o",)})
    def eval_(settings: dict) -> None:
        """Measure the accept length (tau) of a draft against its target, greedy and lossless.

        Exit codes: 0 ok, 1 the speculative output differed from the target's greedy output on some
        prompt (see the report), 2 bad arguments or data, or prompts the draft trained on.
        """
        from core.evaluate import evaluate

        cfg = C(**settings)
        report = evaluate(cfg, common.make_sink("eval"))
        if not common.jsonl_mode():  # in jsonl mode the StageFinished event carries the summary
            common.echo(report["text"])
            if cfg.output:
                common.echo(f"report: {cfg.output}")
        if not report["summary"]["lossless"]:
            raise typer.Exit(1)
