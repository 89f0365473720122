"""`eagle vocab`: build the draft vocabulary (d2t / t2d) from a dataset or a token-frequency file."""

from __future__ import annotations

from typing import Optional

import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    @app.command("vocab")
    def vocab(
        target: str = typer.Option(..., "--target", help="Target model folder (its tokenizer and "
                                   "config.json vocab_size), or 'demo'."),
        output: str = typer.Option(..., "--output", "-o", help="Folder to write: vocab.safetensors "
                                   "(d2t, t2d, selected, counts), d2t.npy, t2d.npy, vocab.json."),
        data: Optional[str] = typer.Option(None, "--data", help="Dataset: file, folder, hub name or 'demo'."),
        token_freq: Optional[str] = typer.Option(None, "--token-freq", help="Saved token counts instead "
                                                 "of a dataset: .safetensors ('counts'), .npy [V], or .json "
                                                 "(list, or {id: count})."),
        draft_vocab_size: int = typer.Option(32000, "--draft-vocab-size", help="Vd (8192 for small targets)."),
        max_length: int = typer.Option(2048, "--max-length", help="Tokens per conversation (as in training)."),
        split: Optional[str] = typer.Option(None, "--split"),
        messages_column: Optional[str] = typer.Option(None, "--messages-column"),
        limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N conversations."),
        shuffle_seed: Optional[int] = typer.Option(None, "--shuffle-seed"),
        exclude: Optional[str] = common.ExcludeOpt,
        resume: bool = common.ResumeOpt,
    ) -> None:
        """Count target token ids under the loss mask and keep the most frequent Vd.

        Prints the coverage (share of supervised tokens inside the draft vocab). Exit codes:
        0 ok, 1 failure, 2 bad arguments or input.
        """
        from core.vocab import VocabConfig, make_vocab

        cfg = VocabConfig(target=target, output_dir=output, draft_vocab_size=draft_vocab_size, data=data,
                          token_freq=token_freq, max_length=max_length, split=split,
                          messages_column=messages_column, limit=limit, shuffle_seed=shuffle_seed, exclude=exclude,
                          resume=resume)
        v = make_vocab(cfg, common.make_sink("vocab"))
        common.echo(f"draft vocab {v.draft_vocab_size} of {v.target_vocab_size} ids, coverage "
                    f"{v.coverage:.2%} of {int(v.counts.sum())} supervised tokens -> {output}")
