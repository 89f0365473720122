"""`eagle export --check` catches each defect of a crafted folder, and explains it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_export_format import make_draft


@pytest.fixture(scope="module")
def good(tiny_target):
    """(config.json dict, tensors) of a correct third-party-style folder (no eagle_export.json)."""
    from core.export.format import build_serving_config

    draft = make_draft(tiny_target)
    cfg = build_serving_config(draft.config.to_dict(), "float32")
    return cfg, {k: v.clone() for k, v in draft.state_dict().items()}


def craft(root: Path, cfg: dict, tensors: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "model.safetensors"))
    return root


def codes(path: Path) -> set[str]:
    from core.export import check_folder

    return {p.code for p in check_folder(path).problems if p.severity == "error"}


def test_clean_folder_passes(good, tmp_path, capsys):
    from eagle_tui.cli import main

    craft(tmp_path / "ok", *good)
    assert codes(tmp_path / "ok") == set()
    assert main(["export", "--check", str(tmp_path / "ok")]) == 0
    assert "0 error(s)" in capsys.readouterr().out


def _renamed(tensors: dict, fn) -> dict:
    return {fn(k): v for k, v in tensors.items()}


CASES = {
    "nemo_keys": (lambda c: c, lambda t: _renamed(t, lambda k: "lm_head.weight" if k == "lm_head.weight"
                                                  else "model." + k.replace("midlayer.", "layers.0.")),
                  {"model_prefix", "layers_0_keys"}),
    "inherited_layers": (lambda c: {**c, "num_hidden_layers": 32}, lambda t: t, {"num_hidden_layers"}),
    "tied_head": (lambda c: {**c, "tie_word_embeddings": True}, lambda t: t, {"tied_head"}),
    "missing_lm_head": (lambda c: c, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"},
                        {"lm_head_missing"}),
    "lm_head_rows": (lambda c: c, lambda t: {**t, "lm_head.weight": t["lm_head.weight"][:40]}, {"shape"}),
    "d2t_out_of_vocab": (lambda c: c, lambda t: {**t, "d2t": t["d2t"] + 10_000}, {"d2t_range"}),
    "missing_d2t": (lambda c: c, lambda t: {k: v for k, v in t.items() if k != "d2t"}, {"d2t_missing"}),
    "wrong_shape": (lambda c: {**c, "intermediate_size": 96}, lambda t: t, {"shape"}),
    "missing_rope_theta": (lambda c: {k: v for k, v in c.items() if k != "rope_theta"}, lambda t: t,
                           {"rope_theta_missing"}),
    "rope_parameters_only": (lambda c: {**{k: v for k, v in c.items() if k != "rope_theta"},
                                        "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}},
                             lambda t: t, {"rope_parameters_only"}),
    "unknown_keys": (lambda c: c, lambda t: {**{("midlayer.attn." + k.split("self_attn.")[1]
                                                 if "self_attn." in k else k): v for k, v in t.items()}},
                     {"unknown_keys", "missing_keys"}),
    "p_eagle_tensor": (lambda c: c, lambda t: {**t, "mask_hidden": torch.zeros(1, 192)}, {"p_eagle"}),
    "p_eagle_config": (lambda c: {**c, "parallel_drafting": True, "ptd_token_id": 5}, lambda t: t,
                       {"p_eagle"}),
    "missing_draft_vocab_size": (lambda c: {k: v for k, v in c.items() if k != "draft_vocab_size"},
                                 lambda t: t, {"draft_vocab_size", "shape"}),
    "aux_only_sglang_field": (lambda c: {k: v for k, v in c.items() if k != "eagle_aux_hidden_state_layer_ids"},
                              lambda t: t, {"aux_layers_vllm"}),
    "aux_fields_disagree": (lambda c: {**c, "eagle_aux_hidden_state_layer_ids": [0, 1, 2]}, lambda t: t,
                            {"aux_layers_disagree"}),
    "wrong_architecture": (lambda c: {**c, "architectures": ["LlamaEagle3DraftModel"]}, lambda t: t,
                           {"architectures"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_defect_is_caught(case, good, tmp_path):
    cfg_fn, t_fn, expected = CASES[case]
    folder = craft(tmp_path / case, cfg_fn(dict(good[0])), t_fn(dict(good[1])))
    found = codes(folder)
    assert expected <= found, (case, found)
    # and nothing unrelated is reported
    assert found - expected <= {"missing_keys", "shape", "unknown_keys"}, (case, found)


def test_check_json_and_exit_code(good, tmp_path, capsys):
    from eagle_tui.cli import main

    cfg, t = good
    folder = craft(tmp_path / "nemo", {**cfg, "num_hidden_layers": 32},
                   _renamed(t, lambda k: k if k == "lm_head.weight" else "model." + k.replace("midlayer.", "layers.0.")))
    assert main(["export", "--check", str(folder), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is False and rep["errors"] >= 3
    by = {p["code"]: p for p in rep["problems"]}
    assert "random weights" in by["layers_0_keys"]["message"] and "--from" in by["layers_0_keys"]["fix"]
    assert "32" in by["num_hidden_layers"]["message"]
    assert main(["export", "--check", str(folder)]) == 1
    human = capsys.readouterr().out
    assert "[error] num_hidden_layers" in human and "fix:" in human


def test_nemo_checkpoint_and_pickles_and_runs(good, tmp_path):
    from core.export import check_folder

    nemo = tmp_path / "epoch_0_step_10"
    craft(nemo / "model" / "consolidated", *good)
    rep = check_folder(nemo)
    assert rep.layout == "nemo" and "training_checkpoint" in {p.code for p in rep.problems}
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text(json.dumps(good[0]))
    (pick / "pytorch_model.bin").write_bytes(b"not read")
    assert {p.code for p in check_folder(pick).problems} == {"no_safetensors"}
    (tmp_path / "empty").mkdir()
    assert {p.code for p in check_folder(tmp_path / "empty").problems} == {"no_config"}


def test_speculators_folder_checks(good, tmp_path):
    cfg, t = good
    layer = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                 "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                                 "max_position_embeddings", "hidden_act")}
    spec = {"speculators_model_type": "eagle3", "transformer_layer_config": {**layer, "model_type": "llama",
                                                                             "num_hidden_layers": 1},
            "draft_vocab_size": cfg["draft_vocab_size"],
            "speculators_config": {"proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                                   "verifier": {"name_or_path": "org/target"}}}
    tensors = _renamed(t, lambda k: k.replace("midlayer.", "layers.0."))
    folder = craft(tmp_path / "spec", spec, tensors)
    assert codes(folder) == {"norm_before_residual_missing"}
    folder2 = craft(tmp_path / "spec2", {**spec, "norm_before_residual": False}, tensors)
    assert codes(folder2) == set()
    folder3 = craft(tmp_path / "peagle", {**spec, "norm_before_residual": False,
                                          "speculators_model_type": "peagle"}, tensors)
    assert "p_eagle" in codes(folder3)
