"""Which assistant turns of a conversation get regenerated, and replaying them in order.

An answer slot is the position of an assistant turn, or the end of a conversation that ends with
a user (or tool) turn. A slot is usable when the turns before it contain a user turn and end with a
non-empty, non-assistant turn. `last` regenerates the final slot; `all` regenerates every usable
slot in order, each prompt carrying the answers regenerated before it. A conversation with no
usable slot is skipped (counted and reported, never sent).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Awaitable, Callable

from core.regen.client import Completion


class Skip(Exception):
    """No usable prompt: `reason` is the short category reported in failures.jsonl."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _slots(messages: list[dict]) -> list[int]:
    slots = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if messages and messages[-1].get("role") != "assistant":
        slots.append(len(messages))
    return slots


def _why_unusable(messages: list[dict], slot: int) -> str | None:
    prompt = messages[:slot]
    if not prompt:
        return "no user turn before the answer"
    if not any(m.get("role") == "user" for m in prompt):
        return "no user turn before the answer"
    if prompt[-1].get("role") == "assistant":
        return "prompt ends with an assistant turn"
    if not str(prompt[-1].get("content") or "").strip():
        return "empty prompt turn"
    return None


def plan(messages: list[dict], mode: str) -> list[int]:
    """Slots to regenerate, in order; raises Skip when there is none."""
    if not messages:
        raise Skip("empty conversation")
    slots = _slots(messages)
    if mode == "last":
        why = _why_unusable(messages, slots[-1])
        if why:
            raise Skip(why)
        return [slots[-1]]
    usable = [s for s in slots if _why_unusable(messages, s) is None]
    if not usable:
        raise Skip(_why_unusable(messages, slots[-1]) or "no usable prompt")
    return usable


def derive_seed(seed: int | None, index: int, turn: int) -> int | None:
    """A per-(sample, turn) seed: the same sample gets the same seed whatever the order or resume."""
    if seed is None:
        return None
    h = hashlib.sha256(f"{seed}:{index}:{turn}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclass
class Regenerated:
    messages: list[dict]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None
    turns: int
    attempts: int


async def replay(messages: list[dict], slots: list[int], index: int, seed: int | None,
                 chat: Callable[[list[dict], int | None], Awaitable[Completion]]) -> Regenerated:
    """Regenerate `slots` in order; the output ends with the last regenerated answer."""
    history = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    prompt_tokens = completion_tokens = attempts = 0
    last: Completion | None = None
    for turn, slot in enumerate(slots):
        last = await chat(history[:slot], derive_seed(seed, index, turn))
        answer = {"role": "assistant", "content": last.content}
        if slot < len(history):
            history[slot] = answer
        else:
            history.append(answer)
        prompt_tokens += last.prompt_tokens
        completion_tokens += last.completion_tokens
        attempts += last.attempts
    assert last is not None
    return Regenerated(messages=history[: slots[-1] + 1], finish_reason=last.finish_reason,
                       prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       reasoning=last.reasoning, turns=len(slots), attempts=attempts)
