"""Train the EAGLE-3 draft: `train(cfg: TrainConfig, events) -> TrainResult` (online or offline,
TTT, exact resume, torchrun DDP/FSDP), and `load_draft_from_run(path)` for eval/export."""

from core.train.checkpoint import DraftRunInfo, load_draft_from_run
from core.train.config import TrainConfig
from core.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train", "load_draft_from_run", "DraftRunInfo"]
