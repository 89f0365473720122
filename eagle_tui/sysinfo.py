"""What this machine has: free disk where outputs go, detected GPUs. Injectable for tests.

GPUs are read with `nvidia-smi` (fast, no torch import in the UI process: importing torch costs
seconds of start-up). No nvidia-smi, or no GPU listed, means "no GPU detected: runs on CPU".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_bytes: int
    free_bytes: int


@dataclass
class SystemInfo:
    """Readings the budget panel compares against; `disk_free` maps a path to free bytes there."""

    gpus: list[GpuInfo] = field(default_factory=list)
    disk_free: Callable[[Path], int] | None = None
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    ram_available: int | None = None  # bytes; None = read psutil when asked
    probed: bool = True  # False until the GPU probe has answered

    def free_bytes(self, path: Path) -> int:
        if self.disk_free is not None:
            return self.disk_free(path)
        return disk_free(path)

    def ram_free(self) -> int:
        if self.ram_available is not None:
            return self.ram_available
        import psutil

        return int(psutil.virtual_memory().available)


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that would hold `path` (its nearest existing parent)."""
    import psutil

    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(psutil.disk_usage(str(p)).free)


def probe_gpus(timeout: float = 5.0) -> list[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            gpus.append(GpuInfo(parts[0], int(parts[1]) << 20, int(parts[2]) << 20))
    return gpus
