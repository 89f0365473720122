"""The offline feature cache (`eagle cache`): safetensors shards of variable-length samples.

Public API: `build_cache(cfg, events) -> CacheResult`, `CacheReader(dir)`, `CacheConfig`,
`StorageOptions`; the shape arithmetic lives in `core.cache.layout` (shared with core.budget).
Heavy libraries are imported lazily so `import core.cache` stays cheap.
"""

from __future__ import annotations

from typing import Any

from core.cache.config import CacheConfig, CacheResult
from core.cache.layout import CacheDims, StorageOptions

__all__ = ["CacheConfig", "CacheResult", "CacheDims", "StorageOptions", "build_cache", "CacheReader"]


def build_cache(cfg: CacheConfig, events: Any = None) -> CacheResult:
    from core import disk
    from core.cache.build import build_cache as _build

    with disk.raising_disk_full(cfg.output_dir):  # in the parent or in a worker: the same error
        return _build(cfg, events)


def __getattr__(name: str) -> Any:
    if name == "CacheReader":
        from core.cache.reader import CacheReader

        return CacheReader
    raise AttributeError(name)
