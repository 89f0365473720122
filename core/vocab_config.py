"""`VocabConfig`: the settings of `eagle vocab` (light: the CLI reads its option defaults from here;
`core.vocab`, which needs torch, re-exports it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, model_validator

from core.errors import InputDataError
from core.settings import DataSelection, draft_vocab_size_field, refuse


class VocabConfig(DataSelection):
    cli_names = {"output_dir": "--output"}

    target: str = Field(description="Target model folder (its tokenizer and config.json vocab_size), "
                        "or 'demo'.")
    output_dir: str = Field(description="Folder to write: vocab.safetensors (d2t, t2d, selected, "
                            "counts), d2t.npy, t2d.npy, vocab.json.")
    draft_vocab_size: Optional[int] = draft_vocab_size_field()
    data: Optional[str] = Field(None, description="Dataset: file, folder, hub name or 'demo'.")
    token_freq: Optional[str] = Field(None, description="Saved token counts instead of a dataset: "
                                      ".safetensors ('counts'), .npy [V], or .json (list, or {id: count}).")
    max_length: int = Field(2048, ge=2, description="Tokens per conversation (as in training).")
    resume: bool = Field(False, description="Continue the work found in the output directory.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.data is None) == (self.token_freq is None):
            raise refuse("data", "give exactly one of a dataset (--data) or a token-frequency file "
                         "(--token-freq)")
        return self

    def check_inputs(self) -> None:
        if self.target != "demo" and not (Path(self.target) / "config.json").exists():
            raise InputDataError("not a Hugging Face model folder (no config.json)", path=self.target)
        if self.token_freq is not None and not Path(self.token_freq).exists():
            raise InputDataError("token-frequency file not found", path=self.token_freq)
