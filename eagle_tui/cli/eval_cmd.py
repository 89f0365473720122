"""`eagle eval`: real chain speculative decoding with the target and a draft; accept length report."""

from __future__ import annotations

from typing import Optional

import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    from core.evaluate import EvalConfig as C

    @app.command("eval")
    def eval_(
        target: str = common.option(C, "target"),
        draft: str = common.option(C, "draft"),
        data: str = common.option(C, "data"),
        num_prompts: int = common.option(C, "num_prompts"),
        num_draft_tokens: int = common.option(C, "num_draft_tokens", "-k"),
        max_new_tokens: int = common.option(C, "max_new_tokens"),
        output: Optional[str] = common.option(C, "output", "-o"),
        split: Optional[str] = common.option(C, "split"),
        messages_column: Optional[str] = common.option(C, "messages_column"),
        offset: int = common.option(C, "offset"),
        max_prompt_tokens: int = common.option(C, "max_prompt_tokens"),
        device: str = common.option(C, "device"),
        dtype: str = common.option(C, "dtype"),
        checkpoint: str = common.option(C, "checkpoint"),
        allow_trained_prompts: bool = common.option(C, "allow_trained_prompts"),
    ) -> None:
        """Measure the accept length (tau) of a draft against its target, greedy and lossless.

        Exit codes: 0 ok, 1 the speculative output differed from the target's greedy output on some
        prompt (see the report), 2 bad arguments or data, or prompts the draft trained on.
        """
        from core.evaluate import evaluate

        cfg = common.build(C, locals())
        report = evaluate(cfg, common.make_sink("eval"))
        if not common.jsonl_mode():  # in jsonl mode the StageFinished event carries the summary
            common.echo(report["text"])
            if output:
                common.echo(f"report: {output}")
        if not report["summary"]["lossless"]:
            raise typer.Exit(1)
