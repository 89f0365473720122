"""Offline cache: write -> read round trip, error bounds of fp8 aux and top-k, refusal rules, corruption."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.cache import CacheConfig, CacheReader, build_cache
from core.cache.quant import FP8_REL_ERR, FP8_SUBNORMAL_ABS_ERR, fp8_dequantize, fp8_quantize, topk_compress, topk_expand
from core.errors import CorruptDataError, OutputExistsError, SettingsMismatchError, UsageError
from core.events import ListSink, ShardDone, StageFinished
from core.features import TargetFeatureExtractor
from core.vocab import load_vocab
from feature_support import SENTENCES, write_conversations

N_SAMPLES, MAX_LEN = 11, 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """No OpenMP spinning on a shared CPU (the results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """10 short conversations (70-143 tokens) + one whose answer starts past MAX_LEN (skipped)."""
    p = write_conversations(tmp_path_factory.mktemp("data") / "convs.jsonl", N_SAMPLES - 1, max_sentences=1)
    long_user = " ".join(SENTENCES * 2)
    row = {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "Sure."}]}
    with p.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return p


def _cfg(tiny_target, data, out, **kw) -> CacheConfig:
    base = dict(target=str(tiny_target), data=str(data), output_dir=str(out), draft_vocab_size=48,
                max_length=MAX_LEN, shard_size=4, batch_tokens=256, aux_dtype="bf16", target_store="probs",
                target_dtype="fp16")
    base.update(kw)
    return CacheConfig(**base)


