"""Budget: the estimate equals what the cache writer writes; anchors' sizes; GPU formulas; `eagle plan`."""

from __future__ import annotations

import json

import pytest
import torch

from core.budget import (TargetShape, anchor_bytes_per_sample, estimate_cache_bytes, free_disk, make_plan,
                         online_step_memory, target_forward_memory)
from core.cache import CacheConfig, CacheDims, CacheReader, StorageOptions, build_cache
from core.errors import UsageError
from feature_support import write_conversations


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_nemo_equivalent_layout_is_84_mb_for_llama_8b():
    plan = make_plan("llama-3.1-8b", num_samples=1000, seq_length=2048, draft_vocab_size=8192)
    nemo_like = next(r for r in plan.rows if r["aux_dtype"] == "bf16" and r["target_store"] == "probs")
    nemo = next(a for a in plan.anchors if a["name"] == "nemo")
    assert nemo["bytes_per_sample"] == 2048 * (3 * 4096 * 2 + 8192 * 2) == 83_886_080  # "84 MB"
    assert abs(nemo_like["bytes_per_sample"] / 1e6 - 84) < 0.5
    assert nemo_like["vs_nemo"] == pytest.approx(1.0, abs=0.001)
    # SpecForge and speculators: 64 MiB at 2048 tokens (reference section 5)
    assert anchor_bytes_per_sample(TargetShape.resolve("llama-3.1-8b"), 8192, 2048, 2048)["specforge"] == 64 << 20
    assert anchor_bytes_per_sample(TargetShape.resolve("llama-3.1-8b"), 32000, 2048, 2048)["nemo"] / 1e6 == \
        pytest.approx(181, abs=0.5)
    compact = next(r for r in plan.rows if r["option"] == "aux-fp8+top64")
    assert compact["vs_nemo"] <= 1 / 3
    # shorter samples: NeMo still pays for padding, we do not
    short = make_plan("llama-3.1-8b", num_samples=10, mean_length=512, seq_length=2048, draft_vocab_size=8192)
    assert next(r for r in short.rows if r["option"] == "aux-fp8+top64")["vs_nemo"] < 0.08


@pytest.mark.parametrize("opts", [StorageOptions("bf16", "probs", 64, "bf16"), StorageOptions("fp8", "topk", 8),
                                  StorageOptions("fp16", "hidden", 64, "fp16"), StorageOptions("fp8", "probs", 64, "fp16")],
                         ids=lambda o: o.label)
def test_estimate_within_5_percent_of_bytes_written(tiny_target, tmp_path, opts):
    data = write_conversations(tmp_path / "c.jsonl", 14, max_sentences=1)
    out = tmp_path / "cache"
    build_cache(CacheConfig(target=str(tiny_target), data=str(data), output_dir=str(out), draft_vocab_size=48,
                            max_length=128, shard_size=4, batch_tokens=256, aux_dtype=opts.aux_dtype,
                            target_store=opts.target_store, topk=opts.topk, target_dtype=opts.target_dtype))
    reader = CacheReader(out)
    est = estimate_cache_bytes(CacheDims(64, 48), opts, reader.lengths, shard_size=4,
                               target_vocab_size=reader.vocab.target_vocab_size)
    shard_bytes = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    total = sum(p.stat().st_size for p in out.iterdir())
    assert abs(est.shard_bytes - shard_bytes) / shard_bytes < 0.002  # same arithmetic, headers included
    assert abs(est.total_bytes - total) / total < 0.05
    assert est.num_shards == len(reader.shards)


def test_free_disk_uses_nearest_existing_parent(tmp_path):
    where, free = free_disk(tmp_path / "a" / "b" / "c")
    assert where == str(tmp_path.resolve()) and free > 0


def test_target_shapes(tiny_target, tmp_path):
    s = TargetShape.resolve(str(tiny_target))
    assert (s.hidden_size, s.num_hidden_layers, s.num_key_value_heads, s.head_dim) == (64, 4, 2, 16)
    assert s.tie_word_embeddings
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_target)
    assert s.num_params() == sum(p.numel() for p in m.parameters())  # tied: counted once
    assert TargetShape.resolve("llama-3.1-8b").num_params() == 8_030_261_248
    assert TargetShape.resolve("smollm2-135m").num_params() == 134_515_008
    with pytest.raises(UsageError, match="not a preset"):
        TargetShape.resolve(str(tmp_path / "nothing"))


