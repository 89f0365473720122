"""`eagle run CONFIG`: the whole pipeline on the tiny target, end to end and resumable.

Regeneration talks to a real `transformers serve` started for the run; training runs online (the
frozen target inside the step); evaluation is real speculative decoding; the export is validated.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.errors import UsageError
from core.manifest import load_manifest
from core.pipeline import plan_pipeline, select_steps
from core.runconfig import RunConfig

QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("Say hello.", "Hello! How can I help you today?"),
      ("Add two numbers in Python.", "def add(a, b):\n    return a + b\n"),
      ("What does the fox do?", "The quick brown fox jumps over the lazy dog.")]


def _write_data(path, n):
    rows = [{"messages": [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate((QA * n)[:n])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, tiny_target, regen: bool) -> RunConfig:
    cfg = RunConfig(workdir=str(tmp_path / "work"))
    cfg.target.model = str(tiny_target)
    cfg.target.device = "cpu"
    cfg.dataset.source = str(_write_data(tmp_path / "chats.jsonl", 12))
    cfg.dataset.shuffle_seed = 0
    cfg.dataset.limit = 8  # after 3 held-out rows (1 picks the checkpoint, 2 measure τ)
    cfg.regen.enabled = regen
    cfg.regen.max_new_tokens = 12
    cfg.regen.concurrency = 4
    cfg.regen.shard_size = 4
    cfg.vocab.draft_vocab_size = 64
    cfg.features.mode = "online"
    cfg.features.max_length = 64
    cfg.train.ttt_length = 2
    cfg.train.max_steps = 4
    cfg.train.max_tokens_per_batch = 128
    cfg.train.save_every = 2
    cfg.train.val_fraction = 0.25
    cfg.train.select_prompts = 1
    cfg.train.select_max_new_tokens = 8
    cfg.eval.num_prompts = 2
    cfg.eval.max_new_tokens = 8
    cfg.eval.num_draft_tokens = 2
    return cfg.validate()


def _eagle(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "eagle_tui.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_eagle_run_whole_pipeline_then_resume_and_refuse(tmp_path, tiny_target):
    cfg = _config(tmp_path, tiny_target, regen=True)
    cfg.save(tmp_path / "run.yaml")
    r = _eagle("--events", "jsonl", "run", str(tmp_path / "run.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    stages = [e["stage"] for e in events if e["event"] == "stage_finished"]
    assert stages == ["regen", "train", "eval", "export", "pipeline"]
    summary = events[-1]["summary"]
    work = tmp_path / "work"
    # regen: every selected row regenerated, parquet shards + manifest
    regen = load_manifest(work / "regen")
    assert regen.kind == "regen" and sum(s["samples"] for s in regen.shards) == 8
    # train: run dir with a checkpoint at the last step
    assert (work / "run" / "checkpoints" / "step-4" / "draft.safetensors").is_file()
    # eval: lossless on the held-out prompts, tau counted with the bonus token
    report = json.loads((work / "eval.json").read_text())
    assert summary["lossless"] is True and report["summary"]["lossless"] is True
    # τ on the 2 held-out prompts after the selection prompt; none of them trained the draft
    held = [json.loads(x) for x in (work / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 3
    assert summary["prompt_set"]["count"] == 2 and summary["prompt_set"]["held_out"] == 2
    assert [p["prompt_sha256"] for p in report["prompts"]] == [h["prompt_sha256"] for h in held[1:]]
    trained = {json.loads(x)["prompt_sha256"] for x in (work / "run" / "trained_on.jsonl").read_text().splitlines()}
    assert trained and not trained & {h["prompt_sha256"] for h in held}
    import pyarrow.parquet as pq

    from core.data import prompt_sha256

    regen = [r for f in (work / "regen").glob("shard-*.parquet") for r in pq.read_table(f).to_pylist()]
    assert len(regen) == 8 and not {r["index"] for r in regen} & {h["source_index"] for h in held}
    assert trained <= {prompt_sha256(r["messages"]) for r in regen}  # (empty answers are skipped)
    accepted = [n for p in report["prompts"] for n in p["accepted_drafts"]]
    assert summary["tau"] == pytest.approx(sum(n + 1 for n in accepted) / len(accepted))
    assert summary["best_step"] in (2, 4) and summary["measured_speedup"] > 0
    # export: validated serving folder and both engines' commands
    cfg_json = json.loads((work / "export" / "config.json").read_text())
    assert cfg_json["architectures"] == ["LlamaForCausalLMEagle3"] and cfg_json["num_hidden_layers"] == 1
    assert "--speculative-algorithm EAGLE3" in summary["sglang_command"]
    assert '"method": "eagle3"' in summary["vllm_command"]

    # the same command again without --resume refuses (exit 2) and leaves everything in place
    before = sorted(p.name for p in (work / "regen").iterdir())
    r2 = _eagle("run", str(tmp_path / "run.yaml"))
    assert r2.returncode == 2, r2.stderr
    assert "already holds" in r2.stderr and "--resume" in r2.stderr and "Traceback" not in r2.stderr
    assert sorted(p.name for p in (work / "regen").iterdir()) == before

    # --resume: every step finds its finished output; the export is reused, nothing is redone
    r3 = _eagle("--events", "jsonl", "run", str(tmp_path / "run.yaml"), "--resume", "--steps", "regen,train,export")
    assert r3.returncode == 0, r3.stderr[-3000:]
    ev3 = [json.loads(line) for line in r3.stdout.splitlines() if line.startswith("{")]
    regen_done = next(e for e in ev3 if e["event"] == "stage_finished" and e["stage"] == "regen")
    assert regen_done["summary"]["requested"] == 0
    assert any(e["event"] == "log" and "already holds the export" in e["message"] for e in ev3)

    # a moved workdir with its dataset resumes the same way: each step knows its input by content
    import shutil

    (work / "run" / ".eagle.lock").unlink(missing_ok=True)
    work.rename(tmp_path / "moved")
    cfg.workdir = str(tmp_path / "moved")
    cfg.dataset.source = str(shutil.copy(tmp_path / "chats.jsonl", tmp_path / "moved-chats.jsonl"))
    cfg.save(tmp_path / "moved.yaml")
    r4 = _eagle("--events", "jsonl", "run", str(tmp_path / "moved.yaml"), "--resume", "--steps", "regen,train,export")
    assert r4.returncode == 0, r4.stderr[-3000:]
    ev4 = [json.loads(line) for line in r4.stdout.splitlines() if line.startswith("{")]
    assert next(e for e in ev4 if e["event"] == "stage_finished" and e["stage"] == "regen")["summary"]["requested"] == 0
    assert any(e["event"] == "log" and "nothing to do" in e["message"] for e in ev4)
    assert any(e["event"] == "log" and "already holds the export" in e["message"] for e in ev4)


def test_plan_measures_the_dataset_and_budgets_each_step(tmp_path, tiny_target):
    cfg = _config(tmp_path, tiny_target, regen=False)
    cfg.features.mode = "offline"
    plan = plan_pipeline(cfg)
    assert plan["dataset"]["conversations"] == 8 and plan["dataset"]["mean_tokens"] > 10
    assert list(plan["steps"]) == ["cache", "train", "eval", "export"]
    cache = plan["steps"]["cache"]
    assert 0 < cache["bytes_per_sample"] < cache["nemo_bytes_per_sample"]
    assert cache["fits"] is True and cache["total_bytes"] > 8 * cache["bytes_per_sample"] * 0.9
    # nothing was written by planning
    assert not (tmp_path / "work" / "cache").exists()


@pytest.mark.slow
def test_plan_cli_prints_every_step(tmp_path, tiny_target):
    cfg = _config(tmp_path, tiny_target, regen=True)
    cfg.save(tmp_path / "run.yaml")
    r = _eagle("run", str(tmp_path / "run.yaml"), "--plan")
    assert r.returncode == 0, r.stderr
    for word in ("regen", "train", "eval", "export", "conversations"):
        assert word in r.stdout


def test_step_selection_is_checked(tmp_path, tiny_target):
    cfg = _config(tmp_path, tiny_target, regen=False)
    assert select_steps(cfg, ["export", "train"]) == ["train", "export"]
    with pytest.raises(UsageError, match="unknown step"):
        select_steps(cfg, ["training"])
    with pytest.raises(UsageError, match="switched off"):
        select_steps(cfg, ["regen"])  # regen.enabled is false
    with pytest.raises(UsageError, match="switched off"):
        select_steps(cfg, ["cache"])  # online mode has no cache step


@pytest.mark.slow
def test_bad_config_is_one_line_exit_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    r = _eagle("run", str(p))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {p}: unknown field train.lrr (did you mean train.lr?)"]


@pytest.mark.slow
def test_demo_writes_a_valid_config(tmp_path):
    r = _eagle("demo", "--quick", "--write-only", "--workdir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    cfg = RunConfig.load(tmp_path / "d" / "demo-quick.yaml")
    from core.engines import preferred_regen_backend

    assert cfg.target.model == "demo" and cfg.regen.launch == preferred_regen_backend()[0]
    assert "regeneration backend:" in r.stdout
    rows = (tmp_path / "d" / "demo-quick-conversations.jsonl").read_text().splitlines()
    assert len(rows) == cfg.dataset.limit + cfg.dataset.heldout
    assert cfg.dataset.heldout == cfg.train.select_prompts + cfg.eval.num_prompts
    # it trains for the depth it drafts, and prints serving commands at the k it measured
    assert cfg.train.ttt_length == cfg.eval.num_draft_tokens == cfg.serve.num_steps
    assert all(sum(len(m["content"]) for m in json.loads(x)["messages"]) <= 1200 for x in rows)


def test_demo_and_run_refuse_a_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("mine")
    r = _eagle("demo", "--write-only", "--workdir", str(f))
    assert r.returncode == 2 and r.stderr.strip() == f"error: workdir {f} is a file, not a folder"
    (tmp_path / "run.yaml").write_text(f"workdir: {f}\n")
    r = _eagle("run", str(tmp_path / "run.yaml"), "--steps", "train")
    assert r.returncode == 2 and r.stderr.strip() == f"error: workdir {f} is a file, not a folder"
    assert f.read_text() == "mine"


def test_demo_redoes_the_steps_whose_settings_changed_and_keeps_their_output(tmp_path, capsys):
    """A demo workdir from a version with other demo settings: the first changed step and the ones
    after it are set aside (renamed, nothing deleted) so the demo runs instead of refusing to resume."""
    from eagle_tui.cli.run_cmd import _set_aside_stale_steps, demo_config

    cfg = demo_config(False, str(tmp_path / "full"), str(tmp_path / "c.jsonl"))
    saved = tmp_path / "demo-full.yaml"
    cfg.save(saved)
    for step in ("regen", "cache", "train", "export"):
        (cfg.step_output_dir(step) / "f").mkdir(parents=True)
    _set_aside_stale_steps(saved, cfg)  # the same settings: everything resumes
    assert sorted(p.name for p in (tmp_path / "full").iterdir() if not p.name.startswith(".")) == \
        ["cache", "export", "regen", "run"]

    old = cfg.model_copy(deep=True)
    old.train.lr = cfg.train.lr / 2  # an earlier version's demo
    old.save(saved)
    _set_aside_stale_steps(saved, cfg)
    names = sorted(p.name for p in (tmp_path / "full").iterdir() if not p.name.startswith("."))
    assert names[:2] == ["cache", "export.before-" + names[1].split("before-")[1]] and names[2] == "regen"
    assert names[3].startswith("run.before-") and len(names) == 4  # kept, with their files
    assert all((tmp_path / "full" / n / "f").is_dir() for n in names)
    assert "train.lr" in capsys.readouterr().out

    old.features.topk = 32  # a cache setting: the cache and everything after it
    old.save(saved)
    for step in ("train", "export"):
        cfg.step_output_dir(step).mkdir()
    _set_aside_stale_steps(saved, cfg)
    assert [p.name for p in (tmp_path / "full").iterdir() if p.name in ("regen", "cache", "run", "export")] == \
        ["regen"]

    saved.write_text("train: [unclosed\n")  # a file that cannot be read: every step again
    _set_aside_stale_steps(saved, cfg)
    assert not (tmp_path / "full" / "regen").exists() and "cannot be read" in capsys.readouterr().out


def test_engine_bench_without_an_engine_is_skipped_with_a_note(tmp_path, tiny_target, monkeypatch):
    """serve.bench on a machine without vLLM: the pipeline's end says why it skipped, nothing fails."""
    from core.events import ListSink
    from core.pipeline import _engine_bench
    from test_export_format import make_draft, write_draft_export

    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path / "empty-cache"))  # no managed engine here
    monkeypatch.delenv("EAGLE_ENGINE_PYTHON", raising=False)
    cfg = _config(tmp_path, tiny_target, regen=False)
    cfg.serve.bench = True
    from core.pipeline import reserve_eval_prompts

    reserve_eval_prompts(cfg, ListSink())
    write_draft_export(make_draft(tiny_target), cfg.step_output_dir("export"), tiny_target)
    sink = ListSink()
    out = _engine_bench(cfg, str(tiny_target), sink)
    if "skipped" not in out:  # vllm importable in this very environment: nothing to check here
        pytest.skip("vllm is installed in the project's own environment")
    assert "vllm" in out["skipped"].lower()
    assert any(getattr(e, "level", "") == "warning" and "engine bench skipped" in e.message for e in sink.events)
