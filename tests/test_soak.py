"""The fault soak (bench/soak.py) with a small default: per stage a few kill -9 at random seeded
moments, each followed by --resume, plus SIGTERM, a truncated file and (regen) a dying server; the
finished outputs must equal an uninterrupted run. `python bench/soak.py --kills 20` is the long run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KILLS = 2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _soak():
    spec = importlib.util.spec_from_file_location("eagle_soak", REPO / "bench" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("stage", ["regen", "cache", "train"])
def test_kills_at_random_moments_then_resume_equal_a_clean_run(stage, tmp_path):
    (fig,) = _soak().run(KILLS, seed=0, stages=[stage], workdir=tmp_path)
    assert fig.kills == KILLS and fig.survived == KILLS, fig.line()
    assert (fig.lost, fig.duplicated, fig.mismatches) == (0, 0, 0), fig.line()
    assert fig.rounds >= 2 and all(v == "ok" for v in fig.faults.values()), fig.line()