@pytest.fixture(scope="module")
def reference(tiny_target, data, tmp_path_factory):
    """A full-precision-ish cache (aux fp32 would be the same numbers as bf16's source) plus the
    extractor's own fp32 features for the same samples: the 'full precision path'."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    sink = ListSink()
    res = build_cache(_cfg(tiny_target, data, out), sink)
    reader = CacheReader(out)
    with TargetFeatureExtractor(str(tiny_target), reader.vocab, reader.target_info["aux_layer_ids"]) as ex:
        feats = ex([reader[i]["input_ids"] for i in range(len(reader))])
    return res, reader, feats, sink


def test_round_trip(reference):
    res, reader, feats, sink = reference
    assert res.samples == len(reader) == len(feats) and res.samples + res.skipped == N_SAMPLES
    assert res.shards == len(sink.of(ShardDone)) == -(-res.samples // 4)
    assert sink.of(StageFinished)[0].summary["samples"] == res.samples
    man = json.loads((reader.dir / "manifest.json").read_text())
    assert man["complete"] and man["settings"]["storage"]["aux_dtype"] == "bf16"
    prov = man["extra"]["provenance"]
    assert prov["device"] == "cpu" and "torch" in prov["versions"] and prov["command"]
    assert man["settings"]["aux_layer_ids"] == [0, 1, 2] and man["settings"]["tokenizer"]
    assert all(len(s["sha256"]) == 64 and s["samples"] == len(s["lengths"]) for s in man["shards"])
    assert reader.target_config().hidden_size == reader.target_info["hidden_size"] == 64
    assert reader.vocab.draft_vocab_size == 48
    H = 64
    for i, f in enumerate(feats):
        r = reader[i]
        T = r["input_ids"].numel()
        assert T == reader.lengths[i] <= MAX_LEN  # variable length, no padding
        assert torch.equal(r["input_ids"], f.input_ids)
        assert r["aux_hidden"].shape == (T, 3 * H) and r["aux_hidden"].dtype == torch.float32
        assert r["target_probs"].shape == (T, 48) and r["target_probs"].dtype == torch.float32
        assert r["loss_mask"].dtype == torch.bool and r["loss_mask"].any()
        assert torch.equal(r["position_mask"], f.position_mask)
        # bf16 aux: relative error <= 2^-8 per element; fp16 probs renormalized: abs error < 1e-3
        err = (r["aux_hidden"] - f.aux_hidden).abs()
        assert bool((err <= 2 ** -8 * f.aux_hidden.abs() + 1e-6).all())
        assert float((r["target_probs"] - f.target_probs).abs().max()) < 1e-3
    # DataLoader workers get a pickled reader without open handles; it reopens shards itself
    import pickle

    clone = pickle.loads(pickle.dumps(reader))
    assert not clone._handles and torch.equal(clone[len(reader) - 1]["aux_hidden"], reader[len(reader) - 1]["aux_hidden"])
    # sample_index points back into the dataset, in order
    idx = [reader[i]["sample_index"] for i in range(len(reader))]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    skipped = [json.loads(x) for x in (reader.dir / "failures.jsonl").read_text().splitlines()]
    assert res.skipped == len(skipped) == 1 and skipped[0]["index"] == N_SAMPLES - 1
    assert "no supervised" in skipped[0]["reason"]
    assert len(set(reader.lengths)) > 3 and max(reader.lengths) == MAX_LEN


def test_fp8_aux_and_topk_error_bounds(tiny_target, data, tmp_path, reference):
    _, ref_reader, feats, _ = reference
    out = tmp_path / "c"
    build_cache(_cfg(tiny_target, data, out, aux_dtype="fp8", target_store="topk", topk=8))
    reader = CacheReader(out)
    assert len(reader) == len(feats)
    rel_errs, tv_excess = [], []
    for i, f in enumerate(feats):
        r = reader[i]
        x = f.aux_hidden
        # elementwise bound: 2^-4 relative (3 mantissa bits) + 2^-10 * scale in the subnormal range,
        # with one scale per token and aux layer = amax / 448
        scale = x.reshape(x.shape[0], 3, -1).abs().amax(-1) / 448.0
        bound = FP8_REL_ERR * x.abs() + FP8_SUBNORMAL_ABS_ERR * scale.repeat_interleave(64, dim=1) + 1e-7
        assert bool(((r["aux_hidden"] - x).abs() <= bound).all())
        rel_errs.append(float((r["aux_hidden"] - x).norm(dim=-1).div(x.norm(dim=-1)).max()))
        # top-k: total variation to the full distribution = 1 - (top-k mass), up to fp16 rounding
        p = f.target_probs
        mass = torch.topk(p, 8, dim=-1).values.sum(-1)
        tv = 0.5 * (r["target_probs"] - p).abs().sum(-1)
        assert bool((tv <= (1 - mass) + 2e-3).all())
        tv_excess.append(float((tv - (1 - mass)).abs().max()))
        assert torch.equal(r["position_mask"], f.position_mask)
        torch.testing.assert_close(r["target_probs"].sum(-1), torch.ones(len(p)))
        # training reads the same rows sparse: (ids, probs) [T, k] that scatter to the dense row
        sp = reader.get(i, dense_targets=False)
        assert "target_probs" not in sp and sp["target_topk_ids"].shape == (len(p), 8)
        dense = torch.zeros_like(p).scatter_(1, sp["target_topk_ids"], sp["target_topk_probs"])
        torch.testing.assert_close(dense, r["target_probs"], rtol=1e-6, atol=1e-7)
    from core.train.data import OfflineSource

    batch = OfflineSource(reader, [0, 1], MAX_LEN).batch([0, 1], torch.device("cpu"))
    n = len(feats[0].target_probs) + len(feats[1].target_probs)
    assert "target_probs" not in batch and batch["target_topk_probs"].shape == (1, n, 8)
    # per-token relative L2 error of the 8-bit aux: well under the 2^-4 element bound
    assert max(rel_errs) < 0.05
    assert max(tv_excess) < 2e-3
    # and it is smaller on disk than the bf16 + full-probs reference
    assert reader.manifest.extra["summary"]["bytes"] < ref_reader.manifest.extra["summary"]["bytes"]


def test_hidden_store_recomputes_distribution(tiny_target, data, tmp_path, reference):
    _, _, feats, _ = reference
    out = tmp_path / "h"
    build_cache(_cfg(tiny_target, data, out, aux_dtype="fp16", target_store="hidden", target_dtype="bf16"))
    reader = CacheReader(out)
    assert (out / "head.safetensors").exists()
    for i, f in enumerate(feats):
        r = reader[i]
        tv = 0.5 * (r["target_probs"] - f.target_probs).abs().sum(-1)
        assert float(tv.max()) < 0.02  # bf16 final hidden + bf16 lm_head rows
        torch.testing.assert_close(r["aux_hidden"], f.aux_hidden, rtol=2 ** -10, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.floats(-12, 12), st.floats(-12, 12), st.integers(0, 2 ** 16))
def test_fp8_bound_holds_for_any_magnitudes(T, log_a, log_b, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 3 * 16, generator=g)
    x[:, :16] *= 2.0 ** log_a  # the three layers can differ by orders of magnitude
    x[:, 16:32] *= 2.0 ** log_b
    x[0, 5] = 0.0
    q, s = fp8_quantize(x)
    assert q.dtype == torch.uint8 and s.shape == (T, 3)
    y = fp8_dequantize(q, s)
    bound = FP8_REL_ERR * x.abs() + FP8_SUBNORMAL_ABS_ERR * s.repeat_interleave(16, dim=1)
    assert bool(((y - x).abs() <= bound * (1 + 1e-6)).all())
    assert float(y[0, 5]) == 0.0


def test_topk_expand_is_exact_on_the_kept_entries():
    p = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3, -1)
    v, i = topk_compress(p, 50)
    torch.testing.assert_close(topk_expand(v, i, 50), p, rtol=1e-3, atol=1e-4)  # k = Vd: lossless up to fp16
    v, i = topk_compress(p, 5)
    d = topk_expand(v, i, 50)
    assert int((d > 0).sum(-1).max()) == 5


def test_refusal_rules_and_resume_of_complete_cache(tiny_target, data, tmp_path):
    out = tmp_path / "c"
    build_cache(_cfg(tiny_target, data, out, target_store="topk", topk=4))
    with pytest.raises(OutputExistsError, match="already holds"):
        build_cache(_cfg(tiny_target, data, out, target_store="topk", topk=4))
    with pytest.raises(SettingsMismatchError, match="storage"):
        build_cache(_cfg(tiny_target, data, out, target_store="topk", topk=8, resume=True))
    with pytest.raises(SettingsMismatchError, match="max_length"):
        build_cache(_cfg(tiny_target, data, out, target_store="topk", topk=4, max_length=64, resume=True))
    before = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    res = build_cache(_cfg(tiny_target, data, out, target_store="topk", topk=4, resume=True))
    assert res.resumed and res.shards_written == 0
    assert before == {p.name: p.read_bytes() for p in out.glob("shard-*")}


def test_a_moved_target_folder_keeps_its_cache(tiny_target, data, tmp_path):
    """The target is known by its content hashes: the same model in another folder (another
    EAGLE_CACHE_DIR, a moved snapshot) resumes the cache; caches that recorded the path resume too."""
    import shutil

    out = tmp_path / "c"
    build_cache(_cfg(tiny_target, data, out, target_store="topk", topk=4))
    moved = tmp_path / "moved-target"
    shutil.copytree(tiny_target, moved)
    res = build_cache(_cfg(str(moved), data, out, target_store="topk", topk=4, resume=True))
    assert res.resumed and res.shards_written == 0
    assert CacheReader(out).target_info["target_path"] == str(moved.resolve())
    m = json.loads((out / "manifest.json").read_text())  # the layout of older caches
    m["settings"]["target"]["path"] = str(tiny_target)
    (out / "manifest.json").write_text(json.dumps(m))
    assert build_cache(_cfg(str(moved), data, out, target_store="topk", topk=4, resume=True)).resumed
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("}", ', "x": 1}', 1))
    with pytest.raises(SettingsMismatchError, match="target"):
        build_cache(_cfg(str(moved), data, out, target_store="topk", topk=4, resume=True))


def test_a_moved_dataset_keeps_its_cache(tiny_target, data, tmp_path):
    """The conversations are known by their tokens: the same file elsewhere resumes the cache (its
    new path recorded), as do caches that recorded the old path; other conversations are refused."""
    import shutil

    out = tmp_path / "c"
    build_cache(_cfg(tiny_target, data, out, target_store="topk", topk=4))
    moved = tmp_path / "elsewhere" / "convs.jsonl"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    res = build_cache(_cfg(tiny_target, str(moved), out, target_store="topk", topk=4, resume=True))
    assert res.resumed and res.shards_written == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["extra"]["data_source"] == str(moved) and "source" not in m["settings"]["data"]
    m["settings"]["data"]["source"] = str(data)  # the layout of older caches
    (out / "manifest.json").write_text(json.dumps(m))
    assert build_cache(_cfg(tiny_target, str(moved), out, target_store="topk", topk=4, resume=True)).resumed
    lines = moved.read_text().splitlines()
    moved.write_text("\n".join(lines[1:]) + "\n")  # one conversation fewer: other tokens
    with pytest.raises(SettingsMismatchError, match="data"):
        build_cache(_cfg(tiny_target, str(moved), out, target_store="topk", topk=4, resume=True))


def test_config_validated_before_any_work(tiny_target, data, tmp_path):
    bad = [dict(aux_dtype="int4"), dict(target_store="logits"), dict(topk=0, target_store="topk"),
           dict(topk=100, target_store="topk"), dict(nproc=0), dict(device="tpu"),
           dict(batch_tokens=10), dict(aux_layer_ids=[1, 1, 2]), dict(device_map="auto", nproc=2)]
    for kw in bad:
        with pytest.raises(UsageError):
            build_cache(_cfg(tiny_target, data, tmp_path / "x", **kw))
    with pytest.raises(UsageError, match="out of range"):
        build_cache(_cfg(tiny_target, data, tmp_path / "x", aux_layer_ids=[0, 1, 3]))
    assert not (tmp_path / "x").exists()


def test_vocab_reuse_is_checked(tiny_target, data, tmp_path):
    from eagle_tui.cli import main

    assert main(["vocab", "--target", str(tiny_target), "--data", str(data), "--draft-vocab-size", "40",
                 "--output", str(tmp_path / "v"), "--max-length", str(MAX_LEN)]) == 0
    with pytest.raises(SettingsMismatchError, match="draft_vocab_size"):
        build_cache(_cfg(tiny_target, data, tmp_path / "c1", vocab=str(tmp_path / "v")))
    res = build_cache(_cfg(tiny_target, data, tmp_path / "c2", vocab=str(tmp_path / "v"), draft_vocab_size=40))
    assert torch.equal(CacheReader(tmp_path / "c2").vocab.selected, load_vocab(tmp_path / "v").selected)
    assert res.coverage == load_vocab(tmp_path / "v").coverage


def test_flipped_byte_and_truncation_are_caught_and_named(tiny_target, data, tmp_path):
    out = tmp_path / "c"
    build_cache(_cfg(tiny_target, data, out, aux_dtype="fp8", target_store="topk", topk=4))
    shard = out / "shard-000001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    reader = CacheReader(out)
    reader[0]  # shard 0 is fine
    with pytest.raises(CorruptDataError, match="shard-000001.safetensors.*checksum"):
        reader[4]
    # truncation, with checksums off: the safetensors header no longer fits the file
    shard.write_bytes(bytes(blob[: len(blob) // 3]))
    with pytest.raises(CorruptDataError, match="shard-000001.safetensors"):
        CacheReader(out, verify=False)[4]
    with pytest.raises(CorruptDataError, match="shard-000001.safetensors"):
        CacheReader(out).verify_all()
    # --resume notices the bad shard and rewrites it
    sink = ListSink()
    res = build_cache(_cfg(tiny_target, data, out, aux_dtype="fp8", target_store="topk", topk=4, resume=True), sink)
    assert res.shards_written == 1 and [e.shard for e in sink.of(ShardDone)] == [1]
    CacheReader(out).verify_all()


def test_eagle_cache_cli_jsonl(tiny_target, data, tmp_path, capsys):
    from eagle_tui.cli import main

    out = tmp_path / "c"
    rc = main(["--events", "jsonl", "cache", "--target", str(tiny_target), "--data", str(data), "--output",
               str(out), "--draft-vocab-size", "48", "--max-length", str(MAX_LEN), "--shard-size", "3",
               "--aux-layers", "2,0,1", "--topk", "4", "--batch-tokens", "256"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    kinds = [x["event"] for x in lines]
    assert kinds.count("shard_done") == -(-(len(CacheReader(out))) // 3) and kinds[-1] == "stage_finished"
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["aux_layer_ids"] == [0, 1, 2] and m["settings"]["storage"]["aux_dtype"] == "fp8"
    assert m["extra"]["provenance"]["command"].startswith("eagle ")
    rc = main(["cache", "--target", str(tiny_target), "--data", str(data), "--output", str(tmp_path / "d"),
               "--aux-layers", "1,x,2"])
    assert rc == 2 and "--aux-layers" in capsys.readouterr().err
