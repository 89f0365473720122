"""`eagle vocab`: build the draft vocabulary (d2t / t2d) from a dataset or a token-frequency file."""

from __future__ import annotations


import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    from core.vocab_config import VocabConfig as C

    @app.command("vocab")
    @common.options(C, exclude=("strict",), aliases={"output_dir": ("-o",)})
    def vocab(settings: dict) -> None:
        """Count target token ids under the loss mask and keep the most frequent Vd.

        Prints the coverage (share of supervised tokens inside the draft vocab). Exit codes:
        0 ok, 1 failure, 2 bad arguments or input.
        """
        from core.vocab import make_vocab

        cfg = C(**settings)
        v = make_vocab(cfg, common.make_sink("vocab"))
        common.echo(f"draft vocab {v.draft_vocab_size} of {v.target_vocab_size} ids, coverage "
                    f"{v.coverage:.2%} of {int(v.counts.sum())} supervised tokens -> {cfg.output_dir}")
