"""End to end: the wizard, driven by keys and inputs, runs a quick real pipeline (`eagle run` as a
subprocess: cache → train → eval → export on the tiny target) and the artefacts land on disk; then
running the cache step again offers Resume on the finished cache and the resumed run succeeds."""

from __future__ import annotations

import json

from textual.widgets import Input, Select, Switch

from core.manifest import load_manifest
from core.runconfig import RunConfig
from eagle_tui.app import EagleApp
from eagle_tui.screens.dashboard import DashboardScreen
from eagle_tui.screens.dialogs import ResumeScreen
from eagle_tui.screens.wizard import WizardScreen
from eagle_tui.widgets.curves import CurveRow
from eagle_tui.widgets.form import FieldRow
from tui_support import fixed_system, flat, wait_for, write_jsonl

SIZE = (120, 40)
QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("How can I help you today?", "Sure, here is a short answer."),
      ("Say hello.", "Hello! How can I help you today?"),
      ("Add two numbers in Python.", "def add(a, b):\n    return a + b\n"),
      ("What does the fox do?", "The quick brown fox jumps over the lazy dog."),
      ("Explain speculative decoding.", "Speculative decoding drafts tokens with a small model and verifies "
                                        "them with the target.")]


async def fill(pilot, row_id: str, text: str) -> None:
    inp = pilot.app.screen.query_one(f"#{row_id}-control", Input)
    inp.focus()
    inp.value = ""
    inp.insert_text_at_cursor(text)
    await pilot.pause()


async def choose(pilot, row_id: str, value) -> None:
    pilot.app.screen.query_one(f"#{row_id}-control", Select).value = value
    await pilot.pause()


async def next_pane(pilot, expected: int) -> None:
    await pilot.press("ctrl+n")
    await pilot.pause()
    assert pilot.app.screen.index == expected, flat(pilot.app.screen.query_one("#next-reason"))


async def test_wizard_runs_a_quick_pipeline_and_resumes(tmp_path, tiny_target):
    data = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(QA * 4)])  # distinct prompts: the first 6 are held out for eval
    config_path = tmp_path / "pipeline.yaml"
    app = EagleApp(config=RunConfig(), config_path=config_path, system=fixed_system(), probe=False,
                   cursor_blink=False)
    app.animation_level = "none"
    async with app.run_test(size=SIZE) as pilot:
        w: WizardScreen = app.screen
        # 1 Dataset
        await fill(pilot, "f-target-model", str(tiny_target))
        await choose(pilot, "f-target-device", "cpu")
        await fill(pilot, "f-workdir", "work")
        await fill(pilot, "f-dataset-source", str(data))
        await fill(pilot, "f-dataset-limit", "16")
        await fill(pilot, "f-dataset-shuffle_seed", "")
        await next_pane(pilot, 1)
        # 2 Regenerate: skipped (the dataset's answers are used as they are)
        w.query_one("#f-regen-enabled-control", Switch).value = True
        await wait_for(lambda: w.query_one("#f-regen-concurrency", FieldRow).disabled, "regen skipped")(pilot)
        await next_pane(pilot, 2)
        # 3 Cache: small vocabulary, short samples
        await fill(pilot, "f-vocab-draft_vocab_size", "128")
        await fill(pilot, "f-features-max_length", "64")
        await fill(pilot, "f-features-shard_size", "8")
        await next_pane(pilot, 3)
        # 4 Train
        await fill(pilot, "f-train-ttt_length", "2")
        await fill(pilot, "f-train-epochs", "3")
        await fill(pilot, "f-train-max_tokens_per_batch", "2048")
        await fill(pilot, "f-train-save_every", "2")
        await next_pane(pilot, 4)
        # 5 Evaluate & Serve
        await fill(pilot, "f-eval-num_prompts", "2")
        await fill(pilot, "f-eval-max_new_tokens", "8")
        await pilot.press("ctrl+g")  # run every enabled step
        await wait_for(lambda: bool(app.jobs.jobs), "job start")(pilot)
        job = app.jobs.jobs[1]
        await wait_for(lambda: not job.active, "pipeline end")(pilot, tries=3600)
        assert job.status == "finished", (job.rc, job.error, [l for _, l in list(job.log)[-15:]])
        assert job.steps == ["cache", "train", "eval", "export"]
        assert isinstance(app.screen, DashboardScreen)
        await pilot.pause()
        dash = app.screen
        summary = flat(dash.query_one("#job-summary"))
        assert "lossless: True" in summary and "accept length τ (real decoding):" in summary
        assert "τ measured on: 2 prompts, 2 held out" in summary
        labels = {r.label for r in dash.query(CurveRow)}
        assert {"loss", "acc TTT0", "acc TTT1", "τ_sim", "held-out τ"} <= labels
        assert job.stages["cache"].status == "finished" and job.stages["cache"].shards

        # the YAML it ran is the one `eagle run` reads
        cfg = RunConfig.load(config_path)
        assert (cfg.target.model, cfg.regen.enabled, cfg.features.max_length) == (str(tiny_target), False, 64)
        work = tmp_path / "work"
        cache = load_manifest(work / "cache")
        written = sum(s["samples"] for s in cache.shards)  # 16 rows after the 6 held out, minus any
        assert cache.complete and written == cache.extra["num_samples"]  # with no answer within 64 tokens
        assert written + cache.extra["skipped"] == 16
        assert (work / "run" / "metrics.jsonl").is_file() and (work / "run" / "latest").exists()
        assert (work / "export" / "config.json").is_file() and (work / "export" / "model.safetensors").is_file()
        report = json.loads((work / "eval.json").read_text())
        assert report["summary"]["lossless"] is True

        # run the cache step again: the finished cache is offered for Resume
        await pilot.press("escape")
        w.go(2)
        await pilot.pause()
        await pilot.press("ctrl+r")
        await wait_for(lambda: isinstance(app.screen, ResumeScreen), "resume prompt")(pilot)
        assert "complete" in flat(app.screen.query_one(".work"))
        await pilot.press("r")
        await wait_for(lambda: 2 in app.jobs.jobs and not app.jobs.jobs[2].active, "resumed job")(pilot, tries=1200)
        again = app.jobs.jobs[2]
        assert again.status == "finished" and again.resume, [l for _, l in list(again.log)[-10:]]
        assert "--resume" in again.argv
        assert load_manifest(work / "cache").shards == cache.shards  # nothing rewritten
