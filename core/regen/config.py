"""`RegenConfig`: every setting of `eagle regen`, validated before any file or socket is opened."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

from core.errors import UsageError

FORMAT_VERSION = 1
REASONING_MODES = ("none", "save", "disable")
TURNS_MODES = ("last", "all")
BACKENDS = ("transformers", "sglang", "vllm")


@dataclass
class RegenConfig:
    input_data: str
    output_dir: str
    model: str  # name sent in requests (a path for `transformers serve`); what --launch loads
    servers: list[str] = field(default_factory=list)  # OpenAI-compatible base URLs
    launch: Optional[str] = None  # start a server of this backend for the run
    launch_device: str = "auto"
    launch_args: tuple[str, ...] = ()
    launch_ready_timeout: float = 600.0
    # input selection (handed to core.data.DataSpec)
    split: Optional[str] = None
    messages_column: Optional[str] = None
    shuffle_seed: Optional[int] = None
    limit: Optional[int] = None
    strict: bool = False
    exclude: Optional[str] = None  # held-out conversations (JSONL) whose prompts are left out
    # content settings
    shard_size: int = 256
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    reasoning: str = "none"
    turns: str = "last"
    # transport and failure policy (not content: may change between resumes)
    concurrency: int = 8
    request_timeout: float = 600.0
    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    dead_after: int = 3  # consecutive connection failures before a server is marked dead
    max_failure_rate: float = 0.05
    min_attempts_for_rate: int = 20  # the rate is judged mid-run only after this many samples
    journal_sync_s: float = 0.5  # group-commit fsync interval of the resume journal (0: every sample)
    resume: bool = False
    retry_failed: bool = False  # on resume, send samples recorded as failed again

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise UsageError(f"regen: {name} {what} (got {getattr(self, name)!r})")

        need(bool(str(self.input_data).strip()), "input_data", "must name a dataset")
        need(bool(str(self.output_dir).strip()), "output_dir", "must name a directory")
        need(bool(str(self.model).strip()), "model", "must name the target model")
        need(self.launch is None or self.launch in BACKENDS, "launch", f"must be one of {BACKENDS}")
        if not self.servers and self.launch is None:
            raise UsageError("regen: no target server given",
                             hint="pass --target-server URL (repeatable) or --launch transformers|sglang|vllm")
        if self.servers and self.launch is not None:
            raise UsageError("regen: give either --target-server URLs or --launch, not both")
        seen = set()
        for url in self.servers:
            base = normalize_server_url(url)
            if base in seen:
                raise UsageError(f"regen: target server {url!r} is listed twice")
            seen.add(base)
        need(self.reasoning in REASONING_MODES, "reasoning", f"must be one of {REASONING_MODES}")
        need(self.turns in TURNS_MODES, "turns", f"must be one of {TURNS_MODES}")
        need(self.concurrency >= 1, "concurrency", "must be >= 1")
        need(self.shard_size >= 1, "shard_size", "must be >= 1")
        need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        need(self.temperature >= 0.0, "temperature", "must be >= 0")
        need(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        need(self.seed is None or self.seed >= 0, "seed", "must be >= 0")
        need(self.request_timeout > 0, "request_timeout", "must be > 0 seconds")
        need(self.max_retries >= 0, "max_retries", "must be >= 0")
        need(self.backoff_base >= 0 and self.backoff_max >= self.backoff_base, "backoff_max",
             "must be >= backoff_base >= 0")
        need(self.dead_after >= 1, "dead_after", "must be >= 1")
        need(0.0 <= self.max_failure_rate <= 1.0, "max_failure_rate", "must be in [0, 1]")
        need(self.min_attempts_for_rate >= 1, "min_attempts_for_rate", "must be >= 1")
        need(self.limit is None or self.limit >= 1, "limit", "must be >= 1")
        need(self.journal_sync_s >= 0, "journal_sync_s", "must be >= 0 seconds")
        need(self.launch_ready_timeout > 0, "launch_ready_timeout", "must be > 0 seconds")
        need(not self.retry_failed or self.resume, "retry_failed", "only applies with --resume")

    def server_urls(self) -> list[str]:
        return [normalize_server_url(u) for u in self.servers]

    def content_settings(self) -> dict[str, Any]:
        """What shapes the output (stored in the manifest, compared on --resume).

        Transport settings (servers, concurrency, timeouts, retries) are left out on purpose:
        a resumed run may use other servers or a different concurrency.
        """
        return {
            "input": _local_or_name(self.input_data), "split": self.split,
            "messages_column": self.messages_column, "shuffle_seed": self.shuffle_seed,
            "limit": self.limit, "strict": self.strict, "model": _local_or_name(self.model),
            "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "seed": self.seed, "turns": self.turns,
            "reasoning": self.reasoning, "shard_size": self.shard_size,
        }


def normalize_server_url(url: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/` -> `http://host:port/v1` (the API base)."""
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"regen: target server {url!r} is not an http(s) URL",
                         hint="e.g. --target-server http://127.0.0.1:30000/v1")
    try:
        parts.port
    except ValueError as e:
        raise UsageError(f"regen: target server {url!r} has a bad port ({e})") from None
    base = str(url).strip().rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    if not base.endswith("/v1"):
        base += "/v1"
    return base


def _local_or_name(value: str) -> str:
    """A local path is recorded absolute (resuming from another cwd must match); names as given."""
    return os.path.abspath(value) if os.path.exists(value) else value
