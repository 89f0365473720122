"""Offline-cache bytes per sample and CPU throughput, next to the anchors' layouts, same run.

    .venv/bin/python bench/cache.py [--samples 12] [--max-length 512] [--draft-vocab-size 8192]

Part 1 (arithmetic, core.budget = the writer's own layout): bytes per sample of every storage
option for Llama-3.1-8B at 2048 tokens (Vd 8192 and 32000) next to NeMo (aux [3H] + probs [Vd],
bf16, padded to seq_length), SpecForge (final hidden + aux [4H] bf16) and speculators (4 x [H]
bf16), from their documented shapes (eagle3-reference.md section 5).

Part 2 (measured, CPU, SmolLM2-135M-Instruct on demo ShareGPT conversations; a tiny random Llama
when the demo assets are missing): features are extracted once (timed), then every option is
encoded and written as real shards (timed, sizes from disk); samples/s per option is reported as
a ratio to the NeMo-like baseline (aux bf16 + full draft-vocab probs) measured in the same run,
with the error of each option against the full-precision features: max per-token relative L2
error of the aux states and mean / max total variation of the target distribution. Finally one
end-to-end `build_cache` run of the default option (load, tokenize, extract, write).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.budget import TargetShape, format_bytes, make_plan  # noqa: E402
from core.cache import CacheConfig, CacheDims, StorageOptions, build_cache  # noqa: E402
from core.cache import layout  # noqa: E402
from core.cache.writer import encode_sample, pack_shard, write_safetensors_atomic  # noqa: E402

OPTIONS = [StorageOptions("bf16", "probs", 64, "bf16"),  # NeMo-like baseline (unpadded)
           StorageOptions("fp8", "probs", 64, "bf16"), StorageOptions("bf16", "topk", 64),
           StorageOptions("fp8", "topk", 64), StorageOptions("fp8", "topk", 32),
           StorageOptions("bf16", "hidden", 64, "bf16"), StorageOptions("fp8", "hidden", 64, "bf16")]


def part1(vds: list[int]) -> list[dict]:
    out = []
    for vd in vds:
        plan = make_plan("llama-3.1-8b", num_samples=1, seq_length=2048, draft_vocab_size=vd, topk=64,
                         options=OPTIONS)
        print(f"\nLlama-3.1-8B, 2048-token sample, draft vocab {vd}:")
        print(f"  {'layout':<26}{'bytes/sample':>14}{'vs NeMo':>9}")
        for a in plan.anchors:
            print(f"  {a['name']:<26}{format_bytes(a['bytes_per_sample']):>14}{a['vs_nemo']:>8.3f}x  ({a['layout']})")
        for r in plan.rows:
            print(f"  {r['option']:<26}{format_bytes(r['bytes_per_sample']):>14}{r['vs_nemo']:>8.3f}x")
        out.append({"draft_vocab_size": vd, "anchors": plan.anchors, "rows": plan.rows})
    return out


def demo_inputs(n: int, max_length: int):
    """(target path, [(index, ids, mask)], label): SmolLM2 + demo ShareGPT, else a tiny random Llama."""
    from types import SimpleNamespace

    from core.tokenize import load_tokenizer
    from core.vocab import tokenize_dataset

    try:
        from core.assets import demo_dataset, demo_target

        target, data = demo_target(), demo_dataset()
        label = "SmolLM2-135M-Instruct, demo ShareGPT"
    except Exception as e:  # assets missing: still measure something real
        print(f"(demo assets unavailable: {e}; using a tiny random Llama)")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_tiny_llama, build_tiny_tokenizer
        from feature_support import write_conversations

        target = Path(tempfile.mkdtemp()) / "tiny"
        tok = build_tiny_tokenizer(target)
        build_tiny_llama(target, vocab_size=len(tok), num_hidden_layers=8)
        data = write_conversations(target.parent / "c.jsonl", n * 2)
        label = "tiny random Llama (fallback)"
    spec = SimpleNamespace(data=str(data), split=None, messages_column=None, shuffle_seed=None,
                           limit=n * 3, strict=False, max_length=max_length)
    samples, _ = tokenize_dataset(spec, load_tokenizer(str(target)))
    return target, str(data), samples[:n], label


def part2(n: int, max_length: int, vd: int) -> dict:
    from core.features import TargetFeatureExtractor
    from core.vocab import build_vocab

    target, data, samples, label = demo_inputs(n, max_length)
    V = TargetShape.resolve(str(target)).vocab_size
    vocab = build_vocab([(ids, m) for _, ids, m in samples], min(vd, V), V)
    lengths = [len(ids) for _, ids, _ in samples]
    print(f"\nmeasured on CPU: {label}, {len(samples)} samples, mean {sum(lengths) / len(lengths):.0f} tokens "
          f"(max {max_length}), draft vocab {vocab.draft_vocab_size}, coverage {vocab.coverage:.1%}, "
          f"torch threads {torch.get_num_threads()}")
    ex = TargetFeatureExtractor(str(target), vocab, final_hidden=True, max_batch_tokens=max(2048, max_length))
    ex(samples[0][1][:16])  # warm-up
    t0 = time.perf_counter()
    with torch.no_grad():  # baseline: the plain HF forward with full logits, one sample at a time
        for _, ids, _ in samples:
            ex.model(input_ids=torch.tensor([ids]))
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = ex([ids for _, ids, _ in samples])
    t_extract = time.perf_counter() - t0
    dims = CacheDims(ex.hidden_size, vocab.draft_vocab_size)
    head = ex.head_tensors()
    shape = TargetShape.resolve(str(target))
    nemo = len(lengths) * layout.tensor_bytes("bf16", (max_length, 3 * shape.hidden_size + vocab.draft_vocab_size))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for opts in OPTIONS:
            t0 = time.perf_counter()
            enc = [encode_sample(f.input_ids, torch.tensor(m), f.aux_hidden, f.target_probs, f.position_mask,
                                 f.final_hidden, dims, opts) for f, (_, _, m) in zip(feats, samples)]
            path = Path(tmp) / f"{opts.label}.safetensors"
            write_safetensors_atomic(path, pack_shard(enc, range(len(enc)), dims, opts), layout.SHARD_METADATA)
            t_write = time.perf_counter() - t0
            nbytes = path.stat().st_size
            predicted = layout.shard_file_bytes(lengths, dims, opts)
            aux_err, tvs = _errors(path, feats, dims, opts, head, ex.norm_eps)
            rows.append({"option": opts.label, "bytes_per_sample": nbytes / len(lengths),
                         "predicted_bytes": predicted, "bytes": nbytes, "vs_nemo_padded": nbytes / nemo,
                         "samples_per_s": len(lengths) / (t_extract + t_write),
                         "aux_max_rel_err": aux_err, "tv_mean": float(tvs.mean()), "tv_max": float(tvs.max())})
    base = rows[0]
    spec_bytes = sum(n * 4 * shape.hidden_size * 2 for n in lengths) / len(lengths)
    print(f"  plain HF forward with full logits (baseline): {len(lengths) / t_plain:.2f} samples/s, "
          f"{sum(lengths) / t_plain:.0f} tokens/s")
    print(f"  feature extraction (aux hooks + chunked head): {len(lengths) / t_extract:.2f} samples/s, "
          f"{sum(lengths) / t_extract:.0f} tokens/s ({t_plain / t_extract:.2f}x baseline)")
    print(f"  NeMo padded to {max_length}: {format_bytes(nemo / len(lengths))}/sample; SpecForge/speculators "
          f"at these lengths: {format_bytes(spec_bytes)}/sample")
    print(f"  {'option':<24}{'bytes/sample':>13}{'vs NeMo':>9}{'vs base':>9}{'samples/s':>11}{'x base':>8}"
          f"{'aux rel err':>13}{'TV mean':>9}{'TV max':>8}")
    for r in rows:
        assert abs(r["bytes"] - r["predicted_bytes"]) / r["bytes"] < 0.01, r  # layout arithmetic = disk
        print(f"  {r['option']:<24}{format_bytes(r['bytes_per_sample']):>13}{r['vs_nemo_padded']:>8.3f}x"
              f"{r['bytes'] / base['bytes']:>8.3f}x{r['samples_per_s']:>11.2f}{r['samples_per_s'] / base['samples_per_s']:>7.2f}x"
              f"{r['aux_max_rel_err']:>13.4f}{r['tv_mean']:>9.4f}{r['tv_max']:>8.4f}")
    # end to end, the default option
    with tempfile.TemporaryDirectory() as tmp:
        res = build_cache(CacheConfig(target=str(target), data=data, output_dir=str(Path(tmp) / "c"),
                                      draft_vocab_size=vocab.draft_vocab_size, max_length=max_length,
                                      limit=len(samples), shard_size=8,
                                      batch_tokens=max(2048, max_length)))
        print(f"  end to end `build_cache` (aux-fp8+top64): {res.samples} samples in {res.seconds:.1f}s "
              f"({res.samples_per_s} samples/s incl. model load and tokenization), "
              f"{format_bytes(res.bytes_per_sample)}/sample")
    return {"label": label, "samples": len(lengths), "mean_length": sum(lengths) / len(lengths),
            "extract_samples_per_s": len(lengths) / t_extract, "plain_forward_samples_per_s": len(lengths) / t_plain,
            "rows": rows,
            "end_to_end": res.to_dict()}


def _errors(path: Path, feats, dims, opts, head, eps):
    """Decode the written shard with the reader's own decoders; compare with full precision."""
    from safetensors.torch import load_file

    from core.cache.quant import fp8_dequantize, topk_expand
    from core.features import probs_from_final_hidden

    t = load_file(str(path))
    off = t["offsets"].tolist()
    aux_err, tvs = 0.0, []
    for i, f in enumerate(feats):
        a, b = off[i], off[i + 1]
        aux = (fp8_dequantize(t["aux_fp8"][a:b], t["aux_scale"][a:b]) if opts.aux_dtype == "fp8"
               else t["aux_hidden"][a:b].float())
        aux_err = max(aux_err, float(((aux - f.aux_hidden).norm(dim=-1) / f.aux_hidden.norm(dim=-1)).max()))
        if opts.target_store == "probs":
            p = t["target_probs"][a:b].float()
            p = p / p.sum(-1, keepdim=True)
        elif opts.target_store == "topk":
            p = topk_expand(t["topk_values"][a:b], t["topk_indices"][a:b], dims.draft_vocab_size)
        else:
            rows = head["lm_head_rows"].to(torch.bfloat16)  # as stored in head.safetensors
            p = probs_from_final_hidden(t["final_hidden"][a:b], head["norm_weight"], eps, rows)
        tvs.append(0.5 * (p - f.target_probs).abs().sum(-1))
    return aux_err, torch.cat(tvs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--draft-vocab-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", type=str, default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"llama_3_1_8b": part1([8192, 32000]),
              "measured": part2(args.samples, args.max_length, args.draft_vocab_size)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
