"""`eagle eval`: real chain speculative decoding with the target and a draft; accept length report."""

from __future__ import annotations

from typing import Optional

import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        target: str = typer.Option(..., "--target", help="Target model folder."),
        draft: str = typer.Option(..., "--draft", help="Training run, checkpoint, or serving folder "
                                  "(ours or a third-party EAGLE-3 draft in the same format)."),
        data: str = typer.Option(..., "--data", help="Held-out chat dataset (file, folder or hub name); "
                                 "each conversation up to its last user turn is a prompt."),
        num_prompts: int = typer.Option(16, "--num-prompts"),
        num_draft_tokens: int = typer.Option(3, "--num-draft-tokens", "-k", help="Draft tokens per "
                                             "verification (chain)."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="JSON report path."),
        split: Optional[str] = typer.Option(None, "--split", help="Dataset split / slice, e.g. 'train[-100:]'."),
        messages_column: Optional[str] = typer.Option(None, "--messages-column"),
        offset: int = typer.Option(0, "--offset", help="Skip this many usable conversations first."),
        max_prompt_tokens: int = typer.Option(1024, "--max-prompt-tokens"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on CUDA) | float32 | "
                                  "bfloat16 | float16"),
        checkpoint: str = common.CheckpointOpt,
        allow_trained: bool = typer.Option(False, "--allow-trained-prompts", help="Measure even when "
                                           "some prompts trained the draft (its trained_on.jsonl); "
                                           "without it that is refused (exit 2): τ would not be held out."),
    ) -> None:
        """Measure the accept length (tau) of a draft against its target, greedy and lossless.

        Exit codes: 0 ok, 1 the speculative output differed from the target's greedy output on some
        prompt (see the report), 2 bad arguments or data, or prompts the draft trained on.
        """
        from core.evaluate import EvalConfig, evaluate

        cfg = EvalConfig(target=target, draft=draft, data=data, num_prompts=num_prompts,
                         num_draft_tokens=num_draft_tokens, max_new_tokens=max_new_tokens,
                         output=output, split=split, messages_column=messages_column, offset=offset,
                         max_prompt_tokens=max_prompt_tokens, device=device, dtype=dtype,
                         checkpoint=checkpoint, allow_trained_prompts=allow_trained)
        report = evaluate(cfg, common.make_sink("eval"))
        if not common.jsonl_mode():  # in jsonl mode the StageFinished event carries the summary
            common.echo(report["text"])
            if output:
                common.echo(f"report: {output}")
        if not report["summary"]["lossless"]:
            raise typer.Exit(1)
