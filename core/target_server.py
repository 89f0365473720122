"""Start and stop real OpenAI-compatible target servers (transformers serve, SGLang, vLLM).

The server runs as a child process in its own process group, bound to 127.0.0.1 on a free port,
with its output in a log file. `start_target_server` waits until the server answers its readiness
probe; if the process dies or the wait times out, the error shows the tail of the log. The server
is stopped (SIGTERM to the group, then SIGKILL) on `stop()`, on leaving the `with` block (also on
Ctrl-C), at interpreter exit, and, on Linux, when the parent process dies (PR_SET_PDEATHSIG).

Readiness: SGLang and vLLM answer GET /v1/models once the model is loaded. `transformers serve`
loads a pinned model before it starts listening, but its /v1/models scans the hub cache and
fails with HTTP 500 when there is none (seen with transformers 5.23), so it is probed on /health.
`transformers serve PATH` pins the model: requests must name it exactly as PATH.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.errors import EagleError, MissingDependencyError, UsageError

BACKENDS = ("transformers", "sglang", "vllm")
READY_PATH = {"transformers": "/health", "sglang": "/v1/models", "vllm": "/v1/models"}


class TargetServerError(EagleError):
    """The target server process died or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_local(model: str) -> bool:
    return os.path.exists(model)


def served_model_name(backend: str, model: str) -> str:
    """The name requests must carry. All three default to the model argument as given."""
    return os.path.abspath(model) if _is_local(model) else model


def check_backend_installed(backend: str) -> None:
    """MissingDependencyError (exit 2) with an install hint when the backend cannot run here."""
    if backend == "transformers":
        for pkg in ("fastapi", "uvicorn", "openai", "pydantic"):
            if importlib.util.find_spec(pkg) is None:
                raise MissingDependencyError(pkg, "run `transformers serve`",
                                             "pip install 'transformers[serving]'")
    elif backend == "sglang":
        if importlib.util.find_spec("sglang") is None:
            raise MissingDependencyError("sglang", "start an SGLang target server",
                                         "pip install 'sglang[all]' (GPU machines; see the SGLang docs)")
    elif backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise MissingDependencyError("vllm", "start a vLLM target server", "pip install vllm")
    else:
        raise UsageError(f"unknown target server backend {backend!r}; use one of {', '.join(BACKENDS)}")


def build_command(backend: str, model: str, host: str, port: int, device: str = "auto",
                  extra_args: Sequence[str] = ()) -> list[str]:
    """The argv that starts `backend` serving `model` on host:port."""
    name = served_model_name(backend, model)
    if backend == "transformers":
        argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", name,
                "--host", host, "--port", str(port), "--continuous-batching"]
        if device != "auto":
            argv += ["--device", device]
        if device == "cpu":
            argv += _cpu_cache_args(extra_args)
    elif backend == "sglang":
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", name,
                "--host", host, "--port", str(port)]
        if device == "cpu":
            argv += ["--device", "cpu"]
    elif backend == "vllm":
        exe = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
        argv = [exe, "serve", name, "--host", host, "--port", str(port)]
    else:
        raise UsageError(f"unknown target server backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return argv + list(extra_args)


# Continuous batching sizes its paged KV cache from free memory: on CPU it takes 60% of RAM,
# which costs ~10 GB and ~40 s of zero-filling before the first answer on a 24 GB box. A fixed
# cache of 64 blocks x 256 tokens (16k tokens; ~0.75 GB for SmolLM2-135M) answers in seconds.
CPU_CACHE_ARGS = {"--cb-num-blocks": "64", "--cb-max-batch-tokens": "1024"}


def _cpu_cache_args(extra_args: Sequence[str]) -> list[str]:
    given = {a.split("=")[0] for a in extra_args}
    if "--cb-max-memory-percent" in given:
        return []
    return [x for k, v in CPU_CACHE_ARGS.items() if k not in given for x in (k, v)]


def resolve_device(device: str) -> str:
    """'auto' becomes 'cpu' on a machine without CUDA (transformers serve would pick it too)."""
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this process dies (Linux), even by kill -9."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class TargetServer:
    backend: str
    model: str
    host: str
    port: int
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    _log_file: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model_name(self) -> str:
        return served_model_name(self.backend, self.model)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after `grace_s`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # the group may outlive its leader (workers of sglang/vllm)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "TargetServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _probe(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_target_server(backend: str, model: str, host: str = "127.0.0.1", port: int | None = None,
                        extra_args: Sequence[str] = (), ready_timeout: float = 600.0,
                        device: str = "auto", log_path: str | os.PathLike | None = None,
                        env: dict[str, str] | None = None) -> TargetServer:
    """Start a real server for `model` and return once it is ready (a context manager)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown target server backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not str(model).strip():
        raise UsageError("target server: --model must name a model folder or hub id")
    if ready_timeout <= 0:
        raise UsageError(f"target server: ready timeout must be > 0 (got {ready_timeout})")
    check_backend_installed(backend)
    port = port or free_port(host)
    argv = build_command(backend, model, host, port, resolve_device(device) if backend == "transformers"
                         else device, extra_args)
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="eagle-target-")) / f"{backend}-server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    if _is_local(model):
        child_env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    log_file = open(log_path, "ab")
    server = TargetServer(backend, model, host, port, argv, log_path, _log_file=log_file)
    server.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=child_env,
                                   start_new_session=True, preexec_fn=die_with_parent)
    atexit.register(server.stop)
    probe = f"http://{host}:{port}{READY_PATH[backend]}"
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            if not server.alive():
                code = server.proc.returncode if server.proc else None
                raise TargetServerError(
                    f"{backend} server for {model} exited with code {code} before it was ready; "
                    f"log {log_path} ends with:\n{server.log_tail()}")
            if _probe(probe):
                return server
            if time.monotonic() > deadline:
                raise TargetServerError(
                    f"{backend} server for {model} was not ready after {ready_timeout:g}s; "
                    f"log {log_path} ends with:\n{server.log_tail()}",
                    hint="raise the ready timeout for big models")
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise
