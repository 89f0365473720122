"""`eagle serve --bench`: measured accept length and tokens/s speedup on a GPU machine.

Starts the engine twice, one after the other (memory for one server at a time): with the draft, then
without it, on the same port, and sends the same fixed prompt set to each, one request at a time
(batch 1, temperature 0). Accept length:
  - SGLang: native /generate reports meta_info.completion_tokens and spec_verify_ct per request;
    accept length = sum(completion_tokens) / sum(spec_verify_ct) (bonus token included).
  - vLLM: Prometheus counters on /metrics, before and after the run:
    accept length = 1 + d(spec_decode_num_accepted_tokens) / d(spec_decode_num_drafts).
Speedup = decode tokens/s with the draft / tokens/s without it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import EagleError, UsageError
from core.events import EventSink, NullSink, Progress, StageFinished, StageStarted
from core.manifest import write_json_atomic

STAGE = "bench"
BENCH_PROMPTS = [
    "Explain how speculative decoding speeds up language model inference.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the causes of the French Revolution in five sentences.",
    "What are the differences between TCP and UDP?",
    "Give me a recipe for a simple tomato pasta sauce.",
    "Describe the water cycle to a ten-year-old.",
    "List three pros and three cons of remote work.",
    "Translate 'The weather is nice today' into French, Spanish and German.",
    "How does a binary search tree work? Include an example.",
    "Write a short poem about the ocean at night.",
    "What is the time complexity of quicksort and why?",
    "Explain the difference between a process and a thread.",
    "Suggest a one-week beginner running plan.",
    "Why is the sky blue?",
    "Write a SQL query that finds the second highest salary in a table.",
    "What should I consider when choosing a laptop for programming?",
]


@dataclass
class BenchConfig:
    serve: Any  # core.serve.ServeConfig
    num_prompts: int = 16
    max_new_tokens: int = 256
    startup_timeout_s: float = 1800.0
    request_timeout_s: float = 600.0
    output: str | None = None


def _http(url: str, payload: dict | None = None, timeout: float = 30.0) -> tuple[int, str]:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def parse_vllm_spec_counters(metrics_text: str) -> tuple[float, float]:
    """(num_drafts, num_accepted_tokens) summed over label sets from a Prometheus text page."""
    drafts = accepted = 0.0
    for line in metrics_text.splitlines():
        m = re.match(r"^vllm:spec_decode_num_(drafts|accepted_tokens)(?:_total)?(?:\{[^}]*\})?\s+(\S+)", line)
        if m:
            if m.group(1) == "drafts":
                drafts += float(m.group(2))
            else:
                accepted += float(m.group(2))
    return drafts, accepted


class _Server:
    def __init__(self, argv: list[str], base: str, log_path: Path):
        self.argv, self.base, self.log_path = argv, base, log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "_Server":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise EagleError(f"the server exited with code {self.proc.returncode} while starting; "
                                 f"log {self.log_path}:\n{tail}")
            try:
                if _http(self.base + "/health", timeout=5)[0] == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2.0)
        raise EagleError(f"the server did not become healthy within {timeout:.0f} s (log {self.log_path})")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def render_prompts(target: str, n: int) -> list[str]:
    """The fixed prompts, rendered with the target's chat template (+ generation prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    prompts = (BENCH_PROMPTS * (n // len(BENCH_PROMPTS) + 1))[:n]
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                    add_generation_prompt=True) for p in prompts]


def run_prompts(engine: str, base: str, model: str, prompts: list[str], max_new_tokens: int,
                timeout: float, events: EventSink, label: str) -> dict[str, Any]:
    """Send prompts one at a time; tokens/s and (with a draft) accept length."""
    tokens = verify = 0
    before = parse_vllm_spec_counters(_http(base + "/metrics")[1]) if engine == "vllm" else (0.0, 0.0)
    t0 = time.monotonic()
    for i, prompt in enumerate(prompts):
        if engine == "sglang":
            code, body = _http(base + "/generate", {"text": prompt, "sampling_params": {
                "temperature": 0, "max_new_tokens": max_new_tokens}}, timeout)
            if code != 200:
                raise EagleError(f"{label}: /generate returned HTTP {code}: {body[:300]}")
            meta = json.loads(body).get("meta_info", {})
            tokens += int(meta.get("completion_tokens", 0))
            verify += int(meta.get("spec_verify_ct", 0))
        else:
            code, body = _http(base + "/v1/completions", {"model": model, "prompt": prompt,
                                                          "max_tokens": max_new_tokens, "temperature": 0},
                               timeout)
            if code != 200:
                raise EagleError(f"{label}: /v1/completions returned HTTP {code}: {body[:300]}")
            tokens += int(json.loads(body).get("usage", {}).get("completion_tokens", 0))
        events(Progress(stage=STAGE, done=i + 1, total=len(prompts), unit="prompts",
                        extra={"server": label}))
    wall = time.monotonic() - t0
    out: dict[str, Any] = {"completion_tokens": tokens, "wall_s": round(wall, 3),
                           "tokens_per_s": tokens / wall if wall > 0 else None}
    if engine == "sglang" and verify:
        out["accept_length"] = tokens / verify
    if engine == "vllm":
        after = parse_vllm_spec_counters(_http(base + "/metrics")[1])
        drafts, accepted = after[0] - before[0], after[1] - before[1]
        if drafts > 0:
            out["accept_length"] = 1.0 + accepted / drafts
    return out


def bench_servers(cfg: BenchConfig, events: EventSink | None = None) -> dict[str, Any]:
    from core.serve import build_argv, prepare

    events = events or NullSink()
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        raise UsageError("--bench starts SGLang / vLLM servers, which need a CUDA GPU; none is visible "
                         "here", hint="run `eagle eval` for a CPU measurement of the accept length")
    if cfg.num_prompts < 1 or cfg.max_new_tokens < 1:
        raise UsageError("--bench-prompts and --bench-max-tokens must be >= 1")
    plan = prepare(cfg.serve, events)
    s = cfg.serve
    base = f"http://{'127.0.0.1' if s.host in ('0.0.0.0', '::') else s.host}:{s.port}"
    prompts = render_prompts(s.target, cfg.num_prompts)
    events(StageStarted(stage=STAGE, total=2 * len(prompts), unit="prompts",
                        settings={"engine": s.engine, "draft": plan.draft.serve_path}))
    logdir = Path(cfg.output).parent if cfg.output else Path(".")
    results: dict[str, Any] = {}
    for label, with_draft in (("eagle3", True), ("baseline", False)):
        argv = build_argv(s, plan.draft.serve_path, with_draft=with_draft)
        with _Server(argv, base, logdir / f"bench-{label}.log") as srv:
            srv.wait_ready(cfg.startup_timeout_s)
            results[label] = run_prompts(s.engine, base, s.target, prompts, cfg.max_new_tokens,
                                         cfg.request_timeout_s, events, label)
    spec, basel = results["eagle3"], results["baseline"]
    report = {"engine": s.engine, "target": s.target, "draft": plan.draft.serve_path,
              "num_prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
              "num_steps": s.num_steps, "topk": s.topk, "num_draft_tokens": s.num_draft_tokens,
              "accept_length": spec.get("accept_length"), "with_draft": spec, "baseline": basel,
              "speedup": (spec["tokens_per_s"] / basel["tokens_per_s"])
              if spec.get("tokens_per_s") and basel.get("tokens_per_s") else None}
    if cfg.output:
        write_json_atomic(cfg.output, report)
    events(StageFinished(stage=STAGE, summary={k: report[k] for k in ("accept_length", "speedup")}))
    return report
