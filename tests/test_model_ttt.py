"""TTT forward + loss: backends agree, packing changes nothing, alignment matches the plain
anchor-style step (bench/train_steps.py, the step bench/train.py times), metrics and errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from core.errors import UsageError
from core.model import DraftConfig, Eagle3Draft, aggregate, tau_from_acc, ttt_forward_loss

REPO = Path(__file__).resolve().parents[1]
V, VD, H, HT = 61, 23, 32, 24


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_steps", REPO / "bench" / "train_steps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_draft(num_layers=1, seed=0):
    cfg = DraftConfig(vocab_size=V, draft_vocab_size=VD, hidden_size=H, target_hidden_size=HT,
                      intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
                      target_num_hidden_layers=8, num_hidden_layers=num_layers)
    torch.manual_seed(seed)
    d = Eagle3Draft(cfg)
    with torch.no_grad():
        d.embed_tokens.weight.normal_(0, 1.0)
        for p in d.parameters():
            if p.requires_grad and p.dim() == 2:
                p.normal_(0, 0.2)
    selected = torch.arange(0, V, 2)[:VD]
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[selected] = True
    d.set_vocab((selected - torch.arange(VD), t2d))
    return d


def make_docs(lengths, seed=0):
    """Documents with full-vocab target logits (for the plain step) and the derived features."""
    g = torch.Generator().manual_seed(seed)
    d = make_draft()
    t2d = d.t2d
    docs = []
    for n in lengths:
        logits = torch.randn(n, V, generator=g) * 3
        lm = (torch.rand(n, generator=g) < 0.7).long()
        docs.append({"input_ids": torch.randint(0, V, (n,), generator=g),
                     "aux_hidden": torch.randn(n, 3 * HT, generator=g),
                     "target_logits": logits, "loss_mask": lm,
                     "target_probs": torch.softmax(logits[:, t2d], -1),
                     "position_mask": t2d[logits.argmax(-1)]})
    return docs, t2d


def grads(draft):
    return {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_layers", [1, 2])
def test_backends_agree_on_loss_metrics_and_gradients(num_layers):
    bench = load_bench()
    docs, _ = make_docs([9, 14, 6, 11])
    batch = bench.pack_docs(docs, 24)
    assert batch["input_ids"].shape[0] >= 2 and (batch["doc_ids"] < 0).any()  # packed + padded
    results = {}
    for backend in ("naive", "eager", "sdpa"):
        d = make_draft(num_layers)
        out = ttt_forward_loss(d, batch, ttt_length=4, attention_backend=backend)
        out.loss.backward()
        results[backend] = (out, grads(d))
    ref_out, ref_grads = results["naive"]
    for backend in ("eager", "sdpa"):
        out, g = results[backend]
        assert out.backend == backend
        torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-5)
        assert out.per_step_count == ref_out.per_step_count
        assert out.per_step_correct == ref_out.per_step_correct
        for name in ref_grads:
            torch.testing.assert_close(g[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_on_cpu_matches_naive():
    bench = load_bench()
    docs, _ = make_docs([9, 14, 6])
    batch = bench.pack_docs(docs, 24)
    with torch.no_grad():
        ref = ttt_forward_loss(make_draft(), batch, ttt_length=3, attention_backend="naive")
        out = ttt_forward_loss(make_draft(), batch, ttt_length=3, attention_backend="flex")
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_equals_plain_anchor_step_per_document():
    """Same loss/accuracy/gradients as the plain step (padding, full-vocab target, explicit masks)."""
    bench = load_bench()
    docs, t2d = make_docs([12, 7, 10])
    d_ours, d_plain = make_draft(), make_draft()
    ours = ttt_forward_loss(d_ours, bench.pack_docs(docs, 32), ttt_length=3, decay=0.8)
    plain, plain_steps, plain_acc = bench.baseline_ttt_loss(d_plain, docs, t2d, 3, 0.8)
    torch.testing.assert_close(ours.loss, plain, atol=1e-5, rtol=1e-5)
    assert ours.per_step_loss == pytest.approx(plain_steps, rel=1e-5)
    assert ours.per_step_acc == pytest.approx(plain_acc, rel=1e-6)
    ours.loss.backward()
    plain.backward()
    g_ours, g_plain = grads(d_ours), grads(d_plain)
    assert set(g_ours) == set(g_plain) and "embed_tokens.weight" not in g_ours
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packing_equals_documents_one_by_one():
    bench = load_bench()
    docs, _ = make_docs([8, 13, 5, 9], seed=3)
    packed = ttt_forward_loss(make_draft(), bench.pack_docs(docs, 20), ttt_length=3)
    singles = [ttt_forward_loss(make_draft(), bench.pack_docs([doc], 20), ttt_length=3) for doc in docs]
    for k in range(3):
        assert packed.per_step_count[k] == sum(s.per_step_count[k] for s in singles)
        assert packed.per_step_correct[k] == sum(s.per_step_correct[k] for s in singles)
        assert packed.per_step_loss_sum[k] == pytest.approx(sum(s.per_step_loss_sum[k] for s in singles),
                                                             rel=1e-5)
    assert aggregate(singles)["loss"] == pytest.approx(float(packed.loss.detach()), rel=1e-5)
    assert packed.num_tokens == 8 + 13 + 5 + 9


def test_alignment_counts_by_hand():
    """Step k supervises index t with t+1+k inside the document and loss/position masks at t+1+k."""
    n = 10
    lm = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 1, 1])
    pm = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    batch = {"input_ids": torch.randint(0, V, (1, n)), "aux_hidden": torch.randn(1, n, 3 * HT),
             "target_probs": torch.softmax(torch.randn(1, n, VD), -1), "position_mask": pm[None],
             "loss_mask": lm[None], "position_ids": torch.arange(n)[None]}
    out = ttt_forward_loss(make_draft(), batch, ttt_length=4)
    for k in range(4):
        idx = torch.arange(1 + k, n)  # t + 1 + k for t = 0 .. n-2-k
        assert out.per_step_acc_total[k] == int(lm[idx].sum())
        assert out.per_step_count[k] == int((lm[idx].bool() & pm[idx]).sum())
    # documents found from position_ids restarting at 0 (no doc_ids given)
    two = dict(batch, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]))
    out2 = ttt_forward_loss(make_draft(), two, ttt_length=1)
    valid_next = [1, 2, 3, 4, 6, 7, 8, 9]  # t+1 for t not at a document end
    assert out2.per_step_acc_total[0] == int(lm[valid_next].sum())


def test_logits_only_for_supervised_rows():
    n = 12
    batch = {"input_ids": torch.randint(0, V, (1, n)), "aux_hidden": torch.randn(1, n, 3 * HT),
             "target_probs": torch.softmax(torch.randn(1, n, VD), -1),
             "position_mask": torch.ones(1, n, dtype=torch.bool),
             "loss_mask": torch.tensor([[1] * 6 + [0] * 6]), "position_ids": torch.arange(n)[None]}
    draft = make_draft()
    rows = []
    draft.norm.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    ttt_forward_loss(draft, batch, ttt_length=3)
    assert rows == [5, 4, 3]  # loss_mask[t+1+k] = 1 for t+1+k in 1..5, 2..5, 3..5


def test_decay_tau_and_metrics():
    bench = load_bench()
    docs, _ = make_docs([15, 9])
    batch = bench.pack_docs(docs, 24)
    for decay in (0.8, 1.0):
        out = ttt_forward_loss(make_draft(), batch, ttt_length=3, decay=decay)
        assert float(out.loss.detach()) == pytest.approx(sum(decay ** k * lo for k, lo in enumerate(out.per_step_loss)),
                                                rel=1e-6)
        assert out.tau_sim == pytest.approx(tau_from_acc(out.per_step_acc))
    assert tau_from_acc([0.5, 0.5, 1.0]) == pytest.approx(1 + 0.5 + 0.25 + 0.25)
    assert tau_from_acc([]) == 1.0
    m = out.metrics()
    assert set(m) >= {"loss", "tau_sim", "tokens", "loss_0", "acc_2"}


def test_training_signal():
    """A few AdamW steps on a fixed batch raise step-0 accuracy and lower the loss."""
    bench = load_bench()
    docs, _ = make_docs([20, 16])
    batch = bench.pack_docs(docs, 40)
    d = make_draft()
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=3e-3)
    first = ttt_forward_loss(d, batch, ttt_length=2)
    for _ in range(30):
        out = ttt_forward_loss(d, batch, ttt_length=2)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = ttt_forward_loss(d, batch, ttt_length=2)
    assert float(last.loss.detach()) < 0.7 * float(first.loss.detach())
    assert last.per_step_acc[0] > first.per_step_acc[0]
    assert d.embed_tokens.weight.grad is None  # frozen


def test_bad_batches_are_refused():
    n = 6
    ok = {"input_ids": torch.zeros(1, n, dtype=torch.long), "aux_hidden": torch.randn(1, n, 3 * HT),
          "target_probs": torch.softmax(torch.randn(1, n, VD), -1), "position_mask": torch.ones(1, n, dtype=torch.bool),
          "loss_mask": torch.ones(1, n), "position_ids": torch.arange(n)[None]}
    d = make_draft()
    with pytest.raises(UsageError, match="lacks loss_mask"):
        ttt_forward_loss(d, {k: v for k, v in ok.items() if k != "loss_mask"})
    with pytest.raises(UsageError, match="position_ids has shape"):
        ttt_forward_loss(d, dict(ok, position_ids=torch.arange(n - 1)[None]))
    with pytest.raises(UsageError, match="draft vocab has"):
        ttt_forward_loss(d, dict(ok, target_probs=torch.randn(1, n, VD + 1)))
    with pytest.raises(UsageError, match="decay"):
        ttt_forward_loss(d, ok, decay=0.0)
    with pytest.raises(UsageError, match="ttt_length"):
        ttt_forward_loss(d, ok, ttt_length=0)
    # nothing supervised: a zero loss that still reaches every trainable parameter
    out = ttt_forward_loss(d, dict(ok, loss_mask=torch.zeros(1, n)), ttt_length=2)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and out.per_step_acc == [0.0, 0.0]
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)


def test_soft_cross_entropy_matches_autograd_reference():
    from core.model.ttt import soft_cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 19, generator=g, requires_grad=True)
    p = torch.softmax(torch.randn(7, 19, generator=g), -1) * 0.9  # rows need not sum to exactly 1
    ours = soft_cross_entropy_sum(z, p)
    ref = -(p * torch.log_softmax(z, -1)).sum()
    torch.testing.assert_close(ours, ref)
    (gz,) = torch.autograd.grad(ours * 1.7, z)
    (rz,) = torch.autograd.grad(ref * 1.7, z)
    torch.testing.assert_close(gz, rz)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_skipping_unsupervised_rows_changes_nothing(backend):
    bench = load_bench()
    docs, _ = make_docs([14, 9, 12, 7], seed=5)
    batch = bench.pack_docs(docs, 48)
    runs = {}
    for skip in (False, True):
        d = make_draft(num_layers=2)
        out = ttt_forward_loss(d, batch, ttt_length=4, attention_backend=backend, skip_unsupervised=skip)
        out.loss.backward()
        runs[skip] = (out, grads(d))
    (full, g_full), (skip, g_skip) = runs[False], runs[True]
    torch.testing.assert_close(skip.loss, full.loss, atol=1e-5, rtol=1e-5)
    assert skip.per_step_correct == full.per_step_correct and skip.per_step_count == full.per_step_count
    for name in g_full:
        torch.testing.assert_close(g_skip[name], g_full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_skipping_runs_later_steps_on_fewer_rows():
    n = 16
    lm = torch.tensor([[0] * 10 + [1] * 6])
    batch = {"input_ids": torch.randint(0, V, (1, n)), "aux_hidden": torch.randn(1, n, 3 * HT),
             "target_probs": torch.softmax(torch.randn(1, n, VD), -1),
             "position_mask": torch.ones(1, n, dtype=torch.bool), "loss_mask": lm,
             "position_ids": torch.arange(n)[None]}
    d = make_draft()
    seen = []
    real_run = d.run_layers

    def spy(ids, hidden, pos, attend):
        seen.append(ids.shape[1])
        return real_run(ids, hidden, pos, attend)

    d.run_layers = spy
    ttt_forward_loss(d, batch, ttt_length=3)
    # step 0: all 16; step 1: rows supervised at step 1 (t in 8..13) or 2 (t in 7..12); step 2: 7..12
    assert seen == [16, 7, 6]


def test_topk_targets_equal_their_dense_expansion():
    """The loss reads top-k (ids, probs) directly: same loss, metrics and gradients as the dense rows."""
    from core.cache.quant import topk_compress, topk_expand

    bench = load_bench()
    docs, _ = make_docs([13, 9, 11], seed=2)
    dense_batch = bench.pack_docs(docs, 40)
    p = dense_batch["target_probs"]
    vals, ids = topk_compress(p.reshape(-1, VD), 5)
    v = vals.float()
    sparse_batch = {k: x for k, x in dense_batch.items() if k != "target_probs"}
    sparse_batch["target_topk_ids"] = ids.long().view(*p.shape[:2], 5)
    sparse_batch["target_topk_probs"] = (v / v.sum(-1, keepdim=True)).view(*p.shape[:2], 5)
    dense_batch = dict(dense_batch, target_probs=topk_expand(vals, ids, VD).view(p.shape))
    runs = []
    for batch in (dense_batch, sparse_batch):
        d = make_draft()
        out = ttt_forward_loss(d, batch, ttt_length=3)
        out.loss.backward()
        runs.append((out, grads(d)))
    (ref, g_ref), (out, g) = runs
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    assert out.per_step_correct == ref.per_step_correct and out.per_step_count == ref.per_step_count
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(UsageError, match="outside the draft vocab"):
        ttt_forward_loss(make_draft(), dict(sparse_batch, target_topk_ids=sparse_batch["target_topk_ids"] + VD))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_bf16_autocast_keeps_fp32_master_weights_and_the_loss(backend):
    """What CUDA training does (bf16 autocast over fp32 weights), on CPU: the loss stays close to fp32
    and every gradient lands in fp32 on the fp32 parameters."""
    bench = load_bench()
    docs, _ = make_docs([13, 9, 11], seed=4)
    batch = bench.pack_docs(docs, 40)
    ref_d, d = make_draft(), make_draft()
    ref = ttt_forward_loss(ref_d, batch, ttt_length=3, attention_backend=backend)
    ref.loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ttt_forward_loss(d, batch, ttt_length=3, attention_backend=backend)
        out.loss.backward()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=0.0)
    g, g_ref = grads(d), grads(ref_d)
    for name, p in d.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and g[name].dtype == torch.float32, name
            cos = torch.nn.functional.cosine_similarity(g[name].flatten(), g_ref[name].flatten(), dim=0)
            assert float(cos) > 0.98, name
