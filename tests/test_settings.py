"""One source of truth for every setting: the stage models in core (pydantic) give the CLI options
their defaults and help, and `eagle run`'s YAML sections are derived from them; this walks them all."""

from __future__ import annotations

import json

import pytest
import typer.main

from core.cache.config import CacheConfig
from core.errors import UsageError
from core.evaluate import EvalConfig
from core.export import ConvertConfig, ExportConfig
from core.regen.config import RegenConfig, TargetServerConfig
from core.runconfig import RUN_DEFAULTS, SECTIONS, RunConfig
from core.serve import ServeConfig
from core.serve_bench import BenchConfig
from core.train.config import TrainConfig
from core.vocab_config import VocabConfig

# (command, its model, the model's fields that are deliberately not options of that command)
COMMANDS = [
    ("train", TrainConfig, {"select_draft_tokens", "select_max_new_tokens", "log_every", "tensorboard",
                            "extra"}),
    ("regen", RegenConfig, {"launch_args", "backoff_base", "backoff_max", "dead_after",
                            "min_attempts_for_rate", "journal_sync_s"}),
    ("cache", CacheConfig, {"strict", "command", "extra_provenance"}),
    ("vocab", VocabConfig, {"strict"}),
    ("eval", EvalConfig, set()),
    ("export", ExportConfig, {"source", "output_dir"}),  # the SOURCE argument; -o is shared with --check
    ("export", ConvertConfig, {"source", "output_dir"}),  # --from DIR is one of three modes; -o as above
    ("serve", ServeConfig, {"extra_args", "device"}),
    ("serve", BenchConfig, {"serve", "startup_timeout_s", "request_timeout_s", "offset", "max_prompt_tokens",
                            "device", "baseline"}),  # eagle run's bench sets these; the CLI keeps defaults
    ("target-server start", TargetServerConfig, {"extra_args"}),  # the arguments after `--`
]


def _cli_default(model, name):
    """The model's default as the CLI spells it (lists as comma-separated text, [] as no option)."""
    f = model.model_fields[name]
    if f.is_required():
        return None
    d = f.get_default(call_default_factory=True)
    if isinstance(d, (list, tuple)):
        return ",".join(map(str, d)) or None
    return d


@pytest.mark.parametrize("command,model,not_options", COMMANDS,
                         ids=[f"{c}-{m.__name__}" for c, m, _ in COMMANDS])
def test_cli_options_take_default_and_help_from_the_model(command, model, not_options):
    from eagle_tui.cli import app

    cmd = typer.main.get_group(app)
    for word in command.split():
        cmd = cmd.commands[word]
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
    assert checked >= 4


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


def test_bench_convert_and_target_server_settings_refuse_bad_values_naming_the_option(tmp_path):
    from core.serve_bench import load_eval_report

    serve = ServeConfig(target="t", draft="d")
    with pytest.raises(UsageError, match=r"^--bench-prompts: must be >= 1"):
        BenchConfig(serve=serve, num_prompts=0)
    with pytest.raises(UsageError, match=r"^--bench-tolerance: must be >= 0"):
        BenchConfig(serve=serve, tau_tolerance=-1)
    bc = BenchConfig(serve=serve)
    assert (bc.offset, bc.max_prompt_tokens) == (EvalConfig.default("offset"), EvalConfig.default("max_prompt_tokens"))
    assert bc.serve is serve  # measure_servers sets the device on the caller's ServeConfig
    bc.data, bc.offset, bc.num_prompts = "held.jsonl", 4, 8  # load_eval_report takes eval's selection
    assert (bc.data, bc.offset, bc.num_prompts) == ("held.jsonl", 4, 8)
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"settings": {"num_draft_tokens": 3, "data": "h.jsonl", "offset": 2,
                                               "num_prompts": 5, "max_new_tokens": 16, "max_prompt_tokens": 99},
                                  "summary": {"tau": 2.5}}))
    bc = BenchConfig(serve=serve, eval_report=str(report))
    assert load_eval_report(bc)["tau"] == 2.5
    assert (bc.data, bc.offset, bc.num_prompts, bc.max_new_tokens, bc.max_prompt_tokens) == ("h.jsonl", 2, 5, 16, 99)
    with pytest.raises(UsageError, match=r"^--dtype: 'int8' is not one of"):
        ConvertConfig(source="s", output_dir="o", dtype="int8")
    assert ConvertConfig.default("dtype") == ExportConfig.default("dtype")
    with pytest.raises(UsageError, match=r"^--backend: 'tgi' is not one of transformers, sglang, vllm"):
        TargetServerConfig(model="m", backend="tgi")
    with pytest.raises(UsageError, match=r"^--port: must be <= 65535"):
        TargetServerConfig(model="m", port=70000)
    # target-server start waits as long as regen's launch does, on the same device choices
    assert TargetServerConfig.default("ready_timeout") == RegenConfig.default("launch_ready_timeout")
    assert TargetServerConfig.model_fields["device"].annotation == RegenConfig.model_fields["launch_device"].annotation


def test_one_draft_vocab_rule_for_plan_tui_and_run(tmp_path, capsys):
    """No draft vocab size given: `eagle plan`, the TUI's budget, `eagle run`'s plan and the stages
    that build the vocab (cache, vocab, online training) all take core.settings.default_draft_vocab."""
    from core import budget
    from core.cache.build import get_vocab
    from core.events import NullSink
    from core.pipeline import train_config
    from core.settings import default_draft_vocab
    from core.step_budgets import step_budgets
    from eagle_tui.cli import main
    from eagle_tui.widgets import estimates

    assert (default_draft_vocab(49152), default_draft_vocab(128256), default_draft_vocab(5000)) == (8192, 32000, 5000)
    for model in (CacheConfig, VocabConfig, TrainConfig):  # None = the rule, everywhere
        assert model.default("draft_vocab_size") is None
        assert "default: 32000 for targets with more than 64000 ids, else 8192" in \
            model.model_fields["draft_vocab_size"].description
    cfg = RunConfig(workdir=str(tmp_path))
    assert cfg.vocab.draft_vocab_size is None
    for preset in ("smollm2-135m", "llama-3.1-8b"):
        shape = budget.TargetShape.resolve(preset)
        want = default_draft_vocab(shape.vocab_size)
        assert main(["plan", "--target", preset, "--samples", "10", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["draft_vocab_size"] == want  # eagle plan
        cfg.target.model = preset
        assert estimates._plan(budget, cfg, 10, None)[1] == want  # the TUI's panel
        plan = budget.make_plan(shape, 10)
        assert plan.draft_vocab_size == want
        ram = {b.step: b.ram_bytes for b in step_budgets(cfg, shape, 10)}  # eagle run --plan's budgets
        cfg.vocab.draft_vocab_size = want
        assert ram == {b.step: b.ram_bytes for b in step_budgets(cfg, shape, 10)}
        cfg.vocab.draft_vocab_size = None
    # eagle run hands None on; the stages resolve it with the same rule
    cfg.features.mode = "online"
    assert train_config(cfg, "target", resume=False).draft_vocab_size is None
    cc = CacheConfig(target="t", data="d", output_dir=str(tmp_path / "c"))
    vocab = get_vocab(cc, [(0, [1, 2, 3], [0, 1, 1])], "h", "tok", 49152, NullSink())
    assert vocab.draft_vocab_size == 8192
