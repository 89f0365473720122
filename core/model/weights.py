"""Single tensors of a target's safetensors shards, read by name without loading the model."""

from __future__ import annotations

from pathlib import Path

import torch

from core.errors import InputDataError

EMBED_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight",
              "model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight")


def read_target_tensor(path: str | Path, keys: tuple[str, ...]) -> torch.Tensor | None:
    """The first of `keys` found in the folder's safetensors shards, or None."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names = set(st.keys())
            for key in keys:
                if key in names:
                    return st.get_tensor(key)
    return None


def read_embeddings(path: str | Path) -> torch.Tensor:
    """The target's input embedding matrix."""
    if not any(Path(path).glob("*.safetensors")):
        raise InputDataError("no .safetensors weights found", path=str(path))
    t = read_target_tensor(path, EMBED_KEYS)
    if t is None:
        raise InputDataError(f"no input embeddings ({' / '.join(EMBED_KEYS[:2])}) in the weights", path=str(path))
    return t
