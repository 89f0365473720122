"""Training building blocks without a model: packing, the data plan, schedule, config validation,
checkpoint files, optimizer/RNG round trips, metric aggregation."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from core.errors import CorruptDataError, InputDataError, UsageError
from core.train import checkpoint as ck
from core.settings import default_draft_vocab
from core.train.config import TrainConfig
from core.train.data import BatchPlan, collate, pack_in_order, split_indices
from core.train.distributed import DistEnv
from core.train.loop import lr_at
from core.train.metrics import MetricAccumulator, tau_sim

LOCAL = DistEnv(1, 0, 0, torch.device("cpu"))


# ---- packing and the plan ---------------------------------------------------------------------
def test_pack_in_order_keeps_order_and_budget():
    lengths = [5, 3, 8, 2, 2, 7, 1]
    batches = pack_in_order([6, 0, 1, 2, 3, 4, 5], lengths, budget=10)
    assert [i for b in batches for i in b] == [6, 0, 1, 2, 3, 4, 5]
    assert batches == [[6, 0, 1], [2, 3], [4, 5]]  # 1+5+3, 8+2, 2+7
    assert all(sum(lengths[i] for i in b) <= 10 for b in batches)
    with pytest.raises(UsageError, match="sample 2 has 8 tokens"):
        pack_in_order([2], lengths, budget=7)


def test_two_ranks_see_the_data_of_one_process_accumulating():
    lengths = [random.Random(i).randint(3, 40) for i in range(60)]
    one = BatchPlan(lengths, 64, seed=3, world_size=1, rank=0, grad_accum=2)
    r0 = BatchPlan(lengths, 64, seed=3, world_size=2, rank=0, grad_accum=1)
    r1 = BatchPlan(lengths, 64, seed=3, world_size=2, rank=1, grad_accum=1)
    assert one.total_steps(3) == r0.total_steps(3) > 0
    for step in range(one.total_steps(3)):
        assert one.step(step).micro_batches == r0.step(step).micro_batches + r1.step(step).micro_batches
        assert one.tokens_in_step(step) == r0.tokens_in_step(step)


def test_plan_is_deterministic_and_reshuffles_per_epoch():
    lengths = list(range(5, 45))
    a, b = BatchPlan(lengths, 100, seed=1), BatchPlan(lengths, 100, seed=1)
    assert a.epoch_micro_batches(0) == b.epoch_micro_batches(0)
    assert a.epoch_micro_batches(0) != a.epoch_micro_batches(1)
    assert a.epoch_micro_batches(0) != BatchPlan(lengths, 100, seed=2).epoch_micro_batches(0)
    # global steps walk through epochs in order; every sample once per epoch (up to the dropped tail)
    n0 = a.steps_in_epoch(0)
    assert a.locate(0) == (0, 0) and a.locate(n0) == (1, 0) and a.locate(n0 + 1) == (1, 1)
    seen = [i for s in range(n0) for mb in a.step(s).micro_batches for i in mb]
    assert len(seen) == len(set(seen))
    # the step -> data mapping does not depend on having visited earlier steps (resume)
    assert BatchPlan(lengths, 100, seed=1).step(n0 + 2).micro_batches == a.step(n0 + 2).micro_batches


def test_plan_refuses_too_little_data():
    plan = BatchPlan([10, 10], 64, seed=0, world_size=2, grad_accum=2)
    with pytest.raises(UsageError, match="fewer than one optimizer step needs"):
        plan.check_not_empty("training")


def test_split_indices_is_seeded_and_disjoint():
    tr, va = split_indices(100, 0.1, seed=5)
    assert len(va) == 10 and not set(tr) & set(va) and sorted(tr + va) == list(range(100))
    assert (tr, va) == split_indices(100, 0.1, seed=5)
    assert split_indices(100, 0.1, seed=6)[1] != va
    assert split_indices(3, 0.0, seed=0) == ([0, 1, 2], [])
    assert len(split_indices(3, 0.01, seed=0)[1]) == 1


def test_collate_packs_documents_with_restarting_positions():
    docs = [{"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 1]),
             "aux_hidden": torch.ones(3, 6), "target_probs": torch.full((3, 4), 0.25),
             "position_mask": torch.tensor([1, 1, 0])},
            {"input_ids": torch.tensor([8, 9]), "loss_mask": torch.tensor([1, 1]),
             "aux_hidden": torch.zeros(2, 6), "target_probs": torch.full((2, 4), 0.25),
             "position_mask": torch.tensor([1, 1])}]
    b = collate(docs, torch.device("cpu"))
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 1, 1]]
    assert b["loss_mask"].dtype == torch.bool and b["aux_hidden"].shape == (1, 5, 6)


# ---- schedule ---------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1e-3, warmup=4, total=20) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(12, 1e-3, 4, 20) == pytest.approx(5e-4)  # half way through the cosine
    assert lrs[-1] < 2e-5
    assert lr_at(0, 1e-3, 0, 10) == pytest.approx(1e-3)


# ---- config -----------------------------------------------------------------------------------
def _cfg(tmp_path, **kw):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    base = dict(output_dir=str(tmp_path / "run"), target=str(tmp_path / "m"), data="org/name")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kw, message", [
    ({"cache": "x"}, "exactly one of --data"),
    ({"data": None}, "exactly one of --data"),
    ({"target": None}, "--target"),
    ({"max_tokens_per_batch": 100, "max_length": 200}, "--max-tokens-per-batch"),
    ({"decay": 0.0}, "--decay"),
    ({"lr": 0.0}, "--lr"),
    ({"warmup_ratio": 1.0}, "--warmup-ratio"),
    ({"attention": "fast"}, "--attention"),
    ({"ttt_length": 0}, "--ttt-length"),
    ({"grad_accum": 0}, "--grad-accum"),
    ({"val_fraction": 1.0}, "--val-fraction"),
    ({"aux_layer_ids": [1, 1, 2]}, "--aux-layers"),
    ({"betas": (0.9, 1.5)}, "--betas"),
    ({"device": "tpu"}, "--device"),
])
def test_config_refusals_name_the_option(tmp_path, kw, message):
    with pytest.raises(UsageError, match=message):
        _cfg(tmp_path, **kw).validate()


def test_config_checks_paths(tmp_path):
    with pytest.raises(InputDataError, match="no config.json"):
        _cfg(tmp_path, target=str(tmp_path / "nowhere")).validate()
    with pytest.raises(InputDataError, match="dataset not found"):
        _cfg(tmp_path, data=str(tmp_path / "missing.jsonl")).validate()
    with pytest.raises(InputDataError, match="not an `eagle cache` folder"):
        _cfg(tmp_path, data=None, cache=str(tmp_path)).validate()


def test_config_round_trip_and_content_settings(tmp_path):
    cfg = _cfg(tmp_path, lr=3e-4, betas=(0.8, 0.9)).validate()
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(UsageError, match="unknown train setting"):
        TrainConfig.from_dict({**cfg.to_dict(), "lr_typo": 1})
    s = cfg.settings(1, "cpu")
    assert s["device"] == "cpu" and s["attention"] == "sdpa" and s["world_size"] == 1
    # bookkeeping options may change on --resume; content options may not
    same = dict(lr=3e-4, betas=(0.8, 0.9))
    assert _cfg(tmp_path, save_every=7, keep_last=9, resume=True, **same).settings(1, "cpu") == s
    assert _cfg(tmp_path, lr=1e-3, betas=(0.8, 0.9)).settings(1, "cpu") != s
    assert _cfg(tmp_path, **same).settings(2, "cpu") != s
    assert default_draft_vocab(49152) == 8192 and default_draft_vocab(128256) == 32000
    assert default_draft_vocab(1000) == 1000


# ---- checkpoint files -------------------------------------------------------------------------
def _adamw_after_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    from core.train.distributed import full_optim_state, load_optim_state

    model, opt = _adamw_after_steps()
    named = full_optim_state(model, model, opt, fsdp=False, prefix="")
    assert set(named["state"]) == {"0.weight", "0.bias", "1.weight"}
    ck.save_checkpoint(tmp_path, 3, model.state_dict(), named, {"epoch": 0}, {"x": 1}, keep_last=2)
    loaded = ck.load_checkpoint(tmp_path / "checkpoints" / "step-3")
    torch.manual_seed(1)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    model2.load_state_dict(loaded.draft_state)
    load_optim_state(model2, model2, opt2, loaded.optim_state, fsdp=False, prefix="")
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    # both continue identically
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    st = json.loads(json.dumps(ck.capture_rng_state()))
    want = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.restore_rng_state(st)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert want[:2] == got[:2] and torch.equal(want[2], got[2])


def test_checkpoints_latest_pointer_and_keep_last(tmp_path):
    w = {"fc.weight": torch.ones(2, 2), "embed_tokens.weight": torch.zeros(9, 2)}
    osd = {"state": {}, "param_groups": [{"lr": 1.0, "params": []}]}
    for step in (2, 4, 6):
        ck.save_checkpoint(tmp_path, step, w, osd, {}, {"c": 1}, keep_last=2)
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step-6"
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4, 6]
    # the frozen embedding is stored once per run, not in every checkpoint
    assert set(ck.load_checkpoint(tmp_path / "checkpoints" / "step-6").draft_state) == {"fc.weight"}
    # leftovers of an interrupted write are ignored and cleaned; re-saving a step replaces it
    (tmp_path / "checkpoints" / ".step-8.tmp").mkdir()
    ck.save_checkpoint(tmp_path, 6, {"fc.weight": torch.full((2, 2), 7.0)}, osd, {}, {}, keep_last=2)
    assert not (tmp_path / "checkpoints" / ".step-8.tmp").exists()
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path)).draft_state["fc.weight"][0, 0] == 7.0
    (tmp_path / "latest").write_text("checkpoints/step-99\n")
    with pytest.raises(CorruptDataError, match="not a complete checkpoint"):
        ck.latest_checkpoint(tmp_path)


def test_truncate_metrics_drops_later_steps_and_torn_lines(tmp_path):
    lines = [json.dumps({"step": s, "split": "train"}) for s in range(6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "spl')
    ck.truncate_metrics(tmp_path, 3)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_resolve_checkpoint_refuses_other_folders(tmp_path):
    with pytest.raises(InputDataError, match="neither a training run dir nor a checkpoint dir"):
        ck.resolve_checkpoint(tmp_path)


# ---- metrics ----------------------------------------------------------------------------------
@dataclass
class _Out:
    loss: torch.Tensor
    num_tokens: int
    per_step_loss_sum: list = field(default_factory=list)
    per_step_count: list = field(default_factory=list)
    per_step_correct: list = field(default_factory=list)
    per_step_acc_total: list = field(default_factory=list)


def test_metric_accumulator_is_token_weighted_and_exact():
    acc = MetricAccumulator(2)
    acc.add(_Out(torch.tensor(3.0), 10, [8.0, 6.0], [4, 3], [2, 1], [5, 4]))
    acc.add(_Out(torch.tensor(1.0), 20, [4.0, 2.0], [4, 1], [3, 0], [5, 1]))
    acc.add(_Out(torch.tensor(100.0), 99, [99.0, 99.0], [9, 9], [9, 9], [9, 9]), weight=0.0)
    m = acc.reduce(LOCAL)
    assert m["loss"] == pytest.approx(2.0)
    assert m["loss_0"] == pytest.approx(12 / 8) and m["loss_1"] == pytest.approx(8 / 4)
    assert m["acc_0"] == pytest.approx(0.5) and m["acc_1"] == pytest.approx(0.2)
    assert m["tau_sim"] == pytest.approx(1 + 0.5 + 0.5 * 0.2) == tau_sim([0.5, 0.2])
    assert m["tokens"] == 30 and m["supervised"] == 8


def test_feature_noise_is_relative_per_layer_and_drawn_from_its_seed():
    from core.train.loop import noisy_features

    torch.manual_seed(0)
    aux = torch.cat([torch.randn(2, 50, 64) * s for s in (0.1, 1.0, 30.0)], dim=-1).to(torch.bfloat16)
    a, b = noisy_features(aux, 0.2, 3, seed=7), noisy_features(aux, 0.2, 3, seed=7)
    assert a.dtype == aux.dtype and a.shape == aux.shape and torch.equal(a, b)
    assert not torch.equal(a, noisy_features(aux, 0.2, 3, seed=8))
    for k in range(3):  # each aux layer gets noise at 20% of its own scale
        x, y = aux[..., 64 * k: 64 * (k + 1)].float(), a[..., 64 * k: 64 * (k + 1)].float()
        ratio = ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt()
        assert 0.17 < float(ratio) < 0.23, (k, float(ratio))
