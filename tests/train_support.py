"""Helpers for the training tests: a small chat dataset and fast TrainConfigs on the tiny target."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the quick brown fox jumps over a lazy dog . paris is the capital of france ! hello , "
          "how can i help you today ? sure here is a short answer").split()


def write_conversations(path: Path, n: int = 40, seed: int = 0) -> Path:
    """n short user/assistant conversations (words from the tiny tokenizer's corpus), as JSONL."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
            a = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def tiny_cfg(target: Path, data: Path, out: Path, **kw):
    from core.train import TrainConfig

    base = dict(output_dir=str(out), target=str(target), data=str(data), max_length=96,
                max_tokens_per_batch=192, ttt_length=3, draft_vocab_size=64, val_fraction=0.2,
                lr=1e-3, save_every=4, keep_last=2, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def draft_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(step_dir) / "draft.safetensors"))


def metric_lines(run_dir: Path, split: str | None = None) -> list[dict]:
    from core.train.metrics import read_metrics

    return read_metrics(run_dir, split)


def comparable(rec: dict) -> dict:
    """A metrics record without its wall-clock fields."""
    return {k: v for k, v in rec.items() if k not in ("time", "tokens_per_s", "step_seconds")}


def subprocess_env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
