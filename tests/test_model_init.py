"""Draft initialisation from the target's head (tied and untied targets, frozen or trainable) and
warm starts from existing drafts (our export, a run, and each format `eagle export --from` converts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import UsageError
from core.model import Eagle3Draft
from core.model.init import draft_target_ids, init_head_from_target, warm_start
from core.vocab import build_vocab
from test_export_convert import nemo_checkpoint, specforge_epoch, speculators_folder
from test_export_format import make_draft, make_vocab, write_draft_export


def _target_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in path.glob("*.safetensors") for k, v in load_file(str(f)).items()}


def _other_vocab(target_dir: Path, vd: int = 96):
    """A draft vocab that overlaps make_vocab's only partly (other token counts)."""
    v = json.loads((target_dir / "config.json").read_text())["vocab_size"]
    counts = torch.randint(0, 50, (v,), generator=torch.Generator().manual_seed(7))
    return build_vocab(counts, vd, v)


def test_head_from_a_tied_target_copies_embedding_rows_and_final_norm(tiny_target):
    draft = Eagle3Draft.from_target(str(tiny_target), make_vocab(tiny_target))
    info = init_head_from_target(draft, tiny_target)
    t = _target_tensors(tiny_target)
    assert "lm_head.weight" not in t  # tied: the embeddings are the head
    ids = draft_target_ids(draft)
    assert torch.equal(draft.lm_head.weight, t["model.embed_tokens.weight"][ids])
    assert torch.equal(draft.norm.weight, t["model.norm.weight"])
    assert info == {"head_init": "target", "head_source": "tied input embeddings", "head_frozen": False}
    assert draft.lm_head.weight.requires_grad


def test_head_from_an_untied_target_copies_its_output_head_rows(tmp_path, tiny_target):
    import shutil

    from conftest import build_tiny_llama

    untied = tmp_path / "untied"
    shutil.copytree(tiny_target, untied)
    for f in untied.glob("*.safetensors"):
        f.unlink()
    v = json.loads((tiny_target / "config.json").read_text())["vocab_size"]
    build_tiny_llama(untied, vocab_size=v, seed=5, tie_word_embeddings=False)
    t = _target_tensors(untied)
    assert not torch.equal(t["lm_head.weight"], t["model.embed_tokens.weight"])
    draft = Eagle3Draft.from_target(str(untied), make_vocab(untied))
    info = init_head_from_target(draft, untied, freeze=True)
    assert torch.equal(draft.lm_head.weight, t["lm_head.weight"][draft_target_ids(draft)])
    assert info["head_source"] == "output head" and info["head_frozen"] is True
    assert not draft.lm_head.weight.requires_grad and not draft.norm.weight.requires_grad


def test_frozen_head_stays_fixed_through_training(tiny_target, tmp_path):
    from core.train import train
    from tests.train_support import draft_weights, tiny_cfg, write_conversations

    data = write_conversations(tmp_path / "c.jsonl", n=16)
    res = train(tiny_cfg(tiny_target, data, tmp_path / "run", max_steps=3, save_every=3,
                         head_init="target", freeze_head=True))
    w = draft_weights(Path(res.checkpoint))
    t = _target_tensors(tiny_target)
    vocab = json.loads((tmp_path / "run" / "manifest.json").read_text())["extra"]
    assert vocab["head_init"] == "target" and vocab["head_frozen"] is True
    ids = torch.arange(w["d2t"].numel()) + w["d2t"]
    assert torch.equal(w["lm_head.weight"], t["model.embed_tokens.weight"][ids])
    assert torch.equal(w["norm.weight"], t["model.norm.weight"])
    assert not torch.equal(w["fc.weight"], torch.zeros_like(w["fc.weight"]))


def _check_warm(draft_src, out: Path, tiny_target: Path):
    fresh = Eagle3Draft.from_target(str(tiny_target), _other_vocab(tiny_target))
    before = fresh.lm_head.weight.detach().clone()
    info = warm_start(fresh, out)
    src = draft_src.state_dict()
    for k, v in fresh.state_dict().items():
        if k not in ("lm_head.weight", "d2t", "t2d", "embed_tokens.weight"):
            assert torch.equal(v, src[k]), k
    # lm_head rows follow the target token id; rows the source lacks keep their init
    src_row = {int(t): i for i, t in enumerate(draft_target_ids(draft_src).tolist())}
    matched = 0
    for j, t in enumerate(draft_target_ids(fresh).tolist()):
        want = src["lm_head.weight"][src_row[t]] if t in src_row else before[j]
        assert torch.equal(fresh.lm_head.weight[j], want)
        matched += t in src_row
    assert 0 < matched < fresh.d2t.numel() and info["vocab_rows_matched"] == matched


@pytest.mark.parametrize("layout", ["ours", "nemo", "specforge", "speculators"])
def test_warm_start_from_each_converted_format(layout, tiny_target, tmp_path):
    from core.export import ConvertConfig, convert_checkpoint

    src = make_draft(tiny_target, seed=11)
    out = tmp_path / "out"
    if layout == "ours":
        write_draft_export(src, out, tiny_target)
    else:
        raw = {"nemo": lambda: nemo_checkpoint(tmp_path / "nemo", src, tiny_target),
               "specforge": lambda: specforge_epoch(tmp_path / "sf", src),
               "speculators": lambda: speculators_folder(tmp_path / "sp", src)}[layout]()
        if layout == "nemo":  # an unconverted folder is refused with the command that converts it
            with pytest.raises(UsageError, match="eagle export --from"):
                warm_start(Eagle3Draft.from_target(str(tiny_target), make_vocab(tiny_target)), raw)
        convert_checkpoint(ConvertConfig(source=str(raw), output_dir=str(out), target=str(tiny_target)))
    _check_warm(src, out, tiny_target)


def test_warm_start_refuses_another_target(tiny_target, tmp_path):
    src = make_draft(tiny_target, seed=11)
    write_draft_export(src, tmp_path / "out", tiny_target)
    from conftest import build_tiny_llama, build_tiny_tokenizer

    other = tmp_path / "other"
    tok = build_tiny_tokenizer(other)
    build_tiny_llama(other, vocab_size=len(tok), hidden_size=32, intermediate_size=64, head_dim=8)
    fresh = Eagle3Draft.from_target(str(other), make_vocab(other))
    with pytest.raises(UsageError, match="shape"):
        warm_start(fresh, tmp_path / "out")


@pytest.mark.slow
def test_train_init_from_an_export_continues_from_its_weights(tiny_target, tmp_path):
    from core.train import train
    from tests.train_support import tiny_cfg, write_conversations

    src = make_draft(tiny_target, seed=11)
    write_draft_export(src, tmp_path / "export", tiny_target)
    data = write_conversations(tmp_path / "c.jsonl", n=16)
    train(tiny_cfg(tiny_target, data, tmp_path / "run", max_steps=1, save_every=1, lr=1e-9,
                   init_from=str(tmp_path / "export")))
    extra = json.loads((tmp_path / "run" / "manifest.json").read_text())["extra"]
    assert extra["init_from"] == str(tmp_path / "export") and extra["vocab_rows_matched"] > 0
    w = load_file(str(tmp_path / "run" / "checkpoints" / "step-1" / "draft.safetensors"))
    assert torch.allclose(w["fc.weight"], src.fc.weight, atol=1e-6)  # lr 1e-9: one step barely moves it
