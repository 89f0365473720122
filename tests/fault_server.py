"""A fault-injecting OpenAI-compatible HTTP server for tests (a fixture, never a backend).

Plain asyncio HTTP/1.1 with keep-alive, on 127.0.0.1 in a background thread, bounded: it stops
itself after `max_lifetime_s`. Faults are chosen per sample by a directive in the first user
message, so they do not depend on request order or concurrency:

    "q7 fault=500x2"   two HTTP 500 answers, then a good one
    "fault=429x1"      one 429 with `Retry-After: <retry_after>`
    "fault=jsonx1"     one 200 with a malformed JSON body
    "fault=hangx1"     one request left unanswered for `hang_s`, then the connection is closed
    "fault=dropx1"     one connection closed without an answer
    "fault=400"        HTTP 400 every time (non-retryable)
    "fault=500xinf"    HTTP 500 every time

A good answer is `A(<last message content>)` with `reasoning_content` `R(<...>)`, so tests can see
which prompt produced which answer. Every request is recorded in `requests`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

_DIRECTIVE = re.compile(r"fault=(\w+?)(?:x(\d+|inf))?(?:\s|$)")


@dataclass
class Seen:
    key: str
    t: float
    outcome: str
    body: dict[str, Any] = field(default_factory=dict)


class FaultServer:
    def __init__(self, delay_s: float = 0.0, retry_after: str = "1", hang_s: float = 30.0,
                 max_lifetime_s: float = 300.0, status_all: int | None = None):
        self.delay_s, self.retry_after, self.hang_s = delay_s, retry_after, hang_s
        self.max_lifetime_s, self.status_all = max_lifetime_s, status_all
        self.requests: list[Seen] = []
        self.counts: dict[str, int] = {}
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FaultServer":
        self._thread = threading.Thread(target=self._run, name="fault-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await asyncio.wait_for(self._stop.wait(), self.max_lifetime_s)
        except asyncio.TimeoutError:
            pass
        server.close()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        await asyncio.sleep(0)

    # -- helpers for tests -------------------------------------------------------------------
    def seen(self, key: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.requests if s.key == key]

    def answered_keys(self) -> list[str]:
        with self._lock:
            return [s.key for s in self.requests if s.outcome == "ok"]

    # -- HTTP --------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in
                           (line.split(":", 1) for line in lines[1:] if ":" in line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self._respond(method, path, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                asyncio.CancelledError):
            pass  # client went away, or the server is shutting down
        finally:
            writer.close()

    def _send(self, writer: asyncio.StreamWriter, status: int, payload: bytes,
              extra: dict[str, str] | None = None) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
                  500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Status")
        hdrs = {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                "Connection": "keep-alive", **(extra or {})}
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        writer.write(head.encode() + b"\r\n" + payload)

    def _record(self, key: str, outcome: str, body: dict) -> None:
        with self._lock:
            self.requests.append(Seen(key, time.monotonic(), outcome, body))

    async def _respond(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter) -> bool:
        if method == "GET" and path.rstrip("/") in ("/v1/models", "/health"):
            self._send(writer, 200, b'{"object":"list","data":[{"id":"fault-model"}]}')
            await writer.drain()
            return True
        if method != "POST" or not path.endswith("/chat/completions"):
            self._send(writer, 404, b'{"error":"not found"}')
            await writer.drain()
            return True
        try:
            body = json.loads(raw)
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            self._send(writer, 400, b'{"error":"bad request body"}')
            await writer.drain()
            return True
        first_user = next((m["content"] for m in messages if m.get("role") == "user"), "")
        key = first_user.split()[0] if first_user.split() else ""
        with self._lock:
            n = self.counts[key] = self.counts.get(key, 0) + 1
        fault = self._fault_for(first_user, n)
        if self.status_all is not None:
            fault = str(self.status_all)
        self._record(key, fault or "ok", body)
        if fault in ("500", "503", "400"):
            self._send(writer, int(fault), json.dumps({"error": f"injected {fault}"}).encode())
        elif fault == "429":
            self._send(writer, 429, b'{"error":"slow down"}', {"Retry-After": self.retry_after})
        elif fault == "json":
            self._send(writer, 200, b'{"choices": [{"message": {"content": "trunc')
        elif fault == "hang":
            await asyncio.sleep(self.hang_s)
            return False
        elif fault == "drop":
            writer.transport.abort()
            return False
        else:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            last = messages[-1]["content"] if messages else ""
            answer = f"A({last})"
            payload = {"id": f"cmpl-{key}-{n}", "object": "chat.completion", "model": body.get("model"),
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": answer,
                                                "reasoning_content": f"R({last})"}}],
                       "usage": {"prompt_tokens": sum(len(str(m.get("content", "")).split())
                                                      for m in messages),
                                 "completion_tokens": len(answer.split())}}
            self._send(writer, 200, json.dumps(payload).encode())
        await writer.drain()
        return True

    @staticmethod
    def _fault_for(text: str, n: int) -> str | None:
        m = _DIRECTIVE.search(text)
        if not m:
            return None
        kind, times = m.group(1), m.group(2)
        if times is None or times == "inf":
            return kind
        return kind if n <= int(times) else None


# -- helpers shared by the regen tests ---------------------------------------------------------
def write_conversations(path, specs: list[str | list[dict]]) -> str:
    """A JSONL chat dataset: a string s becomes [user s, assistant old(s)]; lists go as they are."""
    with open(path, "w") as f:
        for s in specs:
            msgs = s if isinstance(s, list) else [{"role": "user", "content": s},
                                                  {"role": "assistant", "content": f"old({s})"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def read_output(directory) -> tuple[list[dict], list[dict]]:
    """(rows of every shard in order, failures.jsonl records) of a regen output folder."""
    from pathlib import Path

    import pyarrow.parquet as pq

    d = Path(directory)
    rows: list[dict] = []
    for shard in sorted(d.glob("shard-*.parquet")):
        rows.extend(pq.read_table(shard).to_pylist())
    fails_path = d / "failures.jsonl"
    fails = [json.loads(x) for x in fails_path.read_text().splitlines()] if fails_path.exists() else []
    return rows, fails
