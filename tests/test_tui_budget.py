"""The budget panel: estimates from core.budget, disk / GPU / RAM readings, warnings before a run that
does not fit, the storage table, and the dataset preview feeding the real sample count."""

from __future__ import annotations

from pathlib import Path

from core import budget
from core.cache.layout import CacheDims, StorageOptions
from core.runconfig import RunConfig
from core.settings import default_draft_vocab
from eagle_tui.screens.dialogs import BudgetWarningScreen
from eagle_tui.screens.wizard import WizardScreen
from eagle_tui.sysinfo import GpuInfo
from eagle_tui.widgets import estimates
from eagle_tui.widgets.budget_panel import BudgetPanel, assess
from core.step_budgets import StepBudget
from tui_support import GB, fixed_system, flat, make_app, wait_for, write_jsonl

SIZE = (120, 40)


def test_assess_adds_disk_up_step_by_step_and_checks_memory():
    steps = [StepBudget("regen", 1 * GB, 2 * GB, 1 * GB), StepBudget("cache", 5 * GB, 6 * GB, 3 * GB),
             StepBudget("train", 2 * GB, 30 * GB, 20 * GB)]
    enabled = ["regen", "cache", "train"]
    a = assess(steps, enabled, Path("w"), 5 * GB, [], 16 * GB)
    assert a.disk_needed == 8 * GB
    assert a.warnings["cache"] == ["cache does not fit on disk: needs 6.0 GB in all, 5.0 GB free"]
    assert "train does not fit on disk: needs 8.0 GB in all, 5.0 GB free" in a.warnings["train"]
    assert "train needs 20.0 GB of RAM on CPU, 16.0 GB available" in a.warnings["train"]
    assert "regen" not in a.warnings and a.gpu_line == "no GPU detected: runs on CPU"
    a = assess(steps, ["regen", "train"], Path("w"), 100 * GB, [GpuInfo("H100", 80 * GB, 79 * GB)] * 2, 1)
    assert a.gpu_line == "2× H100, 80.0 GB each" and a.warnings == {} and a.disk_needed == 3 * GB
    a = assess(steps, enabled, Path("w"), 100 * GB, [GpuInfo("T4", 16 * GB, 15 * GB)], 1)
    assert a.warnings == {"train": ["train needs 30.0 GB of GPU memory, each GPU has 16.0 GB"]}
    a = assess(steps, enabled, Path("w"), int(8.5 * GB), [], 64 * GB, device="cuda")
    assert a.cautions == ["disk is tight: 8.0 GB of 8.5 GB free"]
    assert a.warnings == {"device": ["device is cuda but no GPU is detected"]}
    assert assess("(estimate unavailable: x)", enabled, Path("w"), 1, [], 1).unavailable


def test_cache_estimate_is_core_budget_arithmetic(tmp_path):
    cfg = RunConfig(workdir=str(tmp_path))
    cfg.dataset.limit = 300
    cfg.features.max_length = 512
    cfg.features.aux_dtype, cfg.features.target_store, cfg.features.topk = "bf16", "topk", 16
    cache = next(b for b in estimates.step_budgets(cfg, 0) if b.step == "cache")
    shape = budget.TargetShape(name="s", **budget.PRESETS["smollm2-135m"])
    vd = default_draft_vocab(shape.vocab_size)  # no draft vocab size set: the stages' rule (8192 here)
    expected = budget.estimate_cache_bytes(CacheDims(shape.hidden_size, vd), StorageOptions("bf16", "topk", 16),
                                           [512] * 300, 256, shape.vocab_size)
    assert cache.disk_bytes == expected.total_bytes
    rows = estimates.storage_options(cfg)
    chosen = next(r for r in rows if (r.aux_dtype, r.target_store) == ("bf16", "topk"))
    assert chosen.total_bytes == expected.total_bytes
    assert chosen.bytes_per_sample == int(expected.bytes_per_sample)
    fp8 = next(r for r in rows if (r.aux_dtype, r.target_store) == ("fp8", "topk"))
    assert fp8.bytes_per_sample < chosen.bytes_per_sample  # 8-bit hidden states are smaller
    # with a measured speed, the cache time is every token of every sample through the target once
    cache = next(b for b in estimates.step_budgets(cfg, 0, tokens_per_s=1000.0) if b.step == "cache")
    assert cache.time_s == 300 * 512 / 1000.0


async def test_panel_says_no_gpu_plainly_and_shows_gpus(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE):
        text = flat(app.screen.query_one(BudgetPanel), 44)
        assert "no GPU detected: runs on CPU" in text and "500.0 GB free" in text
    gpus = [GpuInfo("NVIDIA H100", 80 * GB, 80 * GB)]
    app = make_app(tmp_path, system=fixed_system(gpus=gpus))
    async with app.run_test(size=SIZE):
        panel = app.screen.query_one(BudgetPanel)
        assert "1× NVIDIA H100, 80.0 GB each" in flat(panel, 44)
        assert not panel.has_class("-warn")


