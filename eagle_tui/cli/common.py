"""Shared CLI plumbing: global options, the event sink for a command, error rendering.

Command modules import only this, typer and `core` config/error modules at import time; anything
heavy (torch, transformers, datasets) is imported inside the command body so `--help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, get_args, get_origin

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


def _cli_type(f: Any) -> Any:
    """The Typer type of a model field: lists are comma-separated text (str lists: a repeated option),
    choices are text (the model refuses others, naming the option)."""
    ann, args = f.annotation, [a for a in get_args(f.annotation) if a is not type(None)]
    optional = type(None) in get_args(ann) or (not f.is_required() and f.default is None)
    base = args[0] if len(args) == 1 and type(None) in get_args(ann) else ann
    if get_origin(base) is list and get_args(base) == (str,):
        return Optional[List[str]]
    t = base if base in (int, float, bool, str) else str
    return Optional[t] if optional else t


def options(model: Any, exclude: tuple[str, ...] = (), aliases: dict[str, tuple[str, ...]] | None = None):
    """Decorator: the command takes every field of `model` (but `exclude`) as an option built by
    `option()`, handed to it as one dict `settings` (the model's own fields first, then inherited
ones, then the command's own parameters)."""
    aliases = aliases or {}
    first = [n for n in vars(model).get("__annotations__", {}) if n in model.model_fields]  # its own
    names = [n for n in [*first, *model.model_fields] if n not in exclude]
    names = list(dict.fromkeys(names))

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()
               if p.name != "settings"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=_cli_type(model.model_fields[n]),
                                   default=option(model, n, *aliases.get(n, ()))) for n in names]

        @functools.wraps(fn)
        def command(**kw: Any) -> Any:
            return fn(settings={n: kw.pop(n) for n in names}, **kw)

        command.__signature__ = sig.replace(parameters=added + own)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in added + own}
        return command

    return deco


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
