"""`eagle`: one Typer command per pipeline step, plus `eagle run CONFIG` and `eagle demo`.

Each command module exposes `register(app)`. Command modules must not import torch, transformers
or datasets at import time (a test checks `eagle --help` stays light).
"""

from __future__ import annotations

import enum
import sys
from typing import Optional

import typer
from typer.exceptions import TyperException

from core import __version__
from core.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EagleError
from eagle_tui.cli import common

app = typer.Typer(
    name="eagle",
    help="Train, measure, export and serve EAGLE-3 speculative-decoding drafts.\n\n"
    "Exit codes: 0 ok, 1 failure, 2 usage / bad input / missing optional dependency, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class EventsFormat(str, enum.Enum):
    text = "text"
    jsonl = "jsonl"


def _version(value: bool) -> None:
    if value:
        print(f"eagle {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    events: EventsFormat = typer.Option("text", "--events", help="Progress output: 'text' for "
                                        "people, 'jsonl' for one JSON event per line on stdout "
                                        "(scripts, the TUI)."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (also EAGLE_DEBUG=1)."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    common.STATE.events = events.value
    common.STATE.debug = debug


def _register_all() -> None:
    from eagle_tui.cli import (cache_cmd, data_cmd, engine_cmd, eval_cmd, export_cmd, plan_cmd,
                               regen_cmd, run_cmd, serve_cmd, train_cmd, vocab_cmd)

    for mod in (data_cmd, regen_cmd, vocab_cmd, cache_cmd, plan_cmd, train_cmd, eval_cmd,
                export_cmd, serve_cmd, engine_cmd, run_cmd):
        mod.register(app)


_register_all()


def _fail(message: str, code: int) -> int:
    if common.jsonl_mode():
        from core.events import JsonlSink, StageFailed

        JsonlSink(sys.stdout)(StageFailed(stage="eagle", message=message, exit_code=code))
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


RESUMABLE = ("regen", "cache", "train", "run")  # commands whose finished work --resume continues


def _interrupted(args: list[str]) -> str:
    command = next((a for a in args if not a.startswith("-") and a != "jsonl" and a != "text"), "")
    if command in RESUMABLE:
        return "interrupted; finished work is kept: the same command with --resume continues it"
    if command == "demo":
        return "interrupted; finished work is kept: `eagle demo` again continues it"
    return "interrupted"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        rc = app(args=argv, standalone_mode=False)
        # click returns (not raises) typer.Exit's code when standalone_mode is False; Typer turns
        # Ctrl-C (and SIGTERM where a command maps it to KeyboardInterrupt) into a silent Exit(130)
        if rc == EXIT_INTERRUPTED:
            return _fail(_interrupted(args), EXIT_INTERRUPTED)
        return rc if isinstance(rc, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _fail(_interrupted(args), EXIT_INTERRUPTED)
    except TyperException as e:  # Typer vendors click: a usage error (unknown option, bad value) is exit 2
        if not hasattr(e, "show"):
            raise
        e.show()
        return e.exit_code
    except EagleError as e:
        if common.debug_enabled():
            raise
        return _fail(common.error_line(e, sys.argv[1:] if argv is None else argv), e.exit_code)
    except Exception as e:  # unexpected: one line unless --debug
        if common.debug_enabled():
            raise
        from core.disk import first_full_disk, full_disk_error

        if first_full_disk(e) is not None:  # ENOSPC from a step that did not name the file itself
            args = sys.argv[1:] if argv is None else argv
            err = full_disk_error(e, common.output_of(args))
            return _fail(common.error_line(err, args), err.exit_code)
        return _fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)", EXIT_FAILURE)


def entry() -> None:
    import signal

    # A shell starting us with `&` (no job control, e.g. CI scripts) leaves SIGINT ignored; a SIGINT
    # sent to us is still a request to stop cleanly with exit code 130, so take it back.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
