"""The TUI's only door to core's estimates (core.budget) and serve commands (core.serve).

The wizard never computes sizes itself (design rule 1 and 7: one shape arithmetic, shared with the
cache writer and `eagle plan`); this module only adapts core's answers to what the panels draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.settings import draft_vocab
from core.step_budgets import StepBudget

PENDING = "(estimate unavailable: {why})"


@dataclass
class StorageOption:
    aux_dtype: str
    target_store: str
    bytes_per_sample: int
    total_bytes: int


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 90:
        return f"~{max(1, round(s))} s"
    if s < 5400:
        return f"~{round(s / 60)} min"
    return f"~{s / 3600:.1f} h"


def storage_options(cfg: Any, known_rows: int | None = None) -> list[StorageOption] | str:
    try:
        from core import budget
    except ImportError as e:
        return PENDING.format(why=e)
    try:
        return _storage_options(budget, cfg, known_rows)
    except Exception as e:  # an estimate must never take the wizard down
        return PENDING.format(why=e)


def step_budgets(cfg: Any, gpus: int, known_rows: int | None = None,
                 tokens_per_s: float | None = None) -> list[StepBudget] | str:
    try:
        from core import budget
    except ImportError as e:
        return PENDING.format(why=e)
    try:
        return _step_budgets(budget, cfg, gpus, known_rows, tokens_per_s)
    except Exception as e:
        return PENDING.format(why=e)


def serve_command(cfg: Any, engine: str | None = None) -> str:
    try:
        from core import serve
    except ImportError as e:
        return PENDING.format(why=e)
    try:
        return _serve_command(serve, cfg, engine or cfg.serve.engine)
    except Exception as e:  # e.g. vLLM with top-k > 1: say why there is no command
        return f"(no command: {e})"


# ---- adapters to core's APIs ------------------------------------------------------------------
DEFAULT_SAMPLES = 1000  # what `eagle plan` assumes when the dataset size is unknown


def target_shape(budget: Any, model: str) -> Any:
    """The target's shapes without loading it; "demo" is the embedded SmolLM2-135M-Instruct, whose
    preset is used so the UI never triggers the one-time GGUF conversion."""
    if model == "demo":
        return budget.TargetShape(name="SmolLM2-135M-Instruct (demo)", **budget.PRESETS["smollm2-135m"])
    return budget.TargetShape.resolve(model)


def sample_count(cfg: Any, known_rows: int | None) -> tuple[int, str]:
    if cfg.dataset.limit:
        n = min(cfg.dataset.limit, known_rows) if known_rows else cfg.dataset.limit
        return n, f"{n} samples (limit)"
    if known_rows:
        return known_rows, f"{known_rows} samples (previewed)"
    return DEFAULT_SAMPLES, f"{DEFAULT_SAMPLES} samples assumed (set Limit or Preview)"


def _plan(budget: Any, cfg: Any, known_rows: int | None, options: list | None):
    from core.cache.layout import StorageOptions

    f = cfg.features
    shape = target_shape(budget, cfg.target.model)
    n, _ = sample_count(cfg, known_rows)
    vd = draft_vocab(cfg.vocab.draft_vocab_size, shape.vocab_size)
    if options is None:
        options = [StorageOptions(o.aux_dtype, o.target_store, f.topk, o.target_dtype) for o in budget.DEFAULT_OPTIONS]
        chosen = StorageOptions(f.aux_dtype, f.target_store, f.topk)
        if all((o.aux_dtype, o.target_store) != (chosen.aux_dtype, chosen.target_store) for o in options):
            options.append(chosen)
    # every sample at max length: an upper bound until the lengths are measured
    plan = budget.make_plan(shape, num_samples=n, seq_length=f.max_length, draft_vocab_size=vd,
                            options=options, shard_size=f.shard_size,
                            batch_tokens=cfg.train.max_tokens_per_batch, ttt_length=cfg.train.ttt_length)
    return shape, vd, plan


def _storage_options(budget: Any, cfg: Any, known_rows: int | None = None) -> list[StorageOption]:
    _, _, plan = _plan(budget, cfg, known_rows, None)
    return [StorageOption(r["aux_dtype"], r["target_store"], int(r["bytes_per_sample"]), int(r["total_bytes"]))
            for r in plan.rows]


def _step_budgets(budget: Any, cfg: Any, gpus: int, known_rows: int | None = None,
                  tokens_per_s: float | None = None) -> list[StepBudget]:
    from core.step_budgets import step_budgets

    n, note = sample_count(cfg, known_rows)
    return step_budgets(cfg, target_shape(budget, cfg.target.model), n, tokens_per_s=tokens_per_s,
                        sample_note=note)


def _serve_command(serve: Any, cfg: Any, engine: str) -> str:
    target = cfg.target.model
    if target == "demo":
        from core.assets import DEMO_TARGET_NAME, cache_dir

        target = str(cache_dir() / "models" / DEMO_TARGET_NAME)
    sc = serve.ServeConfig(**{**serve.ServeSettings.knobs(cfg.serve), "engine": engine}, target=target,
                           draft=str(cfg.step_output_dir("export").absolute())).validate()
    import shlex
    import sys

    argv = serve.build_argv(sc, sc.draft)
    if argv[0] == sys.executable:  # shown for the serving machine, whose python is its own
        argv[0] = "python"
    return shlex.join(argv)
