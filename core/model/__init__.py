"""The EAGLE-3 draft: config, network, inference API, and the TTT training forward + loss."""

from core.model.config import DraftConfig
from core.model.draft import DraftKVCache, Eagle3Draft

__all__ = ["DraftConfig", "DraftKVCache", "Eagle3Draft"]
