"""`eagle vocab`: build the draft vocabulary (d2t / t2d) from a dataset or a token-frequency file."""

from __future__ import annotations

from typing import Optional

import typer

from eagle_tui.cli import common


def register(app: typer.Typer) -> None:
    from core.vocab_config import VocabConfig as C

    @app.command("vocab")
    def vocab(
        target: str = common.option(C, "target"),
        output_dir: str = common.option(C, "output_dir", "-o"),
        data: Optional[str] = common.option(C, "data"),
        token_freq: Optional[str] = common.option(C, "token_freq"),
        draft_vocab_size: int = common.option(C, "draft_vocab_size"),
        max_length: int = common.option(C, "max_length"),
        split: Optional[str] = common.option(C, "split"),
        messages_column: Optional[str] = common.option(C, "messages_column"),
        limit: Optional[int] = common.option(C, "limit"),
        shuffle_seed: Optional[int] = common.option(C, "shuffle_seed"),
        exclude: Optional[str] = common.option(C, "exclude"),
        resume: bool = common.option(C, "resume"),
    ) -> None:
        """Count target token ids under the loss mask and keep the most frequent Vd.

        Prints the coverage (share of supervised tokens inside the draft vocab). Exit codes:
        0 ok, 1 failure, 2 bad arguments or input.
        """
        from core.vocab import make_vocab

        cfg = common.build(C, locals())
        v = make_vocab(cfg, common.make_sink("vocab"))
        common.echo(f"draft vocab {v.draft_vocab_size} of {v.target_vocab_size} ids, coverage "
                    f"{v.coverage:.2%} of {int(v.counts.sum())} supervised tokens -> {output_dir}")
