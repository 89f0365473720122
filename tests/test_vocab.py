"""Draft vocabulary: selection, d2t/t2d mapping properties, persistence, fingerprints, `eagle vocab`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import CorruptDataError, InputDataError, SettingsMismatchError, UsageError
from core.vocab import build_vocab, count_tokens, load_token_counts, load_vocab
from feature_support import write_conversations

counts_strategy = st.integers(2, 60).flatmap(
    lambda V: st.tuples(st.lists(st.integers(0, 5), min_size=V, max_size=V), st.integers(1, V)))


@settings(max_examples=200, deadline=None)
@given(counts_strategy)
def test_mapping_properties(case):
    counts_list, Vd = case
    V = len(counts_list)
    if sum(counts_list) == 0:
        counts_list[0] = 1
    counts = torch.tensor(counts_list)
    v = build_vocab(counts, Vd, V)
    sel = v.selected
    assert sel.dtype == torch.int64 and v.d2t.dtype == torch.int64 and v.t2d.dtype == torch.bool
    assert sel.numel() == Vd and int(v.t2d.sum()) == Vd
    assert bool((sel[1:] > sel[:-1]).all()), "selected must be strictly ascending"
    targets = torch.arange(Vd) + v.d2t  # the engines' reading of d2t
    assert torch.equal(targets, sel) and int(targets.min()) >= 0 and int(targets.max()) < V
    assert torch.equal(v.t2d, torch.isin(torch.arange(V), sel))
    # round trip target -> draft -> target on the draft vocab; -1 outside it
    d = v.target_to_draft(torch.arange(V))
    assert torch.equal(d >= 0, v.t2d)
    assert torch.equal(v.draft_to_target(d[v.t2d]), torch.arange(V)[v.t2d])
    assert torch.equal(v.draft_to_target(torch.arange(Vd)), sel)
    # top-Vd by count, ties to the lower id: reference ordering by (-count, id)
    ref = sorted(range(V), key=lambda i: (-counts_list[i], i))[:Vd]
    assert sel.tolist() == sorted(ref)
    # every selected id has a count >= every unselected id
    if Vd < V:
        assert int(counts[sel].min()) >= int(counts[~v.t2d].max())
    assert v.coverage == pytest.approx(float(counts[sel].sum()) / float(counts.sum()))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=5, max_size=40), st.randoms(use_true_random=False))
def test_tie_break_is_deterministic_and_independent_of_sample_order(counts_list, rnd):
    V = len(counts_list)
    counts_list[0] += 1
    samples = [[i] * c for i, c in enumerate(counts_list) if c]
    shuffled = samples[:]
    rnd.shuffle(shuffled)
    a = build_vocab([(s, [1] * len(s)) for s in samples], 3, V)
    b = build_vocab([(s, [1] * len(s)) for s in shuffled], 3, V)
    assert torch.equal(a.selected, b.selected) and torch.equal(a.counts, b.counts)


def test_padding_with_lowest_unused_ids_and_loss_mask_respected():
    V = 10
    samples = [([7, 7, 3, 9, 5], [1, 1, 1, 0, 0])]  # 9 and 5 are unsupervised
    v = build_vocab(samples, 4, V)
    assert int(v.counts[9]) == 0 and int(v.counts[7]) == 2
    assert v.selected.tolist() == [0, 1, 3, 7]  # 7, 3 seen; padded with lowest unused 0, 1
    assert v.d2t.tolist() == [0, 0, 1, 4]
    assert v.coverage == 1.0


def test_counts_validation_errors():
    with pytest.raises(InputDataError, match="outside the target vocab"):
        count_tokens([([1, 12], [1, 1])], 10, where="d.jsonl")
    with pytest.raises(InputDataError, match="row 0"):
        count_tokens([([1, 2], [1])], 10)
    with pytest.raises(UsageError, match="must be in"):
        build_vocab(torch.ones(10, dtype=torch.long), 11)
    with pytest.raises(InputDataError, match="no supervised tokens"):
        build_vocab([([1, 2], [0, 0])], 2, 10)
    with pytest.raises(UsageError, match="cover 9 ids"):
        build_vocab(torch.ones(9, dtype=torch.long), 4, 10)


def test_save_load_round_trip_and_fingerprint_refusal(tmp_path):
    v = build_vocab(torch.tensor([5, 0, 3, 3, 1, 0, 9]), 3, 7,
                    source={"data": "abc", "tokenizer": "tok1"})
    v.save(tmp_path, npy=True)
    w = load_vocab(tmp_path, expect={"data": "abc", "tokenizer": "tok1", "draft_vocab_size": 3})
    for name in ("selected", "d2t", "t2d", "counts"):
        assert torch.equal(getattr(v, name), getattr(w, name))
    assert w.coverage == v.coverage and w.fingerprint == v.fingerprint
    assert np.array_equal(np.load(tmp_path / "d2t.npy"), v.d2t.numpy())
    assert np.load(tmp_path / "t2d.npy").dtype == np.bool_
    meta = json.loads((tmp_path / "vocab.json").read_text())
    assert meta["target_vocab_size"] == 7 and meta["draft_vocab_size"] == 3
    with pytest.raises(SettingsMismatchError, match="data") as e:
        load_vocab(tmp_path, expect={"data": "other", "tokenizer": "tok1"})
    assert "on disk 'abc'" in str(e.value)
    with pytest.raises(SettingsMismatchError, match="draft_vocab_size"):
        load_vocab(tmp_path, expect={"draft_vocab_size": 4})
    with pytest.raises(SettingsMismatchError, match="tokenizer"):
        load_vocab(tmp_path, expect={"tokenizer": "tok2"})


def test_tampered_vocab_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    v = build_vocab(torch.tensor([5, 0, 3, 3, 1, 0, 9]), 3, 7)
    v.save(tmp_path)
    t = load_file(str(tmp_path / "vocab.safetensors"))
    t["d2t"][0] += 1
    save_file(t, str(tmp_path / "vocab.safetensors"))
    with pytest.raises(CorruptDataError, match="inconsistent"):
        load_vocab(tmp_path)


def test_token_count_files(tmp_path):
    counts = torch.tensor([0, 4, 2, 0, 7])
    np.save(tmp_path / "c.npy", counts.numpy())
    (tmp_path / "c.json").write_text(json.dumps({"1": 4, "2": 2, "4": 7}))
    (tmp_path / "l.json").write_text(json.dumps([0, 4, 2, 0, 7]))
    assert torch.equal(load_token_counts(tmp_path / "c.npy"), counts)
    assert torch.equal(load_token_counts(tmp_path / "c.json", 5), counts)
    assert torch.equal(load_token_counts(tmp_path / "l.json"), counts)
    with pytest.raises(InputDataError, match="outside the target vocab"):
        load_token_counts(tmp_path / "c.json", 4)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputDataError, match="bad.json"):
        load_token_counts(tmp_path / "bad.json")
    with pytest.raises(InputDataError, match="unknown token-frequency format"):
        (tmp_path / "x.txt").write_text("1 2 3")
        load_token_counts(tmp_path / "x.txt")


def test_eagle_vocab_from_dataset_and_from_counts(tiny_target, tmp_path, capsys):
    from eagle_tui.cli import main

    data = write_conversations(tmp_path / "convs.jsonl", 12)
    out = tmp_path / "vocab"
    rc = main(["vocab", "--target", str(tiny_target), "--data", str(data), "--draft-vocab-size", "32",
               "--output", str(out), "--max-length", "128"])
    assert rc == 0
    assert "coverage" in capsys.readouterr().out
    v = load_vocab(out)
    assert v.draft_vocab_size == 32 and v.target_vocab_size == v.t2d.numel()
    assert 0.0 < v.coverage <= 1.0
    for f in ("vocab.safetensors", "d2t.npy", "t2d.npy", "vocab.json", "manifest.json"):
        assert (out / f).exists()
    # the counts match an independent count over the tokenized dataset
    from transformers import AutoTokenizer

    from core.tokenize import tokenize_conversation

    tok = AutoTokenizer.from_pretrained(tiny_target)
    ref = torch.zeros(v.target_vocab_size, dtype=torch.long)
    for line in data.read_text().splitlines():
        tc = tokenize_conversation(tok, json.loads(line)["messages"], 128)
        for i, m in zip(tc.input_ids, tc.loss_mask):
            ref[i] += m
    assert torch.equal(v.counts, ref)

    # again into the same folder: refused without --resume (exit 2, one line)
    rc = main(["vocab", "--target", str(tiny_target), "--data", str(data), "--draft-vocab-size", "32",
               "--output", str(out), "--max-length", "128"])
    assert rc == 2 and "already holds" in capsys.readouterr().err

    # from the saved counts: same selection
    out2 = tmp_path / "vocab2"
    rc = main(["vocab", "--target", str(tiny_target), "--token-freq", str(out / "vocab.safetensors"),
               "--draft-vocab-size", "32", "--output", str(out2)])
    assert rc == 0
    assert torch.equal(load_vocab(out2).selected, v.selected)

    # a counts file of another vocab size is refused, naming the file and both sizes
    np.save(tmp_path / "short.npy", np.ones(10, dtype=np.int64))
    rc = main(["vocab", "--target", str(tiny_target), "--token-freq", str(tmp_path / "short.npy"),
               "--draft-vocab-size", "4", "--output", str(tmp_path / "v3")])
    err = capsys.readouterr().err
    assert rc == 2 and "short.npy" in err and f"target vocab has {v.target_vocab_size}" in err
    assert not (tmp_path / "v3").exists()


def test_eagle_vocab_argument_errors(tiny_target, tmp_path, capsys):
    from eagle_tui.cli import main

    rc = main(["vocab", "--target", str(tiny_target), "--output", str(tmp_path / "o")])
    assert rc == 2 and "exactly one of" in capsys.readouterr().err
    rc = main(["vocab", "--target", str(tmp_path / "nope"), "--data", "x.jsonl", "--output", str(tmp_path / "o")])
    assert rc == 2 and "no config.json" in capsys.readouterr().err
    assert not Path(tmp_path / "o").exists()