async def test_disk_that_does_not_fit_warns_and_asks_before_running(tmp_path):
    app = make_app(tmp_path, config_path=tmp_path / "run.yaml", system=fixed_system(disk_free=1 * GB))
    async with app.run_test(size=SIZE) as pilot:
        w: WizardScreen = app.screen
        panel = w.query_one(BudgetPanel)
        assert panel.has_class("-warn")
        assert "cache does not fit on disk" in flat(panel, 60)
        w.go(2)  # Cache or Online
        await pilot.press("ctrl+r")
        await wait_for(lambda: isinstance(app.screen, BudgetWarningScreen), "budget warning")(pilot)
        assert "cache does not fit on disk" in app.screen.question
        await pilot.press("escape")  # the default: do not run
        await pilot.pause()
        assert isinstance(app.screen, WizardScreen) and not app.jobs.jobs
        # online mode stores nothing: the warning goes away
        w.query_one("#f-features-mode-control").value = "online"
        await wait_for(lambda: not panel.has_class("-warn"), "online mode's budget")(pilot)
        w.query_one("#f-features-mode-control").value = "offline"
        await wait_for(lambda: panel.has_class("-warn"), "offline mode's budget")(pilot)
        await pilot.press("ctrl+r")
        await wait_for(lambda: isinstance(app.screen, BudgetWarningScreen), "budget warning")(pilot)
        await pilot.press("y")  # run anyway
        await wait_for(lambda: bool(app.jobs.jobs), "job")(pilot)
        assert app.jobs.jobs[1].steps == ["cache"]


async def test_gpu_too_small_for_training_warns(tmp_path):
    gpus = [GpuInfo("RTX 4060", 8 * GB, 7 * GB)]  # (the chunked loss fits SmolLM2 online in a T4)
    cfg = RunConfig(workdir=str(tmp_path / "w"))
    cfg.target.model = "llama-3.2-1b"  # its public shape: online needs ~15 GB at the defaults
    cfg.features.mode = "online"
    app = make_app(tmp_path, config=cfg, system=fixed_system(gpus=gpus))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.screen.query_one(BudgetPanel)
        text = flat(panel, 80)
        assert panel.has_class("-warn") and "train needs" in text and "each GPU has 8.0 GB" in text
        # a smaller batch and a smaller draft vocabulary fit
        w = app.screen
        w.go(3)
        w.query_one("#f-train-max_tokens_per_batch-control").value = "2048"
        w.query_one("#f-train-ttt_length-control").value = "3"
        w.go(2)
        w.query_one("#f-vocab-draft_vocab_size-control").value = "8192"
        await wait_for(lambda: not panel.has_class("-warn"), "the smaller settings' budget")(pilot)


async def test_storage_table_and_preview_feed_the_budget(tmp_path):
    good = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}
    rows = [good, {"messages": []}, good, {"messages": [{"role": "user", "content": "hi"}]}, good]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    cfg = RunConfig(workdir=str(tmp_path / "w"))
    cfg.dataset.source = str(data)
    app = make_app(tmp_path, config=cfg)
    async with app.run_test(size=SIZE) as pilot:
        w = app.screen
        w.go(2)
        await pilot.pause()
        table = flat(w.query_one("#storage-table"), 100)
        assert "1000 samples assumed" in table
        for dtype in ("bf16", "fp8"):
            assert dtype in table
        w.go(0)
        await pilot.pause()
        assert await pilot.click("#preview")
        await wait_for(lambda: "good conversations" in flat(w.query_one("#preview-area"), 100), "preview")(pilot)
        preview = flat(w.query_one("#preview-area"), 100)
        assert "5 rows in chats.jsonl; 3 good conversations" in preview
        assert "What is 2+2?" in preview
        assert "2 bad rows skipped" in preview and "row 1:" in preview and "row 3:" in preview
        assert app.known_rows[str(data)] == 5
        assert "5 samples (previewed)" in flat(w.query_one(BudgetPanel), 44)


def test_gpu_probe_reads_nvidia_smi(tmp_path, monkeypatch):
    """The probe parses nvidia-smi's CSV (a stand-in script: no GPU on this machine); no tool = no GPU."""
    from eagle_tui.sysinfo import probe_gpus

    monkeypatch.setenv("PATH", str(tmp_path))
    assert probe_gpus() == []
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559, 80000'\necho 'NVIDIA H100 80GB HBM3, 81559, 1024'\n")
    smi.chmod(0o755)
    gpus = probe_gpus()
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert gpus[0].total_bytes == 81559 << 20 and gpus[1].free_bytes == 1024 << 20


async def test_measured_speed_gives_time_estimates(tmp_path, tiny_target):
    """ctrl+t measures the target's forward speed in a subprocess; the cache time follows from it."""
    cfg = RunConfig(workdir=str(tmp_path / "w"))
    cfg.target.model, cfg.target.device = str(tiny_target), "cpu"
    cfg.dataset.limit = 100
    cfg.features.max_length = 256
    cfg.vocab.draft_vocab_size = 128
    app = make_app(tmp_path, config=cfg)
    async with app.run_test(size=SIZE) as pilot:
        panel = app.screen.query_one(BudgetPanel)
        assert "press ctrl+t" in flat(panel, 44)
        await pilot.press("ctrl+t")
        await wait_for(lambda: str(tiny_target) in app.speeds, "measurement")(pilot, tries=1200)
        await pilot.pause()
        tps = app.speeds[str(tiny_target)]
        assert tps > 0
        cache = next(b for b in panel.assessment.steps if b.step == "cache")
        assert cache.time_s == 100 * 256 / tps
        assert "(measured speed, upper bound)" in flat(panel, 44)
