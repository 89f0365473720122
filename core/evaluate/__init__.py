"""`eagle eval`: measure a draft's real accept length with chain speculative decoding.

`evaluate(EvalConfig, events) -> dict` (the JSON report). Prompts come from a chat dataset: each
conversation up to its last user turn, rendered with the target's chat template plus the generation
prompt. For every prompt the target's own greedy output is computed too; the speculative output
must equal it token for token (lossless), otherwise that prompt is reported as a failure.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from core.errors import InputDataError, UsageError
from core.events import EventSink, Log, NullSink, Progress, RateMeter, StageFinished, StageStarted
from core.settings import Device, Settings, checkpoint_field

STAGE = "eval"
# top-2 logit margins below this (per dtype) are reported as likely numerical ties on a mismatch
TIE_MARGIN = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


class EvalSettings(Settings):
    """The evaluation knobs: `eagle eval` options and `eagle run`'s `eval` section."""

    cli_names = {"allow_trained_prompts": "--allow-trained-prompts"}

    num_prompts: int = Field(16, ge=1, description="Held-out prompts to decode.")
    num_draft_tokens: int = Field(3, ge=1, description="Draft tokens per verification (chain).")
    max_new_tokens: int = Field(128, ge=1, description="Tokens generated per prompt.")
    max_prompt_tokens: int = Field(1024, ge=1, description="Longer prompts are skipped.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16")
    fast_cpu_matmul: bool = Field(True, description="On CPU, compute the 1-4 token products of decoding, "
                                  "verify and drafting as W @ x^T, one row padded to two (here a "
                                  "1-token forward 1.3-1.5x and a 4-token one 1.7-1.8x faster); the "
                                  "same tokens, float rounding aside.")
    compare_k: list[int] = Field([], description="Other draft lengths to measure on the same prompts, "
                                 "e.g. 1,2: τ and wall-clock speedup per k, each prompt decoded with "
                                 "every k right after its greedy reference; the report names the "
                                 "fastest k here.")

    @field_validator("compare_k", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:  # the CLI hands "1,2", or None when the option is not given
        if v is None:
            return []
        return [x for x in str(v).replace(" ", "").split(",") if x] if isinstance(v, (str, int)) else v

    @field_validator("compare_k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"every k must be >= 1 (got {','.join(map(str, v))})")
        return v


class EvalConfig(EvalSettings):
    target: str = Field(description="Target model folder, or 'demo' (the embedded SmolLM2-135M-Instruct).")
    draft: str = Field(description="Training run, checkpoint, or serving folder (ours or a third-party "
                       "EAGLE-3 draft in the same format).")
    data: str = Field(description="Held-out chat dataset (file, folder or hub name); each conversation "
                      "up to its last user turn is a prompt.")
    output: Optional[str] = Field(None, description="JSON report path.")
    split: Optional[str] = Field(None, description="Dataset split / slice, e.g. 'train[-100:]'.")
    messages_column: Optional[str] = Field(None, description="Column with the turns.")
    offset: int = Field(0, ge=0, description="Skip this many usable conversations first.")
    checkpoint: str = checkpoint_field()
    allow_trained_prompts: bool = Field(False, description="Measure even when some prompts trained the "
                                        "draft (its trained_on.jsonl); without it that is refused (exit "
                                        "2): τ would not be held out.")
    device: Device = Field("auto", description="auto | cpu | cuda")

    def check_inputs(self) -> None:
        if self.target != "demo" and not (Path(self.target) / "config.json").is_file():
            raise InputDataError("the target must be a local model folder with config.json, or 'demo'",
                                 path=self.target)
        if not Path(self.draft).is_dir():
            raise InputDataError("no such draft folder (run, checkpoint or export)", path=self.draft)


def load_prompts(cfg: EvalConfig, tokenizer: Any, events: EventSink) -> list[tuple[int, str, list[int]]]:
    """(row index, prompt sha256, token ids) of the first `num_prompts` usable prompts."""
    from core.data import DataSpec, load_conversations, prompt_messages, prompt_sha256

    convs, _report = load_conversations(DataSpec(source=cfg.data, split=cfg.split,
                                                 messages_column=cfg.messages_column), events)
    out: list[tuple[int, str, list[int]]] = []
    usable = 0
    for conv in convs:
        msgs = prompt_messages(conv.messages)
        if msgs is None:
            continue
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or len(ids) > cfg.max_prompt_tokens:
            continue
        usable += 1
        if usable <= cfg.offset:
            continue
        out.append((conv.index, prompt_sha256(conv.messages), list(ids)))
        if len(out) >= cfg.num_prompts:
            break
    if not out:
        raise InputDataError("no usable prompts (conversations with a user turn that fit "
                             f"--max-prompt-tokens {cfg.max_prompt_tokens}) after --offset {cfg.offset}",
                             path=cfg.data)
    if len(out) < cfg.num_prompts:
        events(Log(stage=STAGE, level="warning",
                   message=f"only {len(out)} usable prompts (asked for {cfg.num_prompts})"))
    return out


def trained_on_record(draft: str | Path) -> Path | None:
    """The draft's record of the conversations it trained on (a run, a checkpoint of a run, or an
    export made from one), or None when unknown (a third party's draft, an older run)."""
    from core.data.identity import TRAINED_ON

    p = Path(draft)
    for cand in (p / TRAINED_ON, p.parent.parent / TRAINED_ON if p.parent.name == "checkpoints" else None):
        if cand is not None and cand.is_file():
            return cand
    return None


def check_held_out(cfg: EvalConfig, prompts: list[tuple[int, str, list[int]]]) -> tuple[set[str], Path | None]:
    """(hashes of the prompts the draft trained on, its record); refuses unless allowed."""
    from core.data.identity import read_prompt_list

    record = trained_on_record(cfg.draft)
    if record is None:
        return set(), None
    seen = {r.get("prompt_sha256") for r in read_prompt_list(record)}
    trained = {h for _, h, _ in prompts if h in seen}
    if trained and not cfg.allow_trained_prompts:
        raise UsageError(f"{len(trained)} of {len(prompts)} evaluation prompts from {cfg.data} trained "
                         f"the draft {cfg.draft} (its {record.name}): that τ would not be held out",
                         hint="evaluate on held-out conversations (eagle run keeps them in "
                              "WORKDIR/heldout.jsonl), or pass --allow-trained-prompts")
    return trained, record


def _load_draft(cfg: EvalConfig, target: Any, device: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """(draft, info) for a run / checkpoint or a serving folder."""
    from core.export import run_tau_sims
    from core.model import Eagle3Draft

    draft, info = Eagle3Draft.from_pretrained(cfg.draft, target, which=cfg.checkpoint, device=device,
                                              dtype=dtype, with_info=True,
                                              target_num_layers=int(target.config.num_hidden_layers))
    if info.kind == "checkpoint":
        tau_sim, tau_sim_train = run_tau_sims(info.run_dir, info.step)
        return draft, {"kind": "run", "checkpoint": str(info.checkpoint_dir), "step": info.step,
                       "chosen": cfg.checkpoint, "tau_sim": tau_sim, "tau_sim_train": tau_sim_train}
    produced = info.meta.get("produced_by") or {}
    return draft, {"kind": "export", "produced_by": produced, "tau_sim": produced.get("tau_sim"),
                   "tau_sim_train": produced.get("tau_sim_train")}


def eos_ids(tokenizer: Any, target: Any) -> set[int]:
    """Ids that end generation: the tokenizer's eos and the target's generation config's."""
    eos = {int(t) for t in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    gen_eos = getattr(target.generation_config, "eos_token_id", None)
    return eos | {int(t) for t in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if t is not None}


def _check_compatible(draft: Any, target: Any) -> None:
    dc, tc = draft.config, target.config
    tc = getattr(tc, "text_config", None) or tc
    problems = []
    if int(dc.vocab_size) != int(target.get_output_embeddings().weight.shape[0]):
        problems.append(f"vocab {dc.vocab_size} vs target {target.get_output_embeddings().weight.shape[0]}")
    if int(dc.target_hidden_size) != int(tc.hidden_size):
        problems.append(f"target hidden size {dc.target_hidden_size} vs {tc.hidden_size}")
    if int(dc.target_num_hidden_layers) != int(tc.num_hidden_layers):
        problems.append(f"trained for a {dc.target_num_hidden_layers}-layer target, this one has "
                        f"{tc.num_hidden_layers}")
    if problems:
        raise UsageError("the draft does not belong to this target: " + "; ".join(problems))


def first_difference(ref: list[int], got: list[int]) -> int | None:
    """The first token index where `got` leaves the target's greedy `ref`; None when equal."""
    diff = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if diff is None and len(ref) != len(got):
        diff = min(len(ref), len(got))
    return diff


def evaluate(cfg: EvalConfig, events: EventSink | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.evaluate.cpu_matmul import fast_cpu_linears
    from core.evaluate.report import DEFINITIONS, aggregate, by_k, render_summary
    from core.evaluate.spec_decode import AuxCapture, greedy_generate, speculative_generate

    from core.model.load import locate_draft

    events = events or NullSink()
    cfg.validate()
    locate_draft(cfg.draft, cfg.checkpoint)  # a wrong --draft / --checkpoint before the target loads
    if cfg.output:  # one writer per report file; the draft and the data are only read
        from core import locking

        locking.acquire(Path(cfg.output).parent, locking.beside(cfg.output))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    if cfg.target == "demo":  # as regen, cache, train and serve take it
        from core.assets import demo_target

        cfg = cfg.model_copy(update={"target": str(demo_target(events=events))})
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and
                                                             torch.cuda.is_available()) else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg.target)
    prompts = load_prompts(cfg, tokenizer, events)
    trained, record = check_held_out(cfg, prompts)
    target = AutoModelForCausalLM.from_pretrained(cfg.target, dtype=dtype).to(device).eval()
    draft, dinfo = _load_draft(cfg, target, device, dtype)
    _check_compatible(draft, target)
    eos = eos_ids(tokenizer, target)
    capture = AuxCapture(target, draft.config.aux_layer_ids)
    events(StageStarted(stage=STAGE, total=len(prompts), unit="prompts",
                        settings={"k": cfg.num_draft_tokens, "device": str(device)}))
    meter = RateMeter(total=len(prompts))
    rows: list[dict[str, Any]] = []
    other_k: dict[int, list[dict[str, Any]]] = {k: [] for k in dict.fromkeys(cfg.compare_k)
                                                if k != cfg.num_draft_tokens}
    with contextlib.closing(capture), fast_cpu_linears(target, draft, enabled=cfg.fast_cpu_matmul):
        for n, (index, sha, ids) in enumerate(prompts):
            x = torch.tensor([ids], device=device)
            t0 = time.perf_counter()
            ref = greedy_generate(target, x, cfg.max_new_tokens, eos)
            ref_wall = time.perf_counter() - t0
            spec = speculative_generate(target, draft, capture, x, cfg.num_draft_tokens,
                                        cfg.max_new_tokens, eos)
            diff = first_difference(ref.tokens, spec.tokens)
            for k, runs in other_k.items():  # right after this prompt's reference: the same conditions
                other = speculative_generate(target, draft, capture, x, k, cfg.max_new_tokens, eos)
                runs.append({"accepted_drafts": other.accepted_drafts, "generated_tokens": len(other.tokens),
                             "spec_wall_s": other.wall_s, "reference_tokens": len(ref.tokens),
                             "reference_wall_s": ref_wall,
                             "lossless": first_difference(ref.tokens, other.tokens) is None})
            row = {"index": index, "prompt_sha256": sha,
                   "trained_on": (sha in trained) if record is not None else None, "prompt_tokens": len(ids), "generated_tokens": len(spec.tokens),
                   "reference_tokens": len(ref.tokens), "iterations": len(spec.accept_lengths),
                   "tau": (sum(spec.accept_lengths) / len(spec.accept_lengths)) if spec.accept_lengths else None,
                   "accepted_drafts": spec.accepted_drafts, "accept_lengths": spec.accept_lengths,
                   "lossless": diff is None, "first_diff": diff,
                   "target_forward_times": ref.forward_times, "draft_step_times": spec.draft_step_times,
                   "draft_times": spec.draft_times, "verify_times": spec.verify_times,
                   "spec_wall_s": spec.wall_s, "reference_wall_s": ref_wall}
            if diff is not None:
                row["expected_token"] = ref.tokens[diff] if diff < len(ref.tokens) else None
                row["got_token"] = spec.tokens[diff] if diff < len(spec.tokens) else None
                row["reference_margin"] = ref.top2_margin[diff] if diff < len(ref.top2_margin) else None
                # a near-tie of the target's top-2 logits flips under batched vs one-token numerics
                tie = TIE_MARGIN.get(str(dtype).replace("torch.", ""), 1e-4)
                row["numerical_tie"] = row["reference_margin"] is not None and row["reference_margin"] < tie
                events(Log(stage=STAGE, level="error", message=f"prompt {index}: speculative output "
                           f"differs from the target's greedy output at token {diff}"))
            rows.append(row)
            events(Progress(stage=STAGE, done=n + 1, total=len(prompts), unit="prompts",
                            rate=meter.rate(n + 1), eta_s=meter.eta(n + 1),
                            extra={"tau": row["tau"], "lossless": row["lossless"]}))
    summary = aggregate(rows, cfg.num_draft_tokens)
    if other_k:
        summary["by_k"] = by_k(rows, cfg.num_draft_tokens, other_k)
        summary["fastest_k"] = max(summary["by_k"], key=lambda r: r["measured_speedup"] or 0)["k"]
        summary["lossless"] = all(r["lossless"] for r in summary["by_k"])
    summary["prompt_set"] = {"data": cfg.data, "count": len(rows),
                             "held_out": (len(rows) - len(trained)) if record is not None else None,
                             "trained_on": len(trained) if record is not None else None,
                             "record": str(record) if record is not None else None}
    timing_keys = ("target_forward_times", "draft_step_times", "draft_times", "verify_times")
    report = {
        "target": cfg.target, "draft": cfg.draft, "draft_info": dinfo, "data": cfg.data,
        "num_prompts": len(rows), "num_draft_tokens": cfg.num_draft_tokens,
        "max_new_tokens": cfg.max_new_tokens, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "aux_layer_ids": list(draft.config.aux_layer_ids),
        "tau_sim": dinfo.get("tau_sim"), "tau_sim_train": dinfo.get("tau_sim_train"),
        "summary": summary, "definitions": DEFINITIONS,
        "settings": cfg.to_dict(),
        "prompts": [{k: v for k, v in r.items() if k not in timing_keys} for r in rows],
    }
    if cfg.output:
        from core.manifest import write_json_atomic

        write_json_atomic(cfg.output, report)
    events(StageFinished(stage=STAGE, summary={
        "tau": summary["tau"], "tau_interval": summary["tau_interval"], "tau_sim": report["tau_sim"],
        "tau_sim_train": report["tau_sim_train"], "accept_rate": summary["accept_rate"],
        "cost_ratio": summary["cost_ratio"], "implied_speedup": summary["implied_speedup"],
        "measured_speedup": summary["measured_speedup"], "lossless": summary["lossless"],
        "prompt_set": summary["prompt_set"], "output": cfg.output}))
    report["text"] = render_summary(report)
    return report
