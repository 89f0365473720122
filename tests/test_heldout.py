"""Held out by construction: the pipeline reserves its evaluation conversations before anything
trains, every training-side stage leaves them (and duplicates) out, runs record what trained them,
`eagle eval` refuses prompts a draft trained on, and `best` follows held-out real τ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.data import DataSpec, load_conversations, prompt_sha256
from core.data.holdout import reserve_heldout
from core.data.identity import TRAINED_ON, read_prompt_list
from core.errors import InputDataError, UsageError
from core.events import ListSink
from core.pipeline import exclude_file, training_data
from core.runconfig import RunConfig
from tests.train_support import REPO, metric_lines, subprocess_env, tiny_cfg, write_conversations

pytestmark = pytest.mark.usefixtures("one_thread")


def _chats(path: Path, n: int, dup_of: list[int] = ()) -> Path:
    rows = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
            for i in range(n)]
    # a duplicate prompt with another answer (ShareGPT has many): it must not train either
    rows += [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "other"}]
             for i in dup_of]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def test_prompt_identity_ignores_regenerated_answers_and_sees_user_turns():
    a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
    b = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a regenerated answer"}]
    c = [{"role": "user", "content": "hi!"}, {"role": "assistant", "content": "x"}]
    assert prompt_sha256(a) == prompt_sha256(b) != prompt_sha256(c)
    sys_a = [{"role": "system", "content": "be brief"}] + a
    assert prompt_sha256(sys_a) != prompt_sha256(a)


def test_default_run_config_evaluates_only_on_conversations_absent_from_training(tmp_path):
    data = _chats(tmp_path / "chats.jsonl", 60, dup_of=list(range(60)))  # every prompt twice
    cfg = RunConfig(workdir=str(tmp_path / "work"))
    cfg.dataset.source = str(data)
    cfg.regen.enabled = False
    assert cfg.dataset.shuffle_seed == 0 and cfg.dataset.limit is None  # the defaults the issue names
    held = reserve_heldout(DataSpec(source=str(data), shuffle_seed=0), cfg.heldout_count(), cfg.heldout_path())
    assert held.count == cfg.train.select_prompts + cfg.eval.num_prompts == 20
    held_hashes = {json.loads(x)["prompt_sha256"] for x in held.path.read_text().splitlines()}
    assert len(held_hashes) == 20
    td = training_data(cfg)
    assert td["exclude"] == exclude_file(cfg) == str(cfg.heldout_path())
    convs, report = load_conversations(DataSpec(source=td["source"], shuffle_seed=td["shuffle_seed"],
                                                limit=td["limit"], exclude=td["exclude"]))
    trained = {prompt_sha256(c.messages) for c in convs}
    assert not trained & held_hashes
    assert len(convs) == 120 - 2 * 20 and report.excluded == 40  # duplicates left out too
    # deterministic: the same settings write the same bytes; another seed holds out others
    before = held.path.read_bytes()
    reserve_heldout(DataSpec(source=str(data), shuffle_seed=0), 20, held.path)
    assert held.path.read_bytes() == before
    other = reserve_heldout(DataSpec(source=str(data), shuffle_seed=1), 20, tmp_path / "h1.jsonl")
    assert other.source_indices != held.source_indices


def test_split_slice_and_limit_apply_after_the_holdout(tmp_path):
    data = _chats(tmp_path / "chats.jsonl", 30)
    held = reserve_heldout(DataSpec(source=str(data), split="train[10:]"), 5, tmp_path / "h.jsonl")
    assert held.source_indices == [10, 11, 12, 13, 14]
    convs, _ = load_conversations(DataSpec(source=str(data), split="train[10:]", limit=7,
                                           exclude=str(held.path)))
    assert [c.index for c in convs] == list(range(15, 22))


def test_too_few_conversations_to_hold_out_is_refused(tmp_path):
    data = _chats(tmp_path / "chats.jsonl", 3)
    with pytest.raises(InputDataError, match="too few to hold 5 out"):
        reserve_heldout(DataSpec(source=str(data)), 5, tmp_path / "h.jsonl")
    assert not (tmp_path / "h.jsonl").exists()


def test_heldout_size_is_validated():
    cfg = RunConfig()
    cfg.dataset.heldout = 3
    with pytest.raises(UsageError, match="dataset.heldout: must be >= train.select_prompts"):
        cfg.validate()


@pytest.fixture(scope="module")
def selected_run(one_thread, tiny_target, tmp_path_factory):
    """An online run with held-out τ at every checkpoint (steps 2, 4, 6), keep_last 1."""
    from core.train import train

    root = tmp_path_factory.mktemp("heldout_run")
    data = write_conversations(root / "convs.jsonl", n=48, seed=3)
    held = reserve_heldout(DataSpec(source=str(data)), 6, root / "heldout.jsonl")
    cfg = tiny_cfg(tiny_target, data, root / "run", max_steps=6, save_every=2, keep_last=1,
                   data_exclude=str(held.path), select_data=str(held.path), select_prompts=3,
                   select_max_new_tokens=10, select_draft_tokens=2)
    sink = ListSink()
    result = train(cfg, sink)
    return root, data, held, result, sink


def test_run_records_what_trained_it_and_not_the_heldout(selected_run):
    root, data, held, _, _ = selected_run
    rec = read_prompt_list(root / "run" / TRAINED_ON)
    assert len(rec) == 48 - 6  # every usable conversation but the held-out ones
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    for r in rec:
        assert prompt_sha256(rows[r["index"]]["messages"]) == r["prompt_sha256"]
    assert not {r["prompt_sha256"] for r in rec} & {json.loads(x)["prompt_sha256"]
                                                      for x in held.path.read_text().splitlines()}


def test_best_follows_heldout_tau(selected_run, tiny_target):
    root, _, _, result, sink = selected_run
    run = root / "run"
    lines = metric_lines(run, "heldout")
    assert [m["step"] for m in lines] == [2, 4, 6]
    for m in lines:
        assert m["prompts"] == 3 and 1.0 <= m["tau"] <= 3.0 and "acc_pos_1" in m
    val = {m["step"]: m["loss"] for m in metric_lines(run, "val")}
    top = max(lines, key=lambda m: (m["tau"], -val[m["step"]]))  # equal τ: the lower validation loss
    assert (run / "best").read_text().strip() == f"checkpoints/step-{top['step']}"
    assert json.loads((run / "best.json").read_text())["tau"] == top["tau"]
    assert result.best == {"step": top["step"], "tau": top["tau"], "prompts": 3, "val_loss": val[top["step"]]}
    # pruning keeps `best` and `latest` even with keep_last 1
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == sorted({f"step-{top['step']}", "step-6"})
    from core.train.checkpoint import pick_checkpoint

    assert pick_checkpoint(run, "best").name == f"step-{top['step']}"
    assert pick_checkpoint(run, "latest").name == "step-6" == pick_checkpoint(run, "6").name
    with pytest.raises(InputDataError, match="no checkpoint step-3"):
        pick_checkpoint(run, "step-3")
    with pytest.raises(InputDataError, match="is not best, latest"):
        pick_checkpoint(run, "newest")
    # eval refuses a wrong checkpoint before it reads any data or loads the target
    from core.evaluate import EvalConfig, evaluate

    with pytest.raises(InputDataError, match="no checkpoint step-3"):
        evaluate(EvalConfig(target=str(tiny_target), draft=str(run), checkpoint="step-3",
                            data=str(root / "no-such.jsonl")))


def test_a_tie_in_heldout_tau_goes_to_the_lower_validation_loss_else_the_later_checkpoint():
    from core.train.checkpoint import beats_best

    best = {"step": 200, "tau": 1.327, "prompts": 4, "val_loss": 4.89}
    assert beats_best({}, 1.0, None)
    assert beats_best(best, 1.33, 9.0) and not beats_best(best, 1.32, 1.0)  # τ decides first
    assert beats_best(best, 1.327, 4.32) and not beats_best(best, 1.327, 4.9)  # then validation loss
    assert beats_best(best, 1.327, None) and beats_best({"step": 2, "tau": 1.327}, 1.327, 4.0)  # else later


def _eagle(*args):
    return subprocess.run([sys.executable, "-m", "eagle_tui.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=subprocess_env())


@pytest.mark.slow
def test_eval_refuses_the_runs_own_training_data_and_reports_heldout(selected_run, tiny_target, tmp_path):
    root, data, held, _, _ = selected_run
    r = _eagle("eval", "--target", str(tiny_target), "--draft", str(root / "run"), "--data", str(data),
               "--offset", "6", "--num-prompts", "4", "--max-new-tokens", "6", "-k", "2")  # rows 0-5 held out
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "evaluation prompts from" in line[0] and str(root / "run") in line[0]
    assert "--allow-trained-prompts" in line[0] and "Traceback" not in r.stderr
    # the override measures anyway and says so in the report
    out = tmp_path / "trained.json"
    r = _eagle("eval", "--target", str(tiny_target), "--draft", str(root / "run"), "--data", str(data),
               "--offset", "4", "--num-prompts", "4", "--max-new-tokens", "6", "-k", "2", "--allow-trained-prompts", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    ps = rep["summary"]["prompt_set"]
    assert ps["count"] == 4 and ps["trained_on"] == 2 and ps["held_out"] == 2  # rows 4, 5 held out
    assert [p["trained_on"] for p in rep["prompts"]] == [False, False, True, True]
    assert "NOT held out" in r.stdout
    # on the held-out file, after the selection prompts: every prompt held out, each listed
    out2 = tmp_path / "held.json"
    r = _eagle("eval", "--target", str(tiny_target), "--draft", str(root / "run"), "--data", str(held.path),
               "--offset", "3", "--num-prompts", "3", "--max-new-tokens", "6", "-k", "2", "-o", str(out2))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out2.read_text())
    assert rep["summary"]["prompt_set"] == {"data": str(held.path), "count": 3, "held_out": 3, "trained_on": 0,
                                            "record": str(root / "run" / TRAINED_ON)}
    assert all(p["trained_on"] is False and len(p["prompt_sha256"]) == 64 for p in rep["prompts"])
    assert rep["draft_info"]["chosen"] == "best"
    assert "3 held out" in r.stdout and "speedup measured here" in r.stdout and "implied" in r.stdout
