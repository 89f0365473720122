"""The TUI's only door to core's estimates (core.budget) and serve commands (core.serve).

The wizard never computes sizes itself (design rule 1 and 7: one shape arithmetic, shared with the
cache writer and `eagle plan`); this module only adapts core's answers to what the panels draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PENDING = "(estimate unavailable: {why})"


@dataclass
class StorageOption:
    aux_dtype: str
    target_store: str
    bytes_per_sample: int
    total_bytes: int


@dataclass
class StepBudget:
    step: str
    disk_bytes: int | None = None
    gpu_bytes: int | None = None  # peak accelerator memory per device when a GPU is used
    ram_bytes: int | None = None  # peak host memory on CPU
    time_s: float | None = None
    note: str = ""


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


def storage_options(cfg: Any) -> list[StorageOption] | str:
    try:
        from core import budget
    except ImportError as e:
        return PENDING.format(why=e)
    try:
        return _storage_options(budget, cfg)
    except Exception as e:  # an estimate must never take the wizard down
        return PENDING.format(why=e)


def step_budgets(cfg: Any, gpus: int) -> list[StepBudget] | str:
    try:
        from core import budget
    except ImportError as e:
        return PENDING.format(why=e)
    try:
        return _step_budgets(budget, cfg, gpus)
    except Exception as e:
        return PENDING.format(why=e)


def serve_command(cfg: Any) -> str:
    try:
        from core import serve
    except ImportError as e:
        return PENDING.format(why=e)
    try:
        return _serve_command(serve, cfg)
    except Exception as e:
        return PENDING.format(why=e)


# ---- adapters to core's APIs (filled in against core.budget / core.serve) ----------------------
def _storage_options(budget: Any, cfg: Any) -> list[StorageOption]:
    raise NotImplementedError("core.budget has no storage table yet")


def _step_budgets(budget: Any, cfg: Any, gpus: int) -> list[StepBudget]:
    raise NotImplementedError("core.budget has no step estimates yet")


def _serve_command(serve: Any, cfg: Any) -> str:
    raise NotImplementedError("core.serve has no command builder yet")