def test_gpu_memory_formulas():
    s = TargetShape.resolve("llama-3.1-8b")
    f = target_forward_memory(s, 32000, 8192)
    assert f["weights"] == s.num_params() * 2
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    # full-vocab logits are chunked: far below 8192 x 128256 x 4 bytes (4.2 GB)
    assert f["logits_chunk"] <= 64 << 20 and f["draft_probs"] == 2 * 8192 * 32000 * 4
    o3, o7 = online_step_memory(s, 32000, 8192, 3), online_step_memory(s, 32000, 8192, 7)
    assert o3["target"] == f["total"] and o7["total"] > o3["total"]
    assert o7["ttt_activations"] == pytest.approx(o3["ttt_activations"] * 7 / 3)
    assert o3["draft_and_optimizer"] == s.draft_params(32000) * 18


def test_plan_validation():
    with pytest.raises(UsageError, match="draft vocab size"):
        make_plan("smollm2-135m", 10, draft_vocab_size=60000)
    with pytest.raises(UsageError, match="samples"):
        make_plan("smollm2-135m", 0)


def test_eagle_plan_cli(tiny_target, tmp_path, capsys):
    from eagle_tui.cli import main

    assert main(["plan", "--target", "llama-3.1-8b", "--draft-vocab-size", "8192", "--samples", "100",
                 "--output", str(tmp_path / "new" / "cache")]) == 0
    text = capsys.readouterr().out
    assert "aux-fp8+top64" in text and "nemo" in text and "83.9 MB" in text and "free disk" in text
    assert main(["plan", "--target", "smollm2-135m", "--json", "--mean-length", "300"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["num_samples"] == 1000 and p["mean_length"] == 300 and len(p["rows"]) == 6
    assert {a["name"] for a in p["anchors"]} == {"nemo", "specforge", "speculators"}
    # measured lengths of a dataset with the target's tokenizer, and a measured warm-up
    data = write_conversations(tmp_path / "c.jsonl", 6, max_sentences=1)
    assert main(["plan", "--target", str(tiny_target), "--data", str(data), "--json", "--draft-vocab-size",
                 "48", "--topk", "8", "--max-length", "128", "--measure", "--batch-tokens", "256"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["num_samples"] == 6 and 60 < p["mean_length"] <= 128
    assert p["time"]["tokens_per_s"] > 0 and p["time"]["total_tokens"] == round(p["mean_length"] * 6)
    assert main(["plan", "--target", "no-such-model"]) == 2
    assert "not a preset" in capsys.readouterr().err


def test_tui_panel_and_eagle_plan_use_one_planner(tmp_path, tiny_target):
    """The budget panel and `eagle run --plan` read the same core planner: same memory figures,
    and the plan's cache bytes (measured lengths) within the panel's upper bound (max length)."""
    import json

    from core.pipeline import plan_pipeline
    from core.runconfig import RunConfig
    from eagle_tui.widgets import estimates

    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": "hello there"}]}) + "\n"
                            for i in range(40)))
    cfg = RunConfig(workdir=str(tmp_path / "w"))
    cfg.target.model, cfg.dataset.source, cfg.regen.enabled = str(tiny_target), str(data), False
    cfg.features.max_length, cfg.train.max_tokens_per_batch, cfg.vocab.draft_vocab_size = 64, 256, 64
    cfg.validate()
    plan = plan_pipeline(cfg)
    n = plan["dataset"]["conversations"]
    assert n == 40 - cfg.heldout_count()
    panel = {b.step: b for b in estimates.step_budgets(cfg, 0, known_rows=n)}
    for step in ("train", "eval"):
        assert (plan["budgets"][step]["ram_bytes"], plan["budgets"][step]["gpu_bytes"]) == \
            (panel[step].ram_bytes, panel[step].gpu_bytes)
    assert 0 < plan["budgets"]["cache"]["disk_bytes"] <= panel["cache"].disk_bytes
    assert plan["budgets"]["cache"]["disk_bytes"] == plan["steps"]["cache"]["total_bytes"]


@pytest.mark.slow
def test_cpu_training_memory_estimate_is_within_25_percent_of_measured():
    from bench.train_memory import compare

    r = compare(1024, 3, 8192)  # the demo's batch: 2 x 512 tokens, TTT 3, draft vocab 8192
    assert 0.75 < r["ratio"] < 1.25, r
