"""`eagle eval`: a briefly trained draft gives tau > 1 with output identical to the target's greedy.

The target is a tiny random Llama (initializer_range 0.1: peaked, context-dependent, somewhat
repetitive greedy output), the draft is trained for a few dozen steps with the project's TTT loss
on the target's own greedy answers (features from core.features), saved as a real run with
core.train's checkpoint writer. Eval then runs real chain speculative decoding on held-out prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import InputDataError, UsageError

WORDS = ["fox", "Paris", "code", "hello", "numbers", "dog", "capital", "add", "help", "quick",
         "lazy", "draft", "France", "answer", "short", "brown"]
HELD_OUT = ["Tell me about a fox and Paris.", "What is the capital of dog?", "Write code for help.",
            "Tell me about numbers and quick."]


def _greedy_batch(model, tok, prompts: list[str], n: int) -> list[tuple[list[int], list[int]]]:
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) for q in prompts]
    tok.padding_side = "left"
    enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
    samples = []
    for row, mask in zip(out, enc["attention_mask"]):
        prompt = row[: mask.numel()][mask.bool()].tolist()
        answer = row[mask.numel():].tolist()
        samples.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return samples


def _pad_batch(samples, feats) -> dict:
    L = max(len(s) for s, _ in samples)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((L - t.shape[0],) + tuple(t.shape[1:]))])

    return {"input_ids": torch.stack([pad(torch.tensor(s)) for s, _ in samples]),
            "loss_mask": torch.stack([pad(torch.tensor(m)) for _, m in samples]),
            "aux_hidden": torch.stack([pad(f.aux_hidden) for f in feats]),
            "target_probs": torch.stack([pad(f.target_probs) for f in feats]),
            "position_mask": torch.stack([pad(f.position_mask) for f in feats]),
            "position_ids": torch.arange(L).expand(len(samples), L).clone(),
            "attention_mask": torch.stack([pad(torch.ones(len(s), dtype=torch.long)) for s, _ in samples])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, target dir, run dir, held-out data file, tau_sim of the last training step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import build_tiny_llama, build_tiny_tokenizer
    from core.features import TargetFeatureExtractor
    from core.manifest import Manifest
    from core.model import Eagle3Draft
    from core.model.ttt import ttt_forward_loss
    from core.train.checkpoint import save_checkpoint, write_metrics_line, write_run_embeddings
    from core.vocab import build_vocab

    root = tmp_path_factory.mktemp("eval")
    target_dir = root / "target"
    tok = build_tiny_tokenizer(target_dir)
    build_tiny_llama(target_dir, vocab_size=len(tok), initializer_range=0.1)
    tok = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    samples = _greedy_batch(model, tok, [f"Tell me about {a} and {b}." for a in WORDS for b in WORDS[:2]], 20)
    vocab = build_vocab(samples, 128, len(tok))
    ex = TargetFeatureExtractor(model, vocab, device="cpu")
    feats = ex([s for s, _ in samples])
    ex.close()
    batch = _pad_batch(samples, feats)
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(model, vocab)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1.5e-2)
    for _ in range(40):
        out = ttt_forward_loss(draft, batch, ttt_length=2, attention_backend="sdpa")
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    run = root / "run"
    run.mkdir()
    Manifest(kind="train", format_version=1, settings={}, extra={"target": str(target_dir)}).save(run)
    write_run_embeddings(run, draft.embed_tokens.weight)
    save_checkpoint(run, 40, draft.state_dict(), opt.state_dict(), {"epoch": 0}, draft.config.to_dict(), 1)
    write_metrics_line(run, {"step": 40, "split": "train", "epoch": 0.0, "supervised": 8.0, "tau_sim": 1.0})
    write_metrics_line(run, {"step": 40, "split": "val", "tau_sim": float(out.tau_sim)})
    data = root / "held_out.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": "x"}]}) + "\n"
                            for q in HELD_OUT))
    return root, target_dir, run, data, float(out.tau_sim)


def test_trained_draft_tau_above_one_and_lossless(trained, capsys):
    from eagle_tui.cli import main

    root, target, run, data, tau_sim = trained
    out = root / "report.json"
    rc = main(["eval", "--target", str(target), "--draft", str(run), "--data", str(data),
               "--num-prompts", "4", "--num-draft-tokens", "3", "--max-new-tokens", "32",
               "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rep = json.loads(out.read_text())
    s = rep["summary"]
    assert rep["num_prompts"] == 4 and rep["draft_info"]["kind"] == "run"
    assert s["lossless"] and all(p["lossless"] for p in rep["prompts"])
    assert s["tau"] > 1.2, s
    lo, hi = s["tau_interval"]
    assert lo <= s["tau"] <= hi and f"{s['tau']:.3f} [{lo:.2f}, {hi:.2f}]" in text
    assert len(s["accept_rate"]) == 3 and s["accept_rate"][0] >= s["accept_rate"][1] >= s["accept_rate"][2]
    assert s["cost_ratio"] > 0
    assert s["implied_speedup"] == pytest.approx(s["tau"] / (1 + 3 * s["cost_ratio"]))
    assert rep["tau_sim"] == pytest.approx(tau_sim)
    assert rep["tau_sim_train"] == 1.0 and f"{rep['tau_sim_train']:.3f} its own batches (last epoch)" in text
    total = sum(len(p["accept_lengths"]) for p in rep["prompts"])
    assert total == s["verify_steps"] and all(1 <= n <= 4 for p in rep["prompts"] for n in p["accept_lengths"])
    assert "tau (accept length" in text and "lossless: ok" in text
    print(f"\n[eval] tau={s['tau']:.3f} tau_sim={tau_sim:.3f} accept_rate={s['accept_rate']} "
          f"c={s['cost_ratio']:.3f} implied={s['implied_speedup']:.2f}x measured={s['measured_speedup']:.2f}x")


def test_export_folder_and_converted_third_party_give_same_tau(trained, tmp_path):
    from safetensors.torch import save_file

    from core.events import ListSink, Progress, StageFinished
    from core.evaluate import EvalConfig, evaluate
    from core.export import ConvertConfig, ExportConfig, convert_checkpoint, export_draft
    from core.export.format import read_export

    root, target, run, data, _ = trained
    kw = dict(target=str(target), data=str(data), num_prompts=2, num_draft_tokens=3, max_new_tokens=16)
    base = evaluate(EvalConfig(draft=str(run), **kw))
    export_draft(ExportConfig(source=str(run), output_dir=str(tmp_path / "export")))
    sink = ListSink()
    ours = evaluate(EvalConfig(draft=str(tmp_path / "export"), **kw), sink)
    assert ours["summary"]["tau"] == base["summary"]["tau"] and ours["summary"]["lossless"]
    assert [p["accept_lengths"] for p in ours["prompts"]] == [p["accept_lengths"] for p in base["prompts"]]
    assert len([e for e in sink.of(Progress) if e.stage == "eval"]) == 2
    assert len([e for e in sink.of(StageFinished) if e.stage == "eval"]) == 1
    assert sink.of(StageFinished)[-1].summary["tau"] == ours["summary"]["tau"]
    # a third party's SpecForge-style folder (no embeddings, midlayer keys) converted, then evaluated
    config, tensors, _ = read_export(tmp_path / "export")
    sf = tmp_path / "epoch_0"
    sf.mkdir()
    (sf / "config.json").write_text(json.dumps({k: v for k, v in config.items()}))
    save_file({k: v for k, v in tensors.items() if "embed" not in k}, str(sf / "model.safetensors"))
    convert_checkpoint(ConvertConfig(source=str(sf), output_dir=str(tmp_path / "conv"), target=str(target),
                                     include_embed=False))
    third = evaluate(EvalConfig(draft=str(tmp_path / "conv"), **kw))
    assert third["summary"]["tau"] == base["summary"]["tau"] and third["summary"]["lossless"]


def test_fast_cpu_matmul_changes_no_token(trained):
    """The W @ x^T product of verify and drafting gives the same tokens and accept lengths as
    F.linear (tied logits aside, which this draft and target do not produce)."""
    from core.evaluate import EvalConfig, evaluate

    root, target, run, data, _ = trained
    kw = dict(target=str(target), draft=str(run), data=str(data), num_prompts=4, num_draft_tokens=3,
              max_new_tokens=32)
    fast, plain = evaluate(EvalConfig(**kw)), evaluate(EvalConfig(fast_cpu_matmul=False, **kw))
    assert fast["settings"]["fast_cpu_matmul"] and not plain["settings"]["fast_cpu_matmul"]
    assert fast["summary"]["lossless"] and plain["summary"]["lossless"]
    assert [p["accept_lengths"] for p in fast["prompts"]] == [p["accept_lengths"] for p in plain["prompts"]]
    assert [p["generated_tokens"] for p in fast["prompts"]] == [p["generated_tokens"] for p in plain["prompts"]]


def test_compare_k_measures_each_k_like_its_own_run(trained):
    """--compare-k decodes every prompt at each other k against the same greedy reference: each k's
    τ is exactly what a run at that k alone counts, and the fastest k is one of them."""
    from core.evaluate import EvalConfig, evaluate

    root, target, run, data, _ = trained
    kw = dict(target=str(target), draft=str(run), data=str(data), num_prompts=3, max_new_tokens=24)
    both = evaluate(EvalConfig(num_draft_tokens=3, compare_k="1,3", **kw))  # the main k listed again
    alone = evaluate(EvalConfig(num_draft_tokens=1, **kw))
    s = both["summary"]
    assert [r["k"] for r in s["by_k"]] == [1, 3] and s["fastest_k"] in (1, 3) and s["lossless"]
    assert s["by_k"][1]["tau"] == s["tau"] and s["by_k"][1]["accept_rate"] == s["accept_rate"]
    assert s["by_k"][0]["tau"] == alone["summary"]["tau"]
    assert s["by_k"][0]["accept_rate"] == alone["summary"]["accept_rate"]
    assert all(r["measured_speedup"] > 0 for r in s["by_k"])
    assert all(lo <= r["measured_speedup"] <= hi for r in s["by_k"] for lo, hi in [r["measured_speedup_interval"]])
    assert "by k, measured here" in both["text"] and f"fastest here: k={s['fastest_k']}" in both["text"]
    assert "by_k" not in alone["summary"]
    with pytest.raises(UsageError, match="--compare-k: every k must be >= 1"):
        EvalConfig(compare_k="1,0", **kw)
    # the command line: the list as comma text, a bad one refused with exit 2 and no report
    from eagle_tui.cli import main

    args = ["eval", "--target", str(target), "--draft", str(run), "--data", str(data), "--num-prompts", "1",
            "--max-new-tokens", "4", "--output", str(root / "ck.json")]
    assert main([*args, "--compare-k", "1,0"]) == 2 and not (root / "ck.json").exists()
    assert main([*args, "--compare-k", "2"]) == 0
    assert [r["k"] for r in json.loads((root / "ck.json").read_text())["summary"]["by_k"]] == [2, 3]


def test_eval_bad_inputs(trained, tmp_path):
    from core.evaluate import EvalConfig, evaluate

    root, target, run, data, _ = trained
    with pytest.raises(InputDataError):
        evaluate(EvalConfig(target=str(tmp_path), draft=str(run), data=str(data)))
    no_user = tmp_path / "no_user.jsonl"
    no_user.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(InputDataError, match="no usable prompts"):
        evaluate(EvalConfig(target=str(target), draft=str(run), data=str(no_user)))
    with pytest.raises(UsageError, match="num-draft-tokens"):
        evaluate(EvalConfig(target=str(target), draft=str(run), data=str(data), num_draft_tokens=0))
    # a draft trained for another target (a 6-layer one) is refused before decoding
    from conftest import build_tiny_llama
    from test_export_format import make_draft, write_draft_export

    other = tmp_path / "six_layers"
    other.mkdir()
    for f in Path(target).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            (other / f.name).write_bytes(f.read_bytes())
    vocab_size = json.loads((Path(target) / "config.json").read_text())["vocab_size"]
    build_tiny_llama(other, vocab_size=vocab_size, num_hidden_layers=6)
    write_draft_export(make_draft(other), tmp_path / "other_draft", other)
    with pytest.raises(UsageError, match="does not belong"):
        evaluate(EvalConfig(target=str(target), draft=str(tmp_path / "other_draft"), data=str(data),
                            num_prompts=1))


def test_report_marks_a_lossless_failure():
    from core.evaluate.report import aggregate, render_summary

    row = {"index": 3, "accepted_drafts": [1, 0], "accept_lengths": [2, 1], "target_forward_times": [0.01],
           "draft_step_times": [0.002], "draft_times": [0.005], "verify_times": [0.012],
           "generated_tokens": 3, "reference_tokens": 3, "spec_wall_s": 0.1, "reference_wall_s": 0.1,
           "lossless": False, "first_diff": 2, "expected_token": 7, "got_token": 9, "reference_margin": 1e-7}
    s = aggregate([row], 2)
    assert s["lossless"] is False and s["lossless_failures"] == 1
    assert s["tau"] == pytest.approx(1.5) and s["accept_rate"] == [0.5, 0.0]
    assert s["cost_ratio"] == pytest.approx(0.2) and s["implied_speedup"] == pytest.approx(1.5 / 1.4)
    text = render_summary({"summary": s, "prompts": [row], "num_prompts": 1, "num_draft_tokens": 2,
                           "device": "cpu", "tau_sim": None})
    assert "FAILED on 1 prompt" in text and "prompt 3: first difference at token 2" in text


def test_speedup_interval_is_a_paired_bootstrap_over_prompts():
    """Per prompt (tokens_a, s_a, tokens_b, s_b): equal ratios give a point; spread ones an interval
    around the pooled ratio; prompt pairs move together (a slow prompt for both is no spread)."""
    from core.evaluate.report import interval_text, speedup_interval

    assert speedup_interval([(100, 2.0, 100, 3.0)] * 5) == [pytest.approx(1.5)] * 2
    slow_and_fast = [(100, 2.0, 100, 3.0), (100, 20.0, 100, 30.0)] * 4  # same 1.5x, very unequal prompts
    assert speedup_interval(slow_and_fast) == [pytest.approx(1.5)] * 2
    spread = [(100, 1.0, 100, 1.0), (100, 1.0, 100, 2.0)] * 6
    lo, hi = speedup_interval(spread)
    assert lo < 1.5 < hi and 1.0 <= lo and hi <= 2.0
    assert speedup_interval([(100, 1.0, 100, 1.0)]) is None  # one prompt: no spread to measure
    assert speedup_interval([(100, 1.0, 0, 0.0)] * 3) is None
    assert interval_text([1.0312, 1.2]) == " [1.03, 1.20]" and interval_text(None) == ""


def test_tau_interval_is_a_bootstrap_over_prompts():
    """τ's interval resamples prompts, pooling their verifications: equal prompts give a point,
    unequal ones an interval around the pooled τ; one prompt gives none."""
    from core.evaluate.report import pooled_tau, tau_interval

    assert pooled_tau([0, 1, 3]) == pytest.approx(7 / 3) and pooled_tau([]) is None
    assert tau_interval([[1, 0]] * 4) == [pytest.approx(1.5)] * 2
    spread = [[0, 0, 0], [3, 3, 3]] * 6  # τ 1 and τ 4 prompts: pooled 2.5
    lo, hi = tau_interval(spread)
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    assert tau_interval([[2, 1]]) is None and tau_interval([[2, 1], []]) is None


def test_tau_sims_are_of_the_chosen_step_the_training_side_its_last_epoch_by_tokens(tmp_path):
    """Validation's τ_sim is the last one logged; the training side averages the last epoch's
    batches by supervised tokens (one batch is too noisy), ignoring bad lines and other splits."""
    from core.export import run_tau_sims

    lines = [{"split": "train", "step": 1, "epoch": 0, "tau_sim": 1.1, "supervised": 100},
             {"split": "train", "step": 2, "epoch": 0, "tau_sim": 1.3, "supervised": 100},
             {"split": "val", "step": 2, "tau_sim": 1.2},
             {"split": "train", "step": 3, "epoch": 1, "tau_sim": 1.8, "supervised": 300},
             {"split": "train", "step": 4, "epoch": 1, "tau_sim": 1.4, "supervised": 100},
             {"split": "val", "step": 4, "tau_sim": 1.25},
             {"split": "heldout", "step": 4, "tau": 1.3}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{torn")
    val, own = run_tau_sims(tmp_path)
    assert own == pytest.approx((1.8 * 300 + 1.4 * 100) / 400)
    assert val == pytest.approx(1.25)
    # the checkpoint of step 2 (a `best` chosen before the end): what training logged up to it
    assert run_tau_sims(tmp_path, 2) == (pytest.approx(1.2), pytest.approx(1.2))
    assert run_tau_sims(tmp_path / "none") == (None, None) == run_tau_sims(None)
