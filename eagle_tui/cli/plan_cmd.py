"""`eagle plan`: disk, GPU memory and time budgets for a target and a dataset, before running."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from eagle_tui.cli import common


def render_plan(p: dict[str, Any]) -> str:
    from core.budget import format_bytes as fb

    t = p["target"]
    lines = [f"target {t['name']}: hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, vocab "
             f"{t['vocab_size']}, {t['params'] / 1e9:.2f} B params",
             f"{p['num_samples']} samples, mean {p['mean_length']:.0f} tokens (max {p['seq_length']}), "
             f"draft vocab {p['draft_vocab_size']}", ""]
    fits = (p.get("disk") or {}).get("fits", {})
    head = f"{'storage option':<24}{'bytes/token':>12}{'per sample':>12}{'total':>12}{'vs NeMo':>9}"
    lines += [head + ("  fits" if fits else ""), "-" * (len(head) + (6 if fits else 0))]
    for r in p["rows"]:
        row = (f"{r['option']:<24}{r['bytes_per_token']:>12,}{fb(r['bytes_per_sample']):>12}"
               f"{fb(r['total_bytes']):>12}{r['vs_nemo']:>8.2f}x")
        if fits:
            row += "  yes" if fits.get(r["option"]) else "  NO"
        lines.append(row)
    lines.append("")
    for a in p["anchors"]:
        lines.append(f"{a['name']:<24}{'':>12}{fb(a['bytes_per_sample']):>12}{fb(a['total_bytes']):>12}"
                     f"{a['vs_nemo']:>8.2f}x  ({a['layout']})")
    if p.get("disk"):
        lines += ["", f"free disk at {p['disk']['path']}: {fb(p['disk']['free_bytes'])}"]
    g = p["gpu"]
    f, o = g["target_forward"], g["online_step"]
    lines += ["", f"GPU memory, {g['batch_tokens']} tokens per batch:",
              f"  target forward (cache): {fb(f['total'])} (weights {fb(f['weights'])}, activations "
              f"{fb(f['activations'])}, logits chunk {fb(f['logits_chunk'])}, draft-vocab probs "
              f"{fb(f['draft_probs'])}, runtime {fb(f['runtime'])})",
              f"  online training step (TTT {g['ttt_length']}): {fb(o['total'])} (target {fb(o['target'])}, "
              f"draft + AdamW {fb(o['draft_and_optimizer'])}, embedding {fb(o['draft_embedding'])}, "
              f"TTT activations {fb(o['ttt_activations'])})"]
    if p.get("time"):
        tm = p["time"]
        lines += ["", f"measured {tm['tokens_per_s']:.0f} tokens/s -> cache of {tm['total_tokens']} tokens "
                      f"in about {tm['cache_seconds'] / 60:.1f} min"]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    from core.cache.config import CacheSettings
    from core.train.config import TrainSettings

    @app.command("plan")
    def plan(
        target: str = typer.Option(..., "--target", help="Model folder, its config.json, an `eagle cache` "
                                   "folder, 'demo', or a preset: llama-3.1-8b, llama-3.1-70b, llama-3.2-1b, "
                                   "qwen3-8b, smollm2-135m."),
        samples: Optional[int] = typer.Option(None, "--samples", help="Number of samples (default: the "
                                              "dataset's, else 1000)."),
        mean_length: Optional[float] = typer.Option(None, "--mean-length", help="Mean tokens per sample "
                                                    "(default: --max-length)."),
        data: Optional[str] = typer.Option(None, "--data", help="Measure the length distribution of this "
                                           "dataset with the target's tokenizer (needs a model folder)."),
        max_length: int = common.option(CacheSettings, "max_length"),
        draft_vocab_size: Optional[int] = common.option(CacheSettings, "draft_vocab_size"),
        topk: int = common.option(CacheSettings, "topk"),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="Where the cache would go "
                                             "(free disk is checked there)."),
        batch_tokens: int = typer.Option(TrainSettings.default("max_tokens_per_batch"), "--batch-tokens",
                                         help="Tokens per batch for the GPU estimates (training's "
                                         "--max-tokens-per-batch)."),
        ttt_length: int = common.option(TrainSettings, "ttt_length"),
        measure: bool = typer.Option(False, "--measure", help="Time a short target warm-up for a time "
                                     "estimate (needs a model folder)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="--data: use the first N conversations."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    ) -> None:
        """Bytes per sample and in total for every cache storage option next to the NeMo, SpecForge
        and speculators layouts, free disk, GPU memory for the target forward and an online step."""
        from core.budget import make_plan
        from core.cache import StorageOptions

        StorageOptions(target_store="topk", topk=topk).validate(draft_vocab_size)  # before any slow work
        lengths = None
        if data is not None:
            from types import SimpleNamespace

            from core.tokenize import load_tokenizer
            from core.vocab import tokenize_dataset

            spec = SimpleNamespace(data=data, split=None, messages_column=None, shuffle_seed=None,
                                   limit=limit, strict=False, max_length=max_length)
            rows, _ = tokenize_dataset(spec, load_tokenizer(target), None, stage="plan")
            lengths = [len(ids) for _, ids, _ in rows]
        n = samples or (len(lengths) if lengths else 1000)
        rate = None
        if measure:
            from core.budget import measure_target_tokens_per_s

            rate = measure_target_tokens_per_s(target, batch_tokens=min(batch_tokens, 2048),
                                               seq_length=min(max_length, 512))
        p = make_plan(target, num_samples=n, mean_length=mean_length, lengths=lengths, seq_length=max_length,
                      draft_vocab_size=draft_vocab_size, topk=topk, output_dir=output,
                      batch_tokens=batch_tokens, ttt_length=ttt_length, tokens_per_s=rate).to_dict()
        if as_json or common.jsonl_mode():
            print(json.dumps(p, indent=None if common.jsonl_mode() else 2))
        else:
            common.echo(render_plan(p))
