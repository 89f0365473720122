"""Speculators-format exports: re-exporting one (`eagle export SPEC_DIR --output DIR`) gives the
same draft as exporting the run directly, in either format; a speculator with norm_before_residual
true is refused (its math is not ours); `eagle export --check` and `eagle serve` catch aux layer ids
that make vLLM capture other layers than the draft trained on (tests/test_engine_exports.py
measures what that costs in vLLM)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from core.errors import UsageError


def test_reexport_from_speculators_equals_the_direct_export(tiny_target, tmp_path):
    from safetensors.torch import load_file
    from test_export_format import make_run

    from core.export import ExportConfig, check_folder, export_draft

    make_run(tiny_target, tmp_path / "run")
    direct = tmp_path / "direct"
    spec = tmp_path / "spec"
    export_draft(ExportConfig(source=str(tmp_path / "run"), output_dir=str(direct)))
    export_draft(ExportConfig(source=str(tmp_path / "run"), output_dir=str(spec), format="speculators"))
    back = tmp_path / "back"
    meta = export_draft(ExportConfig(source=str(spec), output_dir=str(back))).meta
    assert check_folder(back).ok and meta["produced_by"]["kind"] == "re-export"
    want, got = load_file(str(direct / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    skip = {"torch_dtype"}
    cfg_direct = json.loads((direct / "config.json").read_text())
    cfg_back = json.loads((back / "config.json").read_text())
    assert {k: v for k, v in cfg_back.items() if k not in skip} == \
        {k: v for k, v in cfg_direct.items() if k not in skip}
    assert meta["aux_layer_ids"] == [0, 1, 2]  # the tiny target's non-default layers survive
    # speculators -> speculators (another dtype) keeps the config and the layer names
    half = tmp_path / "half"
    export_draft(ExportConfig(source=str(spec), output_dir=str(half), format="speculators", dtype="bfloat16"))
    c_half, c_spec = (json.loads((d / "config.json").read_text()) for d in (half, spec))
    assert c_half["eagle_aux_hidden_state_layer_ids"] == c_spec["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert c_half["norm_before_residual"] is False and check_folder(half).ok
    w = load_file(str(half / "model.safetensors"))
    assert w["layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_reexport_refuses_norm_before_residual(tiny_target, tmp_path):
    from test_export_format import make_run

    from core.export import ExportConfig, export_draft

    make_run(tiny_target, tmp_path / "run")
    spec = tmp_path / "spec"
    export_draft(ExportConfig(source=str(tmp_path / "run"), output_dir=str(spec), format="speculators"))
    third = tmp_path / "third"  # a third party's speculator trained with the residual after the norm
    shutil.copytree(spec, third)
    (third / "eagle_export.json").unlink()
    cfg = json.loads((third / "config.json").read_text())
    (third / "config.json").write_text(json.dumps({**cfg, "norm_before_residual": True}))
    with pytest.raises(UsageError, match="norm_before_residual"):
        export_draft(ExportConfig(source=str(third), output_dir=str(tmp_path / "out"), target=str(tiny_target)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ids", [[0, 1, 2], None])  # SGLang's ids in vLLM's field; the field left out
def test_speculators_aux_ids_other_than_trained_are_caught(tiny_target, tmp_path, ids):
    from test_export_format import make_run

    from core.export import ExportConfig, check_folder, export_draft
    from core.serve import ServeConfig, plan

    make_run(tiny_target, tmp_path / "run")
    spec = tmp_path / "spec"
    export_draft(ExportConfig(source=str(tmp_path / "run"), output_dir=str(spec), format="speculators"))
    assert check_folder(spec).ok
    cfg = json.loads((spec / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # trained on outputs [0, 1, 2]
    cfg["eagle_aux_hidden_state_layer_ids"] = ids
    (spec / "config.json").write_text(json.dumps(cfg))
    errors = [q for q in check_folder(spec).problems if q.severity == "error"]
    assert [q.code for q in errors] == ["aux_layers_mismatch"] and "[1, 2, 3]" in errors[0].message
    with pytest.raises(UsageError, match="aux_layers_mismatch"):
        plan(ServeConfig(target=str(tiny_target), draft=str(spec), engine="vllm"))
