"""Target features: aux capture vs output_hidden_states, restricted distributions, padding, layer ids."""

from __future__ import annotations

import pytest
import torch

from core.errors import UsageError
from core.features import (TargetFeatureExtractor, probs_from_final_hidden,
                           resolve_aux_layer_ids)
from core.settings import default_aux_layers
from core.vocab import build_vocab


def _samples(V: int, lengths=(5, 23, 11, 1, 17), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model(tiny_target):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vocab(model):
    V = model.config.vocab_size
    # a draft vocab that misses part of the target vocab, so position_mask has both values
    return build_vocab([(s, [1] * len(s)) for s in _samples(V, (200,), seed=1)], 48, V)


def test_default_aux_layer_ids_and_validation():
    assert default_aux_layers(32) == [1, 15, 28]  # Llama-3.1-8B: engines' [2, 16, 29] residuals
    assert resolve_aux_layer_ids(32) == [1, 15, 28]
    assert resolve_aux_layer_ids(30) == [1, 14, 26]  # SmolLM2-135M
    assert resolve_aux_layer_ids(4) == [0, 1, 2]  # shallow: the default would repeat a layer
    assert resolve_aux_layer_ids(8, [5, 0, 2]) == [0, 2, 5]
    with pytest.raises(UsageError, match="three distinct"):
        resolve_aux_layer_ids(8, [1, 1, 2])
    with pytest.raises(UsageError, match="three distinct"):
        resolve_aux_layer_ids(8, [1, 2])
    with pytest.raises(UsageError, match=r"\[7\] out of range.*valid 0\.\.6"):
        resolve_aux_layer_ids(8, [1, 2, 7])
    with pytest.raises(UsageError, match="out of range"):
        resolve_aux_layer_ids(8, [-1, 2, 3])


def test_aux_and_probs_match_transformers(model, vocab):
    ex = TargetFeatureExtractor(model, vocab, aux_layer_ids=[0, 1, 2], final_hidden=True)
    samples = _samples(vocab.target_vocab_size)
    feats = ex(samples)
    H = model.config.hidden_size
    seen_in, seen_out = False, False
    for s, f in zip(samples, feats):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([s]), output_hidden_states=True)
        T = len(s)
        assert f.aux_hidden.shape == (T, 3 * H) and f.target_probs.shape == (T, vocab.draft_vocab_size)
        for j, layer in enumerate([0, 1, 2]):
            torch.testing.assert_close(f.aux_hidden[:, j * H:(j + 1) * H], ref.hidden_states[layer + 1][0],
                                       rtol=1e-5, atol=1e-5)
        logits = ref.logits[0]
        torch.testing.assert_close(f.target_probs, torch.softmax(logits[:, vocab.selected], -1),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.target_probs.sum(-1), torch.ones(T))
        assert torch.equal(f.position_mask, vocab.t2d[logits.argmax(-1)])
        seen_in |= bool(f.position_mask.any())
        seen_out |= bool((~f.position_mask).any())
        # the final hidden state recomputes the same distribution (the cache's "hidden" option)
        head = ex.head_tensors()
        again = probs_from_final_hidden(f.final_hidden, head["norm_weight"], ex.norm_eps, head["lm_head_rows"])
        torch.testing.assert_close(again, f.target_probs, rtol=1e-4, atol=1e-6)
    assert seen_in and seen_out


def test_batched_with_padding_equals_one_by_one(model, vocab):
    samples = _samples(vocab.target_vocab_size)
    batched = TargetFeatureExtractor(model, vocab, max_batch_tokens=4096)(samples)
    single = TargetFeatureExtractor(model, vocab, max_batch_tokens=1)
    assert all(len(b) == 1 for b in single.plan_batches([len(s) for s in samples]))
    for s, b in zip(samples, batched):
        (one,) = single([s])
        torch.testing.assert_close(b.aux_hidden, one.aux_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.target_probs, one.target_probs, rtol=1e-5, atol=1e-6)
        assert torch.equal(b.position_mask, one.position_mask) and torch.equal(b.input_ids, torch.tensor(s))


def test_padded_forward_zeroes_padding_and_chunking_changes_nothing(model, vocab):
    V = vocab.target_vocab_size
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 4:] = 0
    big = TargetFeatureExtractor(model, vocab).forward_padded(ids, mask)
    tiny_chunks = TargetFeatureExtractor(model, vocab, logits_chunk_bytes=1).forward_padded(ids, mask)
    for k in big:
        torch.testing.assert_close(big[k], tiny_chunks[k])
    assert not big["position_mask"][1, 4:].any()
    assert float(big["target_probs"][1, 4:].abs().sum()) == 0.0
    assert float(big["aux_hidden"][1, 4:].abs().sum()) == 0.0


def test_untied_target_from_path_and_vocab_size_check(tmp_path):
    from conftest import build_tiny_llama

    build_tiny_llama(tmp_path, vocab_size=100, tie_word_embeddings=False, num_hidden_layers=8, seed=5)
    v = build_vocab(torch.arange(100) % 7, 16, 100)
    ex = TargetFeatureExtractor(str(tmp_path), v)
    assert ex.aux_layer_ids == [1, 3, 4] and ex.dtype == torch.float32
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
    (f,) = ex([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([[3, 14, 15, 92, 65]])).logits[0]
    torch.testing.assert_close(f.target_probs, torch.softmax(logits[:, v.selected], -1), rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="target vocab of 50"):
        TargetFeatureExtractor(str(tmp_path), build_vocab(torch.ones(50, dtype=torch.long), 4, 50))
    with pytest.raises(UsageError, match="out of range"):
        TargetFeatureExtractor(str(tmp_path), v, aux_layer_ids=[1, 2, 9])


def test_head_check_refuses_scaled_logits(model, vocab, monkeypatch):
    """A target whose logits are not norm(h) @ W.T (e.g. soft-capped) must not be silently wrong."""
    import copy

    m = copy.deepcopy(model)
    orig = m.forward

    def capped(*a, **kw):
        out = orig(*a, **kw)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    m.forward = capped
    with pytest.raises(UsageError, match="soft-capping"):
        TargetFeatureExtractor(m, vocab)


def test_bad_input_rows(model, vocab):
    from core.errors import InputDataError

    ex = TargetFeatureExtractor(model, vocab)
    with pytest.raises(InputDataError, match="row 1"):
        ex([[1, 2], []])
    with pytest.raises(InputDataError, match="outside the target vocab"):
        ex([[1, vocab.target_vocab_size]])


def test_device_map_auto_loads_and_matches(tiny_target, model, vocab):
    """The large-target path (accelerate's device_map) gives the same features; on CPU it places
    every module on the CPU."""
    samples = _samples(vocab.target_vocab_size, (7, 12))
    ref = TargetFeatureExtractor(model, vocab)(samples)
    with TargetFeatureExtractor(str(tiny_target), vocab, device_map="auto", device="cpu") as ex:
        got = ex(samples)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a.aux_hidden, b.aux_hidden)
        torch.testing.assert_close(a.target_probs, b.target_probs)
        assert torch.equal(a.position_mask, b.position_mask)
