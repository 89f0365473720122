"""Pilot tests: every pane, Back/Next keeping state, validation as you type, save/open YAML, help."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Button, ContentSwitcher, Input, Select, Static, Switch

from core.runconfig import RunConfig
from eagle_tui.screens.help import HelpScreen
from eagle_tui.screens.wizard import PANES, WizardScreen
from eagle_tui.widgets.form import FieldRow
from tui_support import flat, make_app, wait_for, write_jsonl

SIZE = (120, 40)


def wizard(app) -> WizardScreen:
    assert isinstance(app.screen, WizardScreen)
    return app.screen


def reason(app) -> str:
    return str(wizard(app).query_one("#next-reason", Static).render())


async def set_input(pilot, row_id: str, text: str) -> None:
    """Type into a bound Input the way a user does: focus, clear, type (long paths are pasted:
    each simulated key press costs a screen refresh)."""
    app = pilot.app
    inp = app.screen.query_one(f"#{row_id}-control", Input)
    inp.focus()
    inp.value = ""
    if len(text) <= 12:
        await pilot.press(*text) if text else None
    else:
        inp.insert_text_at_cursor(text)
    await pilot.pause()


async def test_every_pane_shows_and_next_walks_them(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        w = wizard(app)
        seen = []
        for i, (key, cls) in enumerate(PANES):
            assert w.query_one(ContentSwitcher).current == f"pane-{key}"
            pane = w.query_one(f"#pane-{key}")
            assert pane.display and pane.rows(), key
            seen.append(cls.TITLE)
            await pilot.press("ctrl+n")
            await pilot.pause()
        assert seen == ["Dataset", "Regenerate", "Cache or Online", "Train", "Evaluate & Serve"]
        assert w.index == 4 and w.query_one("#next", Button).disabled
        assert reason(app) == "ctrl+g runs all steps"
        await pilot.press("ctrl+b", "ctrl+b")
        assert w.index == 2


async def test_back_and_next_keep_values_and_write_the_config(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        w = wizard(app)
        w.go(3)  # Train
        await set_input(pilot, "f-train-lr", "0.0003")
        await set_input(pilot, "f-train-epochs", "3")
        assert app.config.train.lr == 0.0003 and app.config.train.epochs == 3
        await pilot.press("ctrl+b", "ctrl+b")
        await pilot.press("ctrl+n", "ctrl+n")
        await pilot.pause()
        assert w.index == 3
        assert w.query_one("#f-train-lr-control", Input).value == "0.0003"
        assert w.query_one("#f-train-epochs-control", Input).value == "3"
        assert app.dirty


async def test_invalid_input_disables_next_and_says_why(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        w = wizard(app)
        w.go(3)
        await set_input(pilot, "f-train-epochs", "x")
        nxt = w.query_one("#next", Button)
        assert nxt.disabled
        assert reason(app) == "✗ Epochs: must be a whole number ≥ 1"
        assert app.config.train.epochs == 1  # the last good value is kept
        row = w.query_one("#f-train-epochs", FieldRow)
        assert "-error" in row.query_one(".field-hint").classes
        await pilot.press("ctrl+n")  # refused, with the reason
        assert w.index == 3
        await set_input(pilot, "f-train-epochs", "2")
        assert not nxt.disabled and reason(app) == ""


async def test_cross_field_rule_from_runconfig_blocks_next(tmp_path):
    """train.max_tokens_per_batch must hold one sample of features.max_length (RunConfig.validate)."""
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        w = wizard(app)
        w.go(3)
        await set_input(pilot, "f-train-max_tokens_per_batch", "512")
        assert w.query_one("#next", Button).disabled
        assert "train.max_tokens_per_batch" in reason(app) and "2048" in reason(app)


async def test_dataset_source_validates_as_you_type(tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}])
    (tmp_path / "notes.txt").write_text("x")
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        w = wizard(app)
        await set_input(pilot, "f-dataset-source", str(tmp_path / "missing.jsonl"))
        assert "no such file or folder" in reason(app)
        await set_input(pilot, "f-dataset-source", str(tmp_path / "notes.txt"))
        assert ".txt file is not supported" in reason(app)
        await set_input(pilot, "f-dataset-source", str(data))
        assert reason(app) == "" and app.config.dataset.source == str(data)
        hint = str(w.query_one("#f-dataset-source-hint", Static).render())
        assert hint.startswith("local jsonl file")
        await set_input(pilot, "f-dataset-source", "org/some-chats")
        assert reason(app) == "" and "hub dataset name" in str(w.query_one("#f-dataset-source-hint").render())
        await set_input(pilot, "f-target-model", str(tmp_path))
        assert "has no config.json" in reason(app)


async def test_regen_pane_skip_and_server_choices(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        w = wizard(app)
        w.go(1)
        await pilot.pause()
        servers = w.query_one("#f-regen-servers", FieldRow)
        assert servers.disabled  # a local server is started by default
        w.query_one("#f-regen-launch-control", Select).value = "urls"
        await wait_for(lambda: not servers.disabled and "regen.servers" in reason(app), "the URLs mode")(pilot)
        assert app.config.regen.launch is None and not servers.disabled
        assert "regen.servers" in reason(app)  # URLs mode needs a URL
        await set_input(pilot, "f-regen-servers", "localhost:30000")
        # the check runs on the input's change event, which a loaded machine may deliver a frame later
        await wait_for(lambda: "http:// or https://" in reason(app), "the URL scheme check")(pilot)
        await set_input(pilot, "f-regen-servers", "http://a:1, http://b:2")
        assert app.config.regen.servers == ["http://a:1", "http://b:2"] and reason(app) == ""
        w.query_one("#f-regen-enabled-control", Switch).value = True  # skip
        await wait_for(lambda: w.query_one("#run", Button).disabled, "regen skipped")(pilot)
        assert app.config.regen.enabled is False
        assert w.query_one("#f-regen-concurrency", FieldRow).disabled
        assert w.query_one("#run", Button).disabled
        await pilot.press("ctrl+r")
        assert w.index == 1 and not app.jobs.jobs


async def test_features_pane_online_mode(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        w = wizard(app)
        w.go(2)
        await pilot.pause()
        assert str(w.query_one("#run", Button).label) == "Run cache"
        w.query_one("#f-features-mode-control", Select).value = "online"
        await wait_for(lambda: "cache" not in app.config.enabled_steps(), "online mode")(pilot)
        assert app.config.features.mode == "online"
        assert "cache" not in app.config.enabled_steps()
        assert w.query_one("#f-features-aux_dtype", FieldRow).disabled
        assert w.query_one("#run", Button).disabled
        assert "Online: nothing is stored" in str(w.query_one("#storage-table", Static).render())


async def test_serve_pane_eval_toggle_and_serve_rule(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        w = wizard(app)
        w.go(4)
        await pilot.pause()
        assert str(w.query_one("#run", Button).label) == "Run eval+export"
        w.query_one("#f-eval-enabled-control", Switch).value = False
        await wait_for(lambda: str(w.query_one("#run", Button).label) == "Run export", "eval off")(pilot)
        assert w.query_one("#f-eval-num_prompts", FieldRow).disabled
        assert str(w.query_one("#run", Button).label) == "Run export"
        command = str(w.query_one("#serve-command", Static).render())
        assert "--speculative-algorithm EAGLE3" in command and "vllm serve" in command
        assert "Serve with SGLang (chosen)" in command
        await set_input(pilot, "f-serve-num_draft_tokens", "9")
        assert "serve.num_draft_tokens" in reason(app) and "num_steps + 1 = 4" in reason(app)
        assert "(no command: --num-draft-tokens: with --topk 1" in str(w.query_one("#serve-command", Static).render())
        await set_input(pilot, "f-serve-num_draft_tokens", "4")
        w.query_one("#f-serve-engine-control", Select).value = "vllm"
        await wait_for(lambda: "vLLM (chosen)" in flat(w.query_one("#serve-command")), "the vLLM command")(pilot)
        command = " ".join(str(w.query_one("#serve-command", Static).render()).split())
        assert command.startswith("Serve with vLLM (chosen): vllm serve")
        assert '"num_speculative_tokens": 3' in command
        # other draft lengths to measure: a comma list into eval.compare_k, a bad one refused
        w.query_one("#f-eval-enabled-control", Switch).value = True
        await wait_for(lambda: not w.query_one("#f-eval-num_prompts", FieldRow).disabled, "eval on")(pilot)
        await set_input(pilot, "f-eval-compare_k", "1,2")
        assert app.config.eval.compare_k == [1, 2]
        await set_input(pilot, "f-eval-compare_k", "1,0")
        # typed key by key: "1" and "1," were valid on the way, "1,0" is refused and not kept
        assert w.query_one("#f-eval-compare_k", FieldRow).error and app.config.eval.compare_k == [1]
        await set_input(pilot, "f-eval-compare_k", "")
        assert app.config.eval.compare_k == []


async def test_save_writes_the_yaml_eagle_run_reads_and_open_loads_it(tmp_path):
    path = tmp_path / "pipe.yaml"
    app = make_app(tmp_path, config_path=path)
    async with app.run_test(size=SIZE) as pilot:
        w = wizard(app)
        w.go(3)
        await set_input(pilot, "f-train-ttt_length", "5")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert path.exists() and not app.dirty
    loaded = RunConfig.load(path)
    assert loaded.train.ttt_length == 5 and loaded.workdir == str(tmp_path / "work")

    other = RunConfig(workdir="elsewhere")
    other.regen.enabled = False
    other.train.lr = 0.002
    other_path = tmp_path / "other.yaml"
    other.save(other_path)
    app = make_app(tmp_path, config_path=path)
    async with app.run_test(size=SIZE) as pilot:
        assert app.open_config(other_path)
        await pilot.pause()
        w = wizard(app)
        assert app.config.train.lr == 0.002
        assert w.query_one("#f-train-lr-control", Input).value == "0.002"
        assert w.query_one("#f-regen-enabled-control", Switch).value is True  # "skip" shown on
        assert app.config.workdir_path() == tmp_path / "elsewhere"
        bad = tmp_path / "bad.yaml"
        bad.write_text("train:\n  lrr: 1\n")
        assert not app.open_config(bad)
        assert app.config.train.lr == 0.002  # unchanged after a refused open


async def test_help_lists_keys_and_closes(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = app.export_screenshot()
        for key in ("ctrl+n", "ctrl+r", "ctrl+s", "ctrl+l"):
            assert key in text
        await pilot.press("escape")
        assert isinstance(app.screen, WizardScreen)
        wizard(app).query_one("#next", Button).focus()
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)


@pytest.mark.slow
def test_wizard_never_imports_torch_in_the_ui_process(tmp_path):
    """Start-up stays fast and the UI stays responsive: heavy libraries live in the subprocesses."""
    import json
    import subprocess
    import sys

    code = (
        "import asyncio, json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from pathlib import Path\n"
        "from tui_support import make_app\n"
        "async def main():\n"
        f"    app = make_app(Path({str(tmp_path)!r}))\n"
        "    async with app.run_test(size=(120, 40)) as pilot:\n"
        "        for i in range(5):\n"
        "            app.screen.go(i)\n"
        "            await pilot.pause()\n"
        "asyncio.run(main())\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'datasets', 'pyarrow'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
