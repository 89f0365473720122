"""HTTP side of regeneration: a pool of OpenAI-compatible servers and a retrying chat client.

Failure policy (issue 3, design rule 4):
- 408, 429 and 5xx answers, timeouts, refused or dropped connections and malformed JSON bodies are
  retried with capped exponential backoff and jitter; a `Retry-After` header is honoured.
- Any other 4xx is final at once (retrying a bad request only wastes the server's time).
- A server whose connections are refused `dead_after` times in a row is marked dead and the pool
  keeps going on the others; when every server is dead the run stops with `AllServersDeadError`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from core.errors import EagleError

RETRYABLE_STATUS = {408, 429}
RETRY_AFTER_CAP_S = 300.0


class AllServersDeadError(EagleError):
    """Every target server refused connections repeatedly; nothing can be sent."""


class RequestFailed(Exception):
    """One sample's request failed for good (after retries, or a non-retryable answer)."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(reason)
        self.reason, self.attempts = reason, attempts


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, connect_failed: bool = False):
        super().__init__(reason)
        self.reason, self.retry_after, self.connect_failed = reason, retry_after, connect_failed


@dataclass
class Completion:
    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None
    attempts: int = 1
    server: str = ""


@dataclass
class Server:
    url: str  # API base, e.g. http://127.0.0.1:30000/v1
    in_flight: int = 0
    connect_failures: int = 0  # consecutive
    dead: bool = False
    last_error: str = ""
    sent: int = 0

    @property
    def endpoint(self) -> str:
        return self.url + "/chat/completions"


@dataclass
class ServerPool:
    """Least-in-flight choice among live servers; ties broken round robin."""

    urls: list[str]
    dead_after: int = 3
    servers: list[Server] = field(init=False)
    _turn: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.servers = [Server(u) for u in self.urls]

    def alive(self) -> list[Server]:
        return [s for s in self.servers if not s.dead]

    def acquire(self) -> Server:
        live = self.alive()
        if not live:
            raise AllServersDeadError(
                "all target servers are unreachable: "
                + "; ".join(f"{s.url} ({s.last_error})" for s in self.servers),
                hint="check that the servers are running and the URLs are right, then re-run with --resume")
        self._turn += 1
        n = len(live)
        best = min(range(n), key=lambda i: (live[i].in_flight, (i - self._turn) % n))
        s = live[best]
        s.in_flight += 1
        s.sent += 1
        return s

    def release(self, s: Server, *, ok: bool, connect_failed: bool = False, error: str = "") -> None:
        s.in_flight -= 1
        if connect_failed:
            s.connect_failures += 1
            s.last_error = error
            if s.connect_failures >= self.dead_after:
                s.dead = True
        elif ok or error:
            # any answer (even an HTTP error) proves the server is there
            s.connect_failures = 0
            if error:
                s.last_error = error


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds, possibly fractional, or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None,
                  rng: random.Random) -> float:
    """Capped exponential backoff with equal jitter; never shorter than the server's Retry-After."""
    exp = min(cap, base * (2 ** max(0, attempt - 1)))
    delay = exp / 2 + rng.uniform(0, exp / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, max(cap, RETRY_AFTER_CAP_S)))
    return delay


def parse_completion(payload: Any) -> Completion:
    """Pull content, reasoning, finish reason and usage out of a chat.completion body."""
    if not isinstance(payload, dict):
        raise _Retryable(f"malformed response: expected a JSON object, got {type(payload).__name__}")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Retryable("malformed response: no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise _Retryable("malformed response: choice has no message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise _Retryable("malformed response: message content is not a string")
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    return Completion(content=content or "", finish_reason=choices[0].get("finish_reason"),
                      prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0),
                      reasoning=reasoning if isinstance(reasoning, str) else None)


class ChatClient:
    """Sends chat completions to a ServerPool with the retry policy above. Use as `async with`."""

    def __init__(self, pool: ServerPool, model: str, *, max_new_tokens: int, temperature: float,
                 top_p: float, disable_thinking: bool = False, request_timeout: float = 600.0,
                 max_retries: int = 5, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 connections: int = 64, rng: random.Random | None = None):
        self.pool, self.model = pool, model
        self.sampling = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self.disable_thinking = disable_thinking
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.request_timeout = request_timeout
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        self.connections = connections
        self.rng = rng or random.Random()
        self.session: aiohttp.ClientSession | None = None
        self.retries = 0  # total retries sent, for the summary

    async def __aenter__(self) -> "ChatClient":
        connector = aiohttp.TCPConnector(limit=self.connections, limit_per_host=0)
        self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                             json_serialize=json.dumps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    def body(self, messages: list[dict], seed: int | None) -> dict[str, Any]:
        b: dict[str, Any] = {"model": self.model, "messages": messages, "stream": False, **self.sampling}
        if seed is not None:
            b["seed"] = seed
        if self.disable_thinking:
            b["chat_template_kwargs"] = {"enable_thinking": False}
        return b

    async def chat(self, messages: list[dict], seed: int | None = None) -> Completion:
        body = self.body(messages, seed)
        attempt = 0
        while True:
            attempt += 1
            server = self.pool.acquire()  # raises AllServersDeadError
            try:
                result = await self._post(server, body)
            except _Retryable as e:
                self.pool.release(server, ok=False, connect_failed=e.connect_failed, error=e.reason)
                if attempt > self.max_retries:
                    raise RequestFailed(f"{e.reason} (gave up after {attempt} attempts)", attempt) from None
                self.retries += 1
                if e.connect_failed and any(s is not server for s in self.pool.alive()):
                    continue  # another live server can take it right away
                await asyncio.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max,
                                                  e.retry_after, self.rng))
                continue
            except RequestFailed as e:
                self.pool.release(server, ok=False, error=e.reason)
                e.attempts = attempt
                raise
            except BaseException:
                self.pool.release(server, ok=False)
                raise
            self.pool.release(server, ok=True)
            result.attempts, result.server = attempt, server.url
            return result

    async def _post(self, server: Server, body: dict[str, Any]) -> Completion:
        assert self.session is not None, "use `async with ChatClient(...)`"
        try:
            async with self.session.post(server.endpoint, json=body) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except aiohttp.ClientConnectorError as e:
            raise _Retryable(f"cannot connect to {server.url}: {e.os_error or e}",
                             connect_failed=True) from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise _Retryable(f"no answer from {server.url} within {self.request_timeout:g}s") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as e:
            raise _Retryable(f"connection to {server.url} dropped ({type(e).__name__})") from None
        except aiohttp.ClientResponseError as e:  # unparseable status line or headers
            raise _Retryable(f"bad HTTP answer from {server.url} ({e.message})") from None
        if status != 200:
            snippet = raw[:200].decode("utf-8", "replace").strip().replace("\n", " ")
            reason = f"HTTP {status} from {server.url}: {snippet}"
            if status in RETRYABLE_STATUS or status >= 500:
                raise _Retryable(reason, retry_after=retry_after)
            raise RequestFailed(reason, 1)
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _Retryable(f"malformed JSON from {server.url}: {raw[:80]!r}") from None
        return parse_completion(payload)
