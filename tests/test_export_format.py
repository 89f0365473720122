"""Export -> check -> reload -> identical logits; config facts of reference section 2; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import OutputExistsError, UsageError


def make_vocab(target_dir: Path, vd: int = 96):
    from core.vocab import build_vocab

    v = json.loads((Path(target_dir) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 50, (v,), generator=g)
    return build_vocab(counts, vd, v)


def make_draft(target_dir: Path, seed: int = 0, vd: int = 96):
    """A draft for the tiny target with random (non-default-init) weights."""
    from core.model import Eagle3Draft

    torch.manual_seed(seed)
    draft = Eagle3Draft.from_target(str(target_dir), make_vocab(target_dir, vd))
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return draft.eval()


def draft_logits(draft, seed: int = 3) -> torch.Tensor:
    cfg = draft.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, 7), generator=g)
    aux = torch.randn(1, 7, 3 * cfg.target_hidden_size, generator=g)
    with torch.no_grad():
        logits, hidden = draft.decode_step(ids, draft.project_aux(aux), torch.arange(7).unsqueeze(0), None)
    return logits


def write_draft_export(draft, out: Path, target_dir: Path | None = None, **kw) -> dict:
    from core.export.format import write_export

    target = {"name_or_path": str(target_dir)} if target_dir else {}
    return write_export(out, draft.config.to_dict(), draft.state_dict(), produced_by={"kind": "test"},
                        target=target, **kw)


def test_export_check_reload_identical_logits(tiny_target, tmp_path):
    from core.export import check_folder
    from core.model import Eagle3Draft

    draft = make_draft(tiny_target)
    out = tmp_path / "export"
    meta = write_draft_export(draft, out, tiny_target)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "eagle_export.json",
                                                     "manifest.json", "model.safetensors"]
    report = check_folder(out)
    assert report.ok and report.layout == "eagle-tui", report.problems
    again, info = Eagle3Draft.from_pretrained(out, with_info=True)
    meta2 = info.meta
    assert torch.equal(draft_logits(draft), draft_logits(again))
    assert torch.equal(again.d2t, draft.d2t) and torch.equal(again.t2d, draft.t2d)
    assert meta2["chat_template_sha256"] == meta["chat_template_sha256"] is not None
    from transformers import AutoTokenizer

    from core.vocab import chat_template_hash  # the hash the vocab / training side records

    assert meta["chat_template_sha256"] == chat_template_hash(AutoTokenizer.from_pretrained(tiny_target))


def test_config_json_follows_reference_section_2(tiny_target, tmp_path):
    from safetensors import safe_open

    draft = make_draft(tiny_target)
    write_draft_export(draft, tmp_path / "e", tiny_target)
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == draft.config.vocab_size and cfg["draft_vocab_size"] == 96
    assert cfg["rope_theta"] == 100000.0 and "rope_scaling" in cfg  # trained value, never 10000
    assert cfg["head_dim"] == 16 and cfg["num_key_value_heads"] == 2
    assert "target_hidden_size" not in cfg  # same as hidden_size
    # the tiny target has 4 layers: the default [1, N//2-1, N-4] = [1, 1, 0] is not three layers, so
    # the draft trains on [0, 1, 2]: SGLang gets them as is (it adds +1), vLLM gets +1 (as given)
    assert draft.config.aux_layer_ids == [0, 1, 2]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    with safe_open(str(tmp_path / "e" / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
    assert not any(k.startswith("model.") for k in keys)
    assert {"fc.weight", "midlayer.hidden_norm.weight", "lm_head.weight", "d2t", "t2d",
            "embed_tokens.weight"} <= keys


def test_default_aux_layers_are_omitted():
    from core.export.format import build_serving_config
    from core.export.spec import engine_aux_fields

    assert engine_aux_fields([1, 15, 28], 32)["default"]  # Llama-3.1-8B default
    cfg = dict(vocab_size=100, draft_vocab_size=10, hidden_size=8, intermediate_size=16,
               num_attention_heads=2, num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-5,
               max_position_embeddings=64, rope_theta=5e5, aux_layer_ids=[1, 15, 28],
               target_num_hidden_layers=32)
    out = build_serving_config(cfg, "bfloat16")
    assert "eagle_config" not in out and "eagle_aux_hidden_state_layer_ids" not in out
    with pytest.raises(UsageError, match="cannot be captured"):
        engine_aux_fields([1, 15, 31], 32)  # the last layer's output is never captured


def test_no_embed_and_speculators_format(tiny_target, tmp_path):
    from core.export import check_folder
    from core.export.speculators import write_speculators_export

    draft = make_draft(tiny_target)
    write_draft_export(draft, tmp_path / "noembed", include_embed=False)
    assert check_folder(tmp_path / "noembed").ok
    meta = write_speculators_export(tmp_path / "spec", draft.config.to_dict(), draft.state_dict(),
                                    produced_by={"kind": "test"},
                                    target={"name_or_path": str(tiny_target),
                                            "architectures": ["LlamaForCausalLM"]},
                                    speculative_tokens=4)
    cfg = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["norm_before_residual"] is False
    assert cfg["transformer_layer_config"]["num_hidden_layers"] == 1
    assert cfg["transformer_layer_config"]["rope_theta"] == 100000.0
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == str(tiny_target)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # vLLM convention
    report = check_folder(tmp_path / "spec")
    assert report.layout == "speculators" and report.ok, report.problems
    assert meta["aux_layer_ids"] == [0, 1, 2]


def test_refusals_write_nothing(tiny_target, tmp_path):
    from core.export.format import write_export

    draft = make_draft(tiny_target)
    bad = dict(draft.state_dict())
    bad["lm_head.weight"] = bad["lm_head.weight"][:50]  # rows != draft_vocab_size
    with pytest.raises(UsageError, match="lm_head rows"):
        write_export(tmp_path / "bad", draft.config.to_dict(), bad, produced_by={})
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))
    cfg = draft.config.to_dict()
    cfg["rope_theta"] = None
    with pytest.raises(UsageError, match="rope_theta"):
        write_export(tmp_path / "norope", cfg, draft.state_dict(), produced_by={})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(OutputExistsError):
        write_draft_export(draft, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def make_run(tiny_target: Path, run_dir: Path, step: int = 7):
    """A training run written with core.train's own checkpoint writer."""
    from core.manifest import Manifest
    from core.train.checkpoint import save_checkpoint, write_metrics_line, write_run_embeddings

    draft = make_draft(tiny_target, seed=5)
    state = {k: v for k, v in draft.state_dict().items()}
    run_dir.mkdir(parents=True)
    Manifest(kind="train", format_version=1, settings={},
             extra={"target": str(tiny_target)}).save(run_dir)
    write_run_embeddings(run_dir, draft.embed_tokens.weight)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad])
    save_checkpoint(run_dir, step, state, opt.state_dict(), {"epoch": 0}, draft.config.to_dict(), 2)
    write_metrics_line(run_dir, {"step": step, "split": "val", "tau_sim": 1.75})
    return draft


def test_export_run_via_cli(tiny_target, tmp_path, capsys):
    from core.model import Eagle3Draft
    from eagle_tui.cli import main

    draft = make_run(tiny_target, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "eagle_export.json").read_text())
    assert meta["produced_by"]["kind"] == "train" and meta["produced_by"]["step"] == 7
    assert meta["produced_by"]["tau_sim"] == 1.75
    assert meta["target"]["name_or_path"] == str(tiny_target) and meta["target"]["num_hidden_layers"] == 4
    again = Eagle3Draft.from_pretrained(tmp_path / "out")
    assert torch.equal(draft_logits(draft), draft_logits(again))
    assert main(["export", "--check", str(tmp_path / "out")]) == 0
    # again into the same folder: refused, exit 2
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 2
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "spec"),
                 "--format", "speculators"]) == 0
    assert json.loads((tmp_path / "spec" / "config.json").read_text())["speculators_model_type"] == "eagle3"
