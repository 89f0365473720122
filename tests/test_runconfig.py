"""The YAML schema shared by `eagle run`, `eagle demo` and the TUI."""

import pytest

from core.errors import InputDataError, UsageError
from core.runconfig import RunConfig


def test_defaults_round_trip(tmp_path):
    cfg = RunConfig()
    cfg.regen.enabled = False
    cfg.features.mode = "online"
    cfg.features.aux_layers = [1, 3, 5]
    cfg.save(tmp_path / "c.yaml")
    back = RunConfig.load(tmp_path / "c.yaml")
    assert back == cfg
    assert back.enabled_steps() == ["train", "eval", "export"]


def test_relative_paths_follow_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("workdir: work\ntrain:\n  output_dir: myrun\n")
    cfg = RunConfig.load(tmp_path / "sub" / "c.yaml")
    assert cfg.step_output_dir("train") == tmp_path / "sub" / "work" / "myrun"
    assert cfg.step_output_dir("cache") == tmp_path / "sub" / "work" / "cache"


@pytest.mark.parametrize("text, needle", [
    ("regen:\n  concurency: 3\n", "unknown field regen.concurency (did you mean regen.concurrency?)"),
    ("train:\n  lr: fast\n", "field train.lr: expected a number"),
    ("features:\n  mode: disk\n", "features.mode: 'disk' is not one of offline, online"),
    ("serve:\n  num_steps: 3\n  num_draft_tokens: 3\n", "with topk 1 it must be num_steps + 1 = 4"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("regen: [1\n", "not valid YAML"),
])
def test_bad_configs_name_the_field(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(UsageError) as e:
        RunConfig.load(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value) or isinstance(e.value, UsageError)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputDataError, match="config file not found"):
        RunConfig.load(tmp_path / "nope.yaml")
