"""The export settings (light: the CLI reads its option defaults here): `eagle export` (a run or
checkpoint to a serving folder, also `eagle run`'s `export` section) and `eagle export --from`
(another tool's checkpoint converted, core.export.convert); settings they share are one field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from core.errors import InputDataError
from core.settings import Settings, checkpoint_field, field_like

FORMATS = ("sglang", "speculators")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ExportSettings(Settings):
    """The export knobs: `eagle export` options and `eagle run`'s `export` section."""

    cli_names = {"include_embed": "--embed/--no-embed"}

    format: Literal[FORMATS] = Field("sglang", description="sglang: config.json + model.safetensors that "
                                     "SGLang and vLLM both load; speculators: vLLM's speculators format.")
    dtype: Dtype = Field(
        "auto", description="auto (as trained) | float32 | bfloat16 | float16")
    include_embed: bool = Field(True, description="Include embed_tokens (--no-embed leaves it out: engines "
                                "share the target's when the hidden sizes match).")
    num_speculative_tokens: int = Field(3, ge=1, description="speculators format: speculative_tokens of "
                                        "the proposal method.")


class ExportConfig(ExportSettings):
    source: str = Field(description="Training run or checkpoint folder (or a serving folder to re-export).")
    output_dir: str = Field(description="New folder to write.")
    target: Optional[str] = Field(None, description="Target model (folder or hub id): recorded in the "
                                  "export; a local folder also supplies embeddings, rope_theta and the "
                                  "layer count to --from.")
    checkpoint: str = checkpoint_field()

    def check_inputs(self) -> None:
        if not Path(self.source).is_dir():
            raise InputDataError("no such run, checkpoint or export folder", path=self.source)


class ConvertConfig(Settings):
    """`eagle export --from`: another tool's checkpoint into our validated serving format."""

    cli_names = {"source": "--from", "output_dir": "--output", "aux_layer_ids": "--aux-layers",
                 "include_embed": ExportSettings.cli_names["include_embed"]}

    source: str = Field(description="Convert a NeMo Automodel, SpecForge or speculators checkpoint into "
                        "the serving format.")
    output_dir: str = field_like(ExportConfig, "output_dir")
    target: Optional[str] = field_like(ExportConfig, "target")
    rope_theta: Optional[float] = Field(None, gt=0, description="--from: the rope_theta the draft was "
                                        "trained with, when the source omits it.")
    aux_layer_ids: Optional[list[int]] = Field(None, description="--from: the 0-based target layer "
                                               "outputs the draft was trained on (e.g. 1,15,28), when "
                                               "the source does not record them.")
    dtype: Dtype = field_like(ExportSettings, "dtype")
    include_embed: bool = field_like(ExportSettings, "include_embed")
