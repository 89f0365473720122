"""The EAGLE-3 draft: config, network, inference API, and the TTT training forward + loss."""

from core.model.config import DraftConfig
from core.model.draft import DraftKVCache, Eagle3Draft
from core.model.ttt import TTTOutput, aggregate, tau_from_acc, ttt_forward_loss

__all__ = ["DraftConfig", "DraftKVCache", "Eagle3Draft", "TTTOutput", "aggregate", "tau_from_acc",
           "ttt_forward_loss"]
