"""Shared CLI plumbing: global options, the event sink for a command, error rendering.

Command modules import only this, typer and `core` config/error modules at import time; anything
heavy (torch, transformers, datasets) is imported inside the command body so `--help` stays fast.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import typer

from core.events import EventSink, JsonlSink


@dataclass
class GlobalOptions:
    events: str = "text"  # "text" (human output) or "jsonl" (machine-readable events on stdout)
    debug: bool = False


STATE = GlobalOptions()


def debug_enabled() -> bool:
    return STATE.debug or os.environ.get("EAGLE_DEBUG", "") not in ("", "0")


def jsonl_mode() -> bool:
    return STATE.events == "jsonl"


def make_sink(stage: str = "") -> EventSink:
    """The sink a command hands to core: JSON lines on stdout, or a rich console renderer."""
    if jsonl_mode():
        return JsonlSink(sys.stdout)
    from eagle_tui.render import ConsoleSink

    return ConsoleSink()


def echo(msg: str = "") -> None:
    """Human output; in jsonl mode it goes to stderr so stdout stays pure JSON lines."""
    print(msg, file=sys.stderr if jsonl_mode() else sys.stdout, flush=True)


def option(model: Any, name: str, *flags: str, **kw: Any) -> Any:
    """A typer.Option for `model`'s field `name`: its default and help come from the model (core's
    one source of truth), its flag is `model.flag(name)`, `flags` are aliases (e.g. "-o").
    List defaults become the comma-separated text the option takes (e.g. --betas 0.9,0.95)."""
    f = model.model_fields[name]
    if f.is_required():
        default: Any = ...
    else:
        default = f.get_default(call_default_factory=True)
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default)) or None
    return typer.Option(default, model.flag(name), *flags, help=f.description, **kw)


def build(model: Any, params: dict[str, Any], **overrides: Any) -> Any:
    """`model` from a command's parameters named like its fields (the command's `locals()`), so no
    command lists the fields twice; `overrides` replace parsed or renamed values."""
    return model(**{**{k: v for k, v in params.items() if k in model.model_fields}, **overrides})


ResumeOpt = typer.Option(False, "--resume", help="Continue the work found in the output directory.")


def _ignore_disk_check(value: bool) -> bool:
    if value:  # an environment variable, so torchrun workers and `eagle run`'s steps see it too
        from core.disk import IGNORE_ENV

        os.environ[IGNORE_ENV] = "1"
    return value


IgnoreDiskOpt = typer.Option(False, "--ignore-disk-check", callback=_ignore_disk_check,
                             help="Start even if the free disk space looks too small for the step's "
                             "estimate.")

RESUMABLE = {"regen", "vocab", "cache", "train", "run"}  # commands that take --resume


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same one, with --resume where it applies."""
    import shlex

    args = list(argv)
    cmd = next((a for a in args if not a.startswith("-") and a in RESUMABLE | {"demo", "export", "eval"}),
               None)
    if cmd in RESUMABLE and "--resume" not in args:
        args.append("--resume")
    return shlex.join(["eagle", *args])


def output_of(argv: list[str]) -> str:
    """The folder a command writes (for a full disk that no file was named for)."""
    for i, a in enumerate(argv[:-1]):
        if a in ("--output-dir", "--output", "-o", "--workdir"):
            return argv[i + 1]
    return os.getcwd()


def error_line(err: Exception, argv: list[str]) -> str:
    """The one-line message for an error; a step stopped by the disk says how to continue."""
    from core.disk import DiskSpaceError

    if isinstance(err, DiskSpaceError) and err.during_run:
        return f"{err.message}; free some space, then run: {resume_command(argv)}"
    return str(err)


def int_list(value: Optional[str], option: str) -> Optional[list[int]]:
    """'1,15,28' → [1, 15, 28] for options such as --aux-layers; a clear usage error otherwise."""
    if value is None or not value.strip():
        return None
    from core.errors import UsageError

    try:
        return [int(x) for x in value.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UsageError(f"{option} {value!r}: expected comma-separated integers, e.g. 1,15,28") from None
