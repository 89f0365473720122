"""Train the EAGLE-3 draft: `train(cfg: TrainConfig, events) -> TrainResult` (online or offline,
TTT, exact resume, torchrun DDP/FSDP). A trained draft loads with `Eagle3Draft.from_pretrained`.

`import core.train.config` stays light (no torch): the CLI reads its option defaults from it.
"""

from typing import Any

from core.train.config import TrainConfig, TrainSettings

__all__ = ["TrainConfig", "TrainResult", "TrainSettings", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainResult", "train"):
        from core.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
