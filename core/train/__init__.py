"""Train the EAGLE-3 draft: `train(cfg: TrainConfig, events) -> TrainResult` (online or offline,
TTT, exact resume, torchrun DDP/FSDP). A trained draft loads with `Eagle3Draft.from_pretrained`."""

from core.train.config import TrainConfig
from core.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
