"""`eagle export --from`: NeMo Automodel, SpecForge and speculators folders -> validated serving format.

The fixture folders mirror the layouts in those projects' public code (see core/export/convert.py):
file names, key names, the inherited config, eagle_meta.pt contents, SpecForge's pickled
training_state.pt (which must never be read).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.errors import UsageError
from test_export_format import draft_logits, make_draft


@pytest.fixture(scope="module")
def draft(tiny_target):
    return make_draft(tiny_target, seed=11)


def _target_cfg(tiny_target: Path) -> dict:
    return json.loads((tiny_target / "config.json").read_text())


def nemo_checkpoint(root: Path, draft, tiny_target: Path) -> Path:
    """epoch_0_step_40/{model/consolidated/..., eagle_meta.pt}: target config copied (4 layers,
    transformers-5 rope_parameters), model.* keys, vocab map only in eagle_meta.pt."""
    ck = root / "epoch_0_step_40"
    cons = ck / "model" / "consolidated"
    cons.mkdir(parents=True)
    cfg = _target_cfg(tiny_target)
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    cfg["architectures"] = ["LlamaEagle3DraftModel"]
    cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}  # non-default for 4 layers
    (cons / "config.json").write_text(json.dumps(cfg))
    sd = draft.state_dict()
    tensors = {("lm_head.weight" if k == "lm_head.weight" else "model." + k.replace("midlayer.", "layers.0.")): v
               for k, v in sd.items() if k not in ("d2t", "t2d")}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(cons / "model-00001-of-00001.safetensors"))
    (cons / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}))
    sel = draft.d2t + torch.arange(draft.d2t.numel())
    torch.save({"global_step": 40, "epoch": 0, "selected_token_ids": sel, "selected_token_mask": draft.t2d},
               ck / "eagle_meta.pt")
    return ck


def specforge_epoch(root: Path, draft) -> Path:
    """epoch_2/: LlamaForCausalLMEagle3 config, midlayer.* keys without embeddings, d2t/t2d buffers."""
    ep = root / "epoch_2"
    ep.mkdir(parents=True)
    c = draft.config
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
           "num_hidden_layers": 1, "max_position_embeddings": 2048, "rms_norm_eps": c.rms_norm_eps,
           "tie_word_embeddings": False, "vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size,
           "rope_theta": 100000.0, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]},
           "torch_dtype": "float32"}
    (ep / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in draft.state_dict().items() if "embed" not in k},
              str(ep / "model.safetensors"))
    (ep / "training_state.pt").write_bytes(b"\x80\x04 a pickle that must never be loaded")
    return ep


def speculators_folder(root: Path, draft, nbr=False) -> Path:
    out = root / "speculator"
    out.mkdir(parents=True)
    c = draft.config
    layer = {"model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
             "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
             "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
             "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": 100000.0,
             "max_position_embeddings": 2048, "hidden_act": "silu", "tie_word_embeddings": False}
    cfg = {"speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"],
           "transformer_layer_config": layer, "draft_vocab_size": c.draft_vocab_size,
           "norm_before_residual": nbr, "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
           "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                  "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                                  "verifier": {"name_or_path": "tiny", "architectures": ["LlamaForCausalLM"]}}}
    (out / "config.json").write_text(json.dumps(cfg))
    save_file({k.replace("midlayer.", "layers.0."): v.contiguous() for k, v in draft.state_dict().items()},
              str(out / "model.safetensors"))
    return out


def _reload_equal(out: Path, draft) -> None:
    from core.export import check_folder
    from core.model import Eagle3Draft

    rep = check_folder(out)
    assert rep.ok, rep.problems
    again, info = Eagle3Draft.from_pretrained(out, with_info=True)
    cfg = info.serving_config
    assert cfg["num_hidden_layers"] == 1 and cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert torch.equal(draft_logits(draft), draft_logits(again))
    assert torch.equal(again.d2t, draft.d2t)


def test_convert_nemo(draft, tiny_target, tmp_path, capsys):
    from eagle_tui.cli import main

    ck = nemo_checkpoint(tmp_path / "nemo", draft, tiny_target)
    assert main(["export", "--check", str(ck)]) == 1  # the raw checkpoint does not serve
    capsys.readouterr()
    assert main(["export", "--from", str(ck), "--output", str(tmp_path / "out"),
                 "--target", str(tiny_target)]) == 0
    out = capsys.readouterr().out
    assert "nemo" in out and "num_hidden_layers 4 -> 1" in out and "eagle_meta.pt" in out
    _reload_equal(tmp_path / "out", draft)
    meta = json.loads((tmp_path / "out" / "eagle_export.json").read_text())
    assert meta["produced_by"]["step"] == 40 and meta["produced_by"]["source_layout"] == "nemo"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0  # moved out of rope_parameters


def test_convert_nemo_inner_model_dir_too(draft, tiny_target, tmp_path):
    from core.export import ConvertConfig, convert_checkpoint

    ck = nemo_checkpoint(tmp_path / "nemo", draft, tiny_target)
    res = convert_checkpoint(ConvertConfig(source=str(ck / "model" / "consolidated"),
                                           output_dir=str(tmp_path / "out"), target=str(tiny_target)))
    assert res.source_layout == "nemo"
    _reload_equal(tmp_path / "out", draft)


def test_convert_specforge_takes_embeddings_from_target(draft, tiny_target, tmp_path):
    from core.export import ConvertConfig, convert_checkpoint

    ep = specforge_epoch(tmp_path / "sf", draft)
    res = convert_checkpoint(ConvertConfig(source=str(ep), output_dir=str(tmp_path / "out"),
                                           target=str(tiny_target)))
    assert res.source_layout == "specforge"
    assert any("embed_tokens copied from the target" in f for f in res.fixes)
    assert any("vLLM" not in f for f in res.fixes)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # vLLM field added
    _reload_equal(tmp_path / "out", draft)
    # without the target: embeddings omitted (engines share the target's), still a valid export
    res2 = convert_checkpoint(ConvertConfig(source=str(ep), output_dir=str(tmp_path / "out2"),
                                            target=str(tiny_target), include_embed=False))
    assert not res2.meta["embed_tokens_included"]


def test_convert_speculators(draft, tiny_target, tmp_path):
    from core.export import ConvertConfig, convert_checkpoint

    sp = speculators_folder(tmp_path / "s", draft)
    res = convert_checkpoint(ConvertConfig(source=str(sp), output_dir=str(tmp_path / "out"),
                                           target=str(tiny_target)))
    assert res.source_layout == "speculators"
    assert json.loads((tmp_path / "out" / "eagle_export.json").read_text())["aux_layer_ids"] == [0, 1, 2]
    _reload_equal(tmp_path / "out", draft)


def test_convert_refusals(draft, tiny_target, tmp_path):
    from core.export import ConvertConfig, convert_checkpoint

    sp = speculators_folder(tmp_path / "nbr", draft, nbr=True)
    with pytest.raises(UsageError, match="norm_before_residual"):
        convert_checkpoint(ConvertConfig(source=str(sp), output_dir=str(tmp_path / "o1")))
    ep = specforge_epoch(tmp_path / "pe", draft)
    save_file({**{k: v.contiguous() for k, v in draft.state_dict().items() if "embed" not in k},
               "mask_hidden": torch.zeros(1, 192)}, str(ep / "model.safetensors"))
    with pytest.raises(UsageError, match="P-EAGLE") as e:
        convert_checkpoint(ConvertConfig(source=str(ep), output_dir=str(tmp_path / "o2")))
    assert "parallel_drafting" in str(e.value)
    ep2 = specforge_epoch(tmp_path / "nr", draft)
    cfg = json.loads((ep2 / "config.json").read_text())
    cfg.pop("rope_theta")
    cfg.pop("eagle_config")  # default aux layers: no target needed to read them
    (ep2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="rope_theta"):
        convert_checkpoint(ConvertConfig(source=str(ep2), output_dir=str(tmp_path / "o3")))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    # --rope-theta supplies it
    res = convert_checkpoint(ConvertConfig(source=str(ep2), output_dir=str(tmp_path / "o4"),
                                           rope_theta=100000.0))
    assert any("--rope-theta" in f for f in res.fixes)
    # with the 4-layer target known, "default" aux layers are not three layers: refused, explained
    with pytest.raises(UsageError, match="not three distinct layers"):
        convert_checkpoint(ConvertConfig(source=str(ep2), output_dir=str(tmp_path / "o5"),
                                         target=str(tiny_target)))
