"""The whole pipeline from one RunConfig: regen → cache (or online) → train → eval → export.

`run_pipeline` maps each section of the YAML onto the stage's own typed config and calls the
stage's public entry in order; each stage keeps its own resume and refusal rules, so a pipeline
interrupted anywhere continues with `resume=True` (finished steps find their complete outputs and
return at once). `plan_pipeline` gives every step's budget before anything heavy starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UsageError
from core.events import EventSink, Log, NullSink, Progress, StageFinished, StageStarted
from core.runconfig import STEPS, RunConfig
from core.settings import DataSelection, draft_vocab

STAGE = "pipeline"


@dataclass
class PipelineResult:
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # step -> its summary
    summary: dict[str, Any] = field(default_factory=dict)


def resolve_target(model: str, events: EventSink | None = None) -> str:
    """"demo" → the embedded SmolLM2 folder (converted once); a path or hub id passes through."""
    if model == "demo":
        from core.assets import demo_target

        return str(demo_target(events))
    return model


def select_steps(cfg: RunConfig, steps: list[str] | None) -> list[str]:
    enabled = cfg.enabled_steps()
    if not steps:
        return enabled
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise UsageError(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    off = [s for s in steps if s not in enabled]
    if off:
        raise UsageError(f"step(s) {', '.join(off)} are switched off in this config",
                         hint="regen.enabled, features.mode offline (for cache), eval.enabled")
    return [s for s in enabled if s in steps]  # always in pipeline order


def exclude_file(cfg: RunConfig) -> str | None:
    """The held-out conversations every training-side stage leaves out (None: none reserved)."""
    return str(cfg.heldout_path()) if cfg.heldout_count() > 0 else None


def training_data(cfg: RunConfig) -> dict[str, Any]:
    """Where training data comes from: the regenerated set, or the dataset as configured; the
    held-out prompts are left out either way (regeneration never saw them; duplicates neither)."""
    if cfg.regen.enabled:
        return {"source": str(cfg.step_output_dir("regen")), "split": None, "messages_column": None,
                "shuffle_seed": None, "limit": None, "exclude": exclude_file(cfg)}
    d = cfg.dataset
    return {"source": d.source, "split": d.split, "messages_column": d.messages_column,
            "shuffle_seed": d.shuffle_seed, "limit": d.limit, "exclude": exclude_file(cfg)}


def renamed_knobs(section: Any) -> dict[str, Any]:
    """A derived YAML section's values under its stage model's names (features.aux_layers is the
    cache's aux_layer_ids)."""
    back = {new: old for old, new in section.renamed.items()}
    return {back.get(k, k): v for k, v in section.model_dump().items()
            if back.get(k, k) in section.source_model.model_fields}


def reserve_eval_prompts(cfg: RunConfig, events: EventSink) -> None:
    """Write WORKDIR/heldout.jsonl before anything trains (same bytes on every run and resume)."""
    from core.data import DataSpec
    from core.data.holdout import reserve_heldout

    d = cfg.dataset
    reserve_heldout(DataSpec(source=d.source, split=d.split, messages_column=d.messages_column,
                             shuffle_seed=d.shuffle_seed, strict=d.strict),
                    cfg.heldout_count(), cfg.heldout_path(), events)


def _regen(cfg: RunConfig, target: str, resume: bool, events: EventSink) -> dict[str, Any]:
    from core.regen import RegenConfig, regenerate
    from core.regen.config import RegenSettings

    r, d = cfg.regen, cfg.dataset
    rc = RegenConfig(**{**RegenSettings.knobs(r), "launch": None if r.servers else r.launch},
                     **DataSelection.knobs(d), exclude=exclude_file(cfg), input_data=d.source,
                     output_dir=str(cfg.step_output_dir("regen")), model=target,
                     launch_device=cfg.target.device, resume=resume)
    return regenerate(rc, events).to_dict()


def _cache(cfg: RunConfig, target: str, resume: bool, events: EventSink) -> dict[str, Any]:
    from core.cache import CacheConfig, build_cache

    f, data = cfg.features, training_data(cfg)
    cc = CacheConfig(**renamed_knobs(f), target=target, data=data.pop("source"),
                     output_dir=str(cfg.step_output_dir("cache")), **data,
                     draft_vocab_size=cfg.vocab.draft_vocab_size,
                     batch_tokens=max(f.max_length, cfg.train.max_tokens_per_batch),
                     device=cfg.target.device, strict=cfg.dataset.strict, resume=resume,
                     command="eagle run")
    return build_cache(cc.validate(), events).to_dict()


def train_config(cfg: RunConfig, target: str, resume: bool):
    from core.train import TrainConfig, TrainSettings

    t, f = cfg.train, cfg.features
    common = dict(TrainSettings.knobs(t), output_dir=str(cfg.step_output_dir("train")),
                  max_length=f.max_length, device=cfg.target.device, resume=resume,
                  select_data=str(cfg.heldout_path()) if t.select_prompts else None,
                  select_draft_tokens=cfg.eval.num_draft_tokens)
    if f.mode == "offline":
        return TrainConfig(cache=str(cfg.step_output_dir("cache")), **common)
    data = training_data(cfg)
    return TrainConfig(target=target, data=data["source"], data_split=data["split"],
                       messages_column=data["messages_column"], data_limit=data["limit"],
                       data_shuffle_seed=data["shuffle_seed"], data_strict=cfg.dataset.strict,
                       data_exclude=data["exclude"],
                       draft_vocab_size=cfg.vocab.draft_vocab_size, aux_layer_ids=f.aux_layers,
                       **common)


def _train(cfg: RunConfig, target: str, resume: bool, events: EventSink) -> dict[str, Any]:
    from core.train import train
    from core.train.spawn import run_torchrun

    tc = train_config(cfg, target, resume).validate()
    if tc.nproc > 1:
        return run_torchrun(tc, events)
    return train(tc, events).to_dict()


def _eval(cfg: RunConfig, target: str, resume: bool, events: EventSink) -> dict[str, Any]:
    from core.evaluate import EvalConfig, EvalSettings, evaluate

    # The held-out file: its first train.select_prompts chose the checkpoint, so τ comes from the
    # ones after them (never trained on, never used for a choice).
    ec = EvalConfig(**EvalSettings.knobs(cfg.eval), target=target, draft=str(cfg.step_output_dir("train")),
                    data=str(cfg.heldout_path()), output=str(cfg.step_output_dir("eval")),
                    offset=cfg.train.select_prompts, device=cfg.target.device)
    report = evaluate(ec, events)
    return {"output": ec.output, **report["summary"], "tau_sim": report.get("tau_sim"),
            "tau_sim_train": report.get("tau_sim_train")}


def _export(cfg: RunConfig, target: str, resume: bool, events: EventSink) -> dict[str, Any]:
    import json

    from core.export import ExportConfig, ExportSettings, export_draft
    from core.train.checkpoint import find_checkpoint

    out = cfg.step_output_dir("export")
    run = cfg.step_output_dir("train")
    meta_file = out / "eagle_export.json"
    if resume and meta_file.is_file():
        ckpt = find_checkpoint(run)
        done = json.loads(meta_file.read_text()).get("produced_by", {})
        if ckpt is not None and _exported_from(done, Path(ckpt)):
            events(Log(stage="export", message=f"{out} already holds the export of {ckpt.name}"))
            return {"output_dir": str(out), "format": cfg.export.format, "reused": True}
    result = export_draft(ExportConfig(**ExportSettings.knobs(cfg.export), source=str(run),
                                       output_dir=str(out), target=target), events)
    return {"output_dir": result.output_dir, "format": result.format,
            "aux_layer_ids": result.meta.get("aux_layer_ids")}


def _exported_from(produced_by: dict[str, Any], ckpt: Path) -> bool:
    """Whether an export holds this checkpoint's weights: by their sha256 (a moved workdir keeps its
    export; a run trained again at the same path does not), or by path for older exports."""
    if "weights_sha256" in produced_by:
        from core.manifest import sha256_file
        from core.train.checkpoint import DRAFT_FILE

        return produced_by["weights_sha256"] == sha256_file(ckpt / DRAFT_FILE)
    return produced_by.get("source") == str(ckpt.resolve())


def _engine_bench(cfg: RunConfig, target: str, events: EventSink) -> dict[str, Any]:
    """The export served by vLLM without and with the draft: the engine's own τ and wall-clock
    speedup, compared with eval's τ on the same prompts (a wrong export shows up here)."""
    from core.errors import MissingDependencyError
    from core.serve import ServeConfig
    from core.serve_bench import BenchConfig, bench_servers

    k, report = cfg.eval.num_draft_tokens, cfg.step_output_dir("eval")
    sc = ServeConfig(target=target, draft=str(cfg.step_output_dir("export")), engine="vllm", num_steps=k,
                     topk=1, num_draft_tokens=k + 1)
    bc = BenchConfig(serve=sc, num_prompts=cfg.eval.num_prompts, max_new_tokens=cfg.eval.max_new_tokens,
                     eval_report=str(report) if report.is_file() else None,
                     data=None if report.is_file() else str(cfg.heldout_path()),
                     offset=cfg.train.select_prompts, output=str(cfg.workdir_path() / "bench.json"),
                     device=cfg.target.device)
    try:
        r = bench_servers(bc, events)
    except MissingDependencyError as e:
        events(Log(stage=STAGE, level="warning", message=f"engine bench skipped: {e}"))
        return {"skipped": str(e)}
    return {"output": bc.output, "engine_tau": r.get("accept_length"), "engine_speedup": r.get("speedup"),
            "engine_speedup_interval": r.get("speedup_interval"), "engine_bench_order": r.get("order"),
            "engine_tokens_per_s": (r.get("with_draft") or {}).get("tokens_per_s"),
            "engine_baseline_tokens_per_s": (r.get("baseline") or {}).get("tokens_per_s"),
            "engine_per_position": r.get("per_position_accept_rate"),
            "engine_agrees_with_eval": r.get("agrees_with_eval"), "engine_counts_equal": r.get("counts_equal")}


STEP_FUNCS = {"regen": _regen, "cache": _cache, "train": _train, "eval": _eval, "export": _export}


def serving_commands(cfg: RunConfig, target: str) -> dict[str, str]:
    """The SGLang and vLLM command lines for the exported draft (printed, never run here)."""
    from core.serve import ServeConfig, ServeSettings, plan

    s, out = cfg.serve, {}
    for engine in ("sglang", "vllm"):
        knobs = ServeSettings.knobs(s)
        if engine == "vllm":  # chain drafting only
            knobs.update(topk=1, num_draft_tokens=s.num_steps + 1)
        sc = ServeConfig(**{**knobs, "engine": engine, "port": s.port if engine == s.engine else None},
                         target=target, draft=str(cfg.step_output_dir("export")), print_only=True)
        out[engine] = plan(sc.validate()).command()
    return out


def run_pipeline(cfg: RunConfig, events: EventSink | None = None, steps: list[str] | None = None,
                 resume: bool = False) -> PipelineResult:
    events = events or NullSink()
    cfg.validate()
    cfg.check_workdir()
    todo = select_steps(cfg, steps)
    from core import locking

    locking.acquire(cfg.workdir_path())  # one `eagle run` per workdir until this process exits (creates it)
    t0 = time.monotonic()
    events(StageStarted(stage=STAGE, total=len(todo), unit="steps",
                        settings={"steps": todo, "workdir": str(cfg.workdir_path()), "resume": resume}))
    target = resolve_target(cfg.target.model, events)
    if cfg.heldout_count() > 0:
        reserve_eval_prompts(cfg, events)
    result = PipelineResult()
    timings: dict[str, float] = {}
    for i, step in enumerate(todo):
        events(Log(stage=STAGE, message=f"step {i + 1}/{len(todo)}: {step}"))
        s0 = time.monotonic()
        result.steps[step] = STEP_FUNCS[step](cfg, target, resume, events)
        timings[step] = round(time.monotonic() - s0, 1)
        events(Progress(stage=STAGE, done=i + 1, total=len(todo), unit="steps",
                        extra={"step": step, "seconds": timings[step]}))
    if cfg.serve.bench and "export" in todo:
        s0 = time.monotonic()
        result.steps["bench"] = _engine_bench(cfg, target, events)
        timings["bench"] = round(time.monotonic() - s0, 1)
    result.summary = summarize(cfg, target, result.steps, timings, time.monotonic() - t0)
    events(StageFinished(stage=STAGE, summary=result.summary))
    return result


def summarize(cfg: RunConfig, target: str, steps: dict[str, dict[str, Any]], timings: dict[str, float],
              seconds: float) -> dict[str, Any]:
    s: dict[str, Any] = {"workdir": str(cfg.workdir_path()), "seconds": round(seconds, 1),
                         "step_seconds": timings}
    if "eval" in steps:
        ev = steps["eval"]
        s.update(tau=ev.get("tau"), tau_interval=ev.get("tau_interval"), tau_sim=ev.get("tau_sim"),
                 tau_sim_train=ev.get("tau_sim_train"), lossless=ev.get("lossless"),
                 accept_rate=ev.get("accept_rate"), implied_speedup=ev.get("implied_speedup"),
                 measured_speedup=ev.get("measured_speedup"),
                 measured_speedup_interval=ev.get("measured_speedup_interval"), prompt_set=ev.get("prompt_set"),
                 num_draft_tokens=cfg.eval.num_draft_tokens, eval_report=ev.get("output"),
                 by_k=ev.get("by_k"), fastest_k=ev.get("fastest_k"))
    if steps.get("bench") and not steps["bench"].get("skipped"):
        s.update({k: v for k, v in steps["bench"].items() if k != "output"}, bench_report=steps["bench"]["output"])
    if "train" in steps:
        st = steps["train"]  # train().to_dict() in one process, the summary from torchrun
        best = st.get("best") or {"step": st.get("best_step"), "tau": st.get("best_heldout_tau")}
        s.update(best_step=best.get("step"), best_heldout_tau=best.get("tau"))
    export_dir = cfg.step_output_dir("export")
    if (export_dir / "config.json").is_file():
        s["export"] = str(export_dir)
        s.update({f"{k}_command": v for k, v in serving_commands(cfg, target).items()})
    return s


# ---- budget of every step, before anything heavy ---------------------------------------------
def plan_pipeline(cfg: RunConfig, sample_size: int = 256, events: EventSink | None = None) -> dict[str, Any]:
    """Disk, GPU memory and work of each enabled step, from the dataset's measured token lengths."""
    from core.budget import StorageOptions, TargetShape, free_disk, make_plan
    from core.data import DataSpec, load_conversations
    from core.tokenize import load_tokenizer, tokenize_conversation

    cfg.validate()
    target = resolve_target(cfg.target.model, events)
    shape = TargetShape.resolve(target)
    d = cfg.dataset
    held = cfg.heldout_count()  # the first ones are held out; training takes `limit` after them
    convs, report = load_conversations(DataSpec(source=d.source, split=d.split,
                                                messages_column=d.messages_column,
                                                shuffle_seed=d.shuffle_seed,
                                                limit=None if d.limit is None else d.limit + held))
    convs = convs[held:]
    if not convs:
        raise UsageError(f"dataset {d.source!r} has no usable conversations besides the {held} held out")
    tok = load_tokenizer(target)
    lengths, answer_tokens = [], []
    for conv in convs[:sample_size]:
        t = tokenize_conversation(tok, conv.messages, max_length=cfg.features.max_length)
        lengths.append(len(t.input_ids))
        answer_tokens.append(min(t.num_supervised, cfg.regen.max_new_tokens))
    n = len(convs)
    mean_len = sum(lengths) / len(lengths)
    out: dict[str, Any] = {"target": {"path": target, "hidden_size": shape.hidden_size,
                                      "num_hidden_layers": shape.num_hidden_layers,
                                      "vocab_size": shape.vocab_size, "params": shape.num_params()},
                           "dataset": {"conversations": n, "heldout": held, "bad_rows": len(report.bad_rows),
                                       "mean_tokens": round(mean_len, 1), "measured_on": len(lengths)},
                           "steps": {}}
    steps = out["steps"]
    if cfg.regen.enabled:
        steps["regen"] = {"requests": n, "answer_tokens_est": round(n * sum(answer_tokens) / len(answer_tokens)),
                          "max_answer_tokens": n * cfg.regen.max_new_tokens,
                          "output_dir": str(cfg.step_output_dir("regen"))}
    f = cfg.features
    opt = StorageOptions(aux_dtype=f.aux_dtype, target_store=f.target_store, topk=f.topk)
    vd = draft_vocab(cfg.vocab.draft_vocab_size, shape.vocab_size)
    bp = make_plan(shape, num_samples=n, lengths=lengths, seq_length=f.max_length, draft_vocab_size=vd,
                   options=[opt], shard_size=f.shard_size, output_dir=str(cfg.step_output_dir("cache")),
                   batch_tokens=cfg.train.max_tokens_per_batch, ttt_length=cfg.train.ttt_length)
    row = bp.rows[0]
    nemo = next(a for a in bp.anchors if a["name"] == "nemo")
    if f.mode == "offline":
        _, free = free_disk(str(cfg.step_output_dir("cache")))
        steps["cache"] = {"option": row["option"], "bytes_per_sample": row["bytes_per_sample"],
                          "total_bytes": row["total_bytes"], "nemo_bytes_per_sample": nemo["bytes_per_sample"],
                          "vs_nemo": row["vs_nemo"], "free_bytes": free, "fits": row["total_bytes"] <= free,
                          "gpu_bytes_target_forward": bp.gpu["target_forward"]["total"],
                          "output_dir": str(cfg.step_output_dir("cache"))}
    draft_params = shape.draft_params(vd, cfg.train.num_layers)
    steps["train"] = {"mode": f.mode, "tokens_per_epoch": round(mean_len * n), "epochs": cfg.train.epochs,
                      "max_steps": cfg.train.max_steps, "draft_vocab_size": vd, "draft_params": draft_params,
                      "gpu_bytes_online_step": bp.gpu["online_step"]["total"] if f.mode == "online" else None,
                      "checkpoint_bytes": draft_params * 4 * 3 * cfg.train.keep_last,
                      "output_dir": str(cfg.step_output_dir("train"))}
    if cfg.eval.enabled:
        steps["eval"] = {"prompts": cfg.eval.num_prompts, "max_new_tokens": cfg.eval.max_new_tokens,
                         "num_draft_tokens": cfg.eval.num_draft_tokens}
    steps["export"] = {"bytes": (draft_params + shape.vocab_size * shape.hidden_size) * 4,
                       "output_dir": str(cfg.step_output_dir("export"))}
    from dataclasses import asdict

    from core.step_budgets import step_budgets

    out["budgets"] = {b.step: asdict(b) for b in step_budgets(cfg, shape, n, lengths=lengths)
                      if b.step in steps}
    return out
