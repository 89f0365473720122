"""One source of truth for every setting: the stage models in core (pydantic) give the CLI options
their defaults and help, and `eagle run`'s YAML sections are derived from them; this walks them all."""

from __future__ import annotations

import json

import pytest
import typer.main

from core.cache.config import CacheConfig
from core.errors import UsageError
from core.evaluate import EvalConfig
from core.export import ExportConfig
from core.regen.config import RegenConfig
from core.runconfig import RUN_DEFAULTS, SECTIONS, RunConfig
from core.serve import ServeConfig
from core.train.config import TrainConfig
from core.vocab_config import VocabConfig

# command -> (its model, the model's fields that are deliberately not options of that command)
COMMANDS = {
    "train": (TrainConfig, {"select_draft_tokens", "select_max_new_tokens", "log_every", "tensorboard",
                            "extra"}),
    "regen": (RegenConfig, {"launch_args", "backoff_base", "backoff_max", "dead_after",
                            "min_attempts_for_rate", "journal_sync_s"}),
    "cache": (CacheConfig, {"strict", "command", "extra_provenance"}),
    "vocab": (VocabConfig, {"strict"}),
    "eval": (EvalConfig, set()),
    "export": (ExportConfig, {"source", "output_dir"}),  # the SOURCE argument; -o is shared with --check
    "serve": (ServeConfig, {"extra_args", "engine_python", "device"}),
}


def _cli_default(model, name):
    """The model's default as the CLI spells it (lists as comma-separated text, [] as no option)."""
    f = model.model_fields[name]
    if f.is_required():
        return None
    d = f.get_default(call_default_factory=True)
    if isinstance(d, (list, tuple)):
        return ",".join(map(str, d)) or None
    return d


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_options_take_default_and_help_from_the_model(command):
    from eagle_tui.cli import app

    model, not_options = COMMANDS[command]
    cmd = typer.main.get_group(app).commands[command]
    by_flag = {}
    for p in cmd.params:
        for opt in [*p.opts, *getattr(p, "secondary_opts", [])]:
            by_flag[opt] = p
    checked = 0
    for name, f in model.model_fields.items():
        if name in not_options:
            continue
        flag = model.flag(name).split("/")[0]
        assert flag in by_flag, f"eagle {command}: no option {flag} for {model.__name__}.{name}"
        p = by_flag[flag]
        assert p.help == f.description, f"eagle {command} {flag}: help restated instead of the model's"
        assert p.required == f.is_required(), f"eagle {command} {flag}: required differs"
        if not f.is_required():
            assert p.default == _cli_default(model, name), f"eagle {command} {flag}: default differs"
        checked += 1
    assert checked >= 6


def test_yaml_sections_are_the_stage_models():
    for key, sec in SECTIONS.items():
        source = getattr(sec, "source_model", None)
        if source is None:
            continue
        renamed = {new: old for old, new in sec.renamed.items()}
        overrides = RUN_DEFAULTS.get(key, {})
        shared = [k for k in sec.model_fields if renamed.get(k, k) in source.model_fields]
        assert shared, key
        for k in shared:
            stage_f, yaml_f = source.model_fields[renamed.get(k, k)], sec.model_fields[k]
            assert yaml_f.description == stage_f.description, f"{key}.{k}: help restated"
            assert yaml_f.metadata == stage_f.metadata, f"{key}.{k}: bounds differ"
            want = overrides.get(k, stage_f.get_default(call_default_factory=True))
            assert yaml_f.get_default(call_default_factory=True) == want, f"{key}.{k}: default drifted"
        for k in overrides:  # a listed difference is a real one
            assert overrides[k] != source.model_fields[k].get_default(call_default_factory=True), k
    assert not set(RUN_DEFAULTS) - set(SECTIONS)


def test_pipeline_hands_each_stage_the_yaml_values(tmp_path):
    """`eagle run`'s stage configs, built from a default RunConfig, carry the stage defaults."""
    from core.pipeline import train_config
    from core.train.config import TrainSettings

    cfg = RunConfig(workdir=str(tmp_path))
    tc = train_config(cfg, "target", resume=False)
    for k in TrainSettings.model_fields:
        assert getattr(tc, k) == TrainSettings.default(k), k
    cfg.train.lr, cfg.train.betas, cfg.train.attention = 3e-4, (0.8, 0.9), "eager"
    tc = train_config(cfg, "target", resume=False)
    assert (tc.lr, tc.betas, tc.attention) == (3e-4, (0.8, 0.9), "eager")


def test_errors_name_the_yaml_path_or_the_option(tmp_path):
    cfg = RunConfig()
    cfg.train.lr = 0
    with pytest.raises(UsageError, match=r"config field train\.lr: must be > 0") as e:
        cfg.validate()
    assert e.value.exit_code == 2
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0\n  epochs: 1.5\n")
    with pytest.raises(UsageError, match=r"field train\.lr: must be > 0.*field train\.epochs: expected an integer"):
        RunConfig.load(p)
    with pytest.raises(UsageError, match=r"^--lr: must be > 0"):
        TrainConfig(output_dir="r", cache="c", lr=0)


def test_cli_error_names_the_option_and_exits_2(tmp_path, capsys):
    from eagle_tui.cli import main

    code = main(["train", "--output-dir", str(tmp_path / "r"), "--cache", str(tmp_path), "--lr", "0"])
    assert code == 2 and "--lr: must be > 0" in capsys.readouterr().err


def test_old_yaml_still_loads(tmp_path):
    """The keys the YAML had before the sections were derived (aux_layers, empty sections) still load."""
    p = tmp_path / "c.yaml"
    p.write_text("features:\n  aux_layers: [1, 3, 5]\n  mode: online\ntrain:\nserve:\n  port: 30001\n")
    cfg = RunConfig.load(p)
    assert cfg.features.aux_layers == [1, 3, 5] and cfg.train.lr == TrainConfig.default("lr")
    assert cfg.serve.port == 30001


def test_schema_command_writes_the_run_config_schema(tmp_path):
    from eagle_tui.cli import main

    out = tmp_path / "eagle-run.schema.json"
    assert main(["schema", "--output", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert set(SECTIONS) <= set(schema["properties"])
    defs = schema["$defs"]
    lr = defs["TrainSection"]["properties"]["lr"]
    assert lr["exclusiveMinimum"] == 0 and lr["description"] == TrainConfig.model_fields["lr"].description
    assert defs["FeaturesSection"]["properties"]["mode"]["enum"] == ["offline", "online"]
    assert defs["RegenSection"]["additionalProperties"] is False  # typos are flagged in the editor too
    # every default in the schema is the one `eagle run` uses
    defaults = RunConfig().to_dict()
    for key in SECTIONS:
        name = schema["properties"][key]["$ref"].split("/")[-1]
        for field, spec in defs[name]["properties"].items():
            if "default" in spec:
                assert spec["default"] == defaults[key][field], f"{key}.{field}"


def test_tui_rows_take_their_bounds_from_the_model():
    from eagle_tui.widgets.form import FieldRow, field_bounds

    assert field_bounds("train.epochs", integer=True) == (1, None)
    assert field_bounds("regen.top_p", integer=False) == (0, 1)  # (0, 1]: 0 is refused by the config
    assert field_bounds("serve.num_draft_tokens", integer=True) == (2, None)
    row = FieldRow("train.keep_last", "Keep checkpoints", "int")
    assert (row.minimum, row.maximum) == (TrainConfig.model_fields["keep_last"].metadata[0].ge, None)
