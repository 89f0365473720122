"""`eagle regen` (replay a chat dataset against the target) and `eagle target-server start`."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import List, Optional

import typer

from core.regen.config import TargetServerConfig
from eagle_tui.cli import common

server_app = typer.Typer(help="Start real OpenAI-compatible target servers (transformers serve, "
                         "SGLang, vLLM).", no_args_is_help=True, add_completion=False,
                         rich_markup_mode=None)


def _sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so a launched server is stopped and the journal closed."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@server_app.command("start")
@common.options(TargetServerConfig, exclude=("extra_args",))
def start(
    settings: dict,
    extra: Optional[List[str]] = typer.Argument(None, help=TargetServerConfig.model_fields["extra_args"]
                                                .description),
) -> None:
    """Start a target server and keep it running until Ctrl-C; prints its URL and model name.

    Exit codes: 0 stopped, 1 the server died / never became ready, 2 bad arguments or the backend
    is not installed (with an install hint), 130 interrupted.
    """
    from core.events import Log, StageStarted
    from core.target_server import start_target_server

    cfg = TargetServerConfig(**settings, extra_args=list(extra or ()))
    if cfg.model == "demo":
        from core.assets import demo_target

        cfg.model = str(demo_target())
    backend = cfg.backend
    _sigterm_as_interrupt()
    sink = common.make_sink("target-server")
    with start_target_server(backend, cfg.model, host=cfg.host, port=cfg.port,
                             extra_args=tuple(cfg.extra_args),
                             ready_timeout=cfg.ready_timeout, device=cfg.device, log_path=cfg.log,
                             engine_python=cfg.engine_python) as server:
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
        engine_python: Optional[str] = typer.Option(None, "--engine-python", help="--launch " + TargetServerConfig
                                                    .model_fields["engine_python"].description),
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
