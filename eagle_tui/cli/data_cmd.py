"""`eagle data inspect PATH`: conversations, turns, length distribution, bad rows by reason."""

from __future__ import annotations

import json
from typing import Optional

import typer

from eagle_tui.cli import common

data_app = typer.Typer(help="Look at chat datasets before using them.", no_args_is_help=True,
                       add_completion=False, rich_markup_mode=None)


@data_app.command("inspect")
def inspect(
    path: str = typer.Argument(..., help="A .json/.jsonl/.parquet file, a folder of parquet shards "
                               "(e.g. eagle regen output), a datasets.save_to_disk folder, a hub "
                               "dataset name, or 'demo' for the embedded ShareGPT sample."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Measure lengths in tokens of "
                                            "this tokenizer's chat-template render (a model or "
                                            "tokenizer folder, or 'demo'); default: characters."),
    messages_column: Optional[str] = typer.Option(None, "--messages-column", help="Column with the "
                                                  "turns (default: messages, else conversations)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split and slice, e.g. train[:1000], "
                                        "train[10%:20%]."),
    shuffle_seed: Optional[int] = typer.Option(None, "--shuffle-seed", help="Shuffle rows with this seed."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Stop after this many valid conversations."),
    strict: bool = typer.Option(False, "--strict", help="Fail at the first bad row (exit 2) "
                                "instead of skipping and counting it."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Count conversations and turns, show the length distribution and the bad rows by reason."""
    from core.data import DataSpec
    from core.data.stats import format_inspect, inspect_data
    from core.events import NullSink

    spec = DataSpec(source=path, split=split, messages_column=messages_column,
                    shuffle_seed=shuffle_seed, limit=limit, strict=strict)
    tok = None
    if tokenizer:
        from core.tokenize import load_tokenizer

        tok = load_tokenizer(tokenizer)
    events = common.make_sink("data") if common.jsonl_mode() and not as_json else NullSink()
    result = inspect_data(spec, tokenizer=tok, tokenizer_name=tokenizer, events=events)
    if as_json:
        print(json.dumps(result, indent=2), flush=True)
    elif common.jsonl_mode():
        from core.events import StageFinished

        events(StageFinished(stage="data", summary=result))
    else:
        common.echo(format_inspect(result))


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
