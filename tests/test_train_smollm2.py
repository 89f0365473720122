"""A real learning signal: a short offline training on features of the embedded SmolLM2-135M
target raises the draft's validation top-1 accuracy of TTT step 0 well above its start."""

from __future__ import annotations

import json

import pytest

from tests.train_support import metric_lines

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _short_sharegpt(path, n: int) -> None:
    """The first exchange of n ShareGPT conversations with a short question and a long answer
    (so that most of the 160 tokens are supervised)."""
    import pyarrow.parquet as pq

    from core.assets import demo_dataset

    rows = pq.read_table(demo_dataset()).slice(0, 3000).to_pylist()
    picked = []
    for r in rows:
        m = r["messages"]
        if len(m) >= 2 and m[0]["role"] == "user" and m[1]["role"] == "assistant" \
                and len(m[0]["content"]) < 300 and len(m[1]["content"]) > 300:
            picked.append({"messages": m[:2]})
        if len(picked) == n:
            break
    assert len(picked) == n
    path.write_text("".join(json.dumps(c) + "\n" for c in picked))


def test_short_training_on_smollm2_features_learns(tmp_path, monkeypatch):
    from core.assets import demo_target
    from core.cache import CacheConfig, build_cache
    from core.model import Eagle3Draft
    from core.train import TrainConfig, train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "sharegpt.jsonl"
    _short_sharegpt(data, 32)
    target = demo_target()
    cache = tmp_path / "cache"
    build_cache(CacheConfig(target=str(target), data=str(data), output_dir=str(cache),
                            draft_vocab_size=2048, max_length=160, batch_tokens=1280, device="cpu"))
    run = tmp_path / "run"
    res = train(TrainConfig(output_dir=str(run), cache=str(cache), max_length=160,
                            max_tokens_per_batch=640, ttt_length=2, max_steps=12, lr=3e-3,
                            warmup_ratio=0.1, val_fraction=0.2, save_every=12, tensorboard=False))
    val = metric_lines(run, "val")
    assert [r["step"] for r in val] == [0, 12]
    before, after = val[0]["acc_0"], val[-1]["acc_0"]
    print(f"SmolLM2 val acc_0 {before:.3f} -> {after:.3f}, loss {val[0]['loss']:.2f} -> "
          f"{val[-1]['loss']:.2f}, {res.tokens_per_s:.0f} tokens/s")
    assert before < 0.02  # a fresh draft is at chance over 2048 ids
    assert after > 0.08 and after > before + 0.07
    assert val[-1]["loss"] < val[0]["loss"] - 1.0
    assert val[-1]["tau_sim"] > val[0]["tau_sim"]
    # the trained draft loads for eval/export with SmolLM2's shapes
    draft, info = Eagle3Draft.from_pretrained(run, with_info=True)
    assert draft.config.hidden_size == 576 and draft.config.draft_vocab_size == 2048
    assert draft.config.rope_theta == 100000.0 and info.aux_layer_ids == [1, 14, 26]
    # `eagle eval --target demo`, as regen, cache, train and serve take it: the embedded folder
    from core.evaluate import EvalConfig, evaluate

    rep = evaluate(EvalConfig(target="demo", draft=str(run), data=str(data), num_prompts=1, num_draft_tokens=1,
                              max_new_tokens=4, allow_trained_prompts=True))
    assert rep["settings"]["target"] == str(target) and rep["summary"]["lossless"]
