"""Render a conversation with the target's own chat template and build its loss mask.

The loss mask is 1 exactly on what the model generates in each assistant turn: the turn's
content as the template renders it, plus the end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...);
0 on system/user/tool turns, role headers and the separators after the end token.

Templates rarely carry `{% generation %}` markers, and some rewrite earlier turns (Qwen-style
templates drop the `<think>` part of assistant turns before the last user message), so a prefix
render is not a prefix of the final render. We therefore locate every assistant turn in the
*final* render, between two strings learnt once per template:
  - the assistant header: what `add_generation_prompt=True` appends to a conversation;
  - the end-of-turn string: the special token the template writes right after assistant content.
Character spans are mapped to tokens with the fast tokenizer's offset mapping.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import InputDataError, UsageError

# Private-use code points: never in real text, untouched by templates' trim/strip/split.
_SENTINEL_USER = "\ue000user\ue001"
_SENTINEL_ASSISTANT = "\ue000assistant\ue001"


class ChatTemplateError(UsageError):
    """The tokenizer's chat template cannot be rendered or its assistant turns cannot be located."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True)
class TemplateMarkers:
    assistant_header: str  # e.g. "<|im_start|>assistant\n"
    end_of_turn: str  # e.g. "<|im_end|>"; "" when the template writes no special token there


_MARKERS: "weakref.WeakKeyDictionary[Any, tuple[str, TemplateMarkers]]" = weakref.WeakKeyDictionary()


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors, a template that rejects a role order, ...
        raise ChatTemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _special_strings(tokenizer) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials.update(str(t) for t in decoder.values())
    return sorted((s for s in specials if s), key=len, reverse=True)


def template_markers(tokenizer) -> TemplateMarkers:
    """Learn the assistant header and end-of-turn string of the tokenizer's chat template (cached)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("the tokenizer has no chat template",
                                hint="use the target's own tokenizer (its tokenizer_config.json "
                                     "or chat_template.jinja carries the template)")
    key = tokenizer.chat_template
    try:
        cached = _MARKERS.get(tokenizer)
    except TypeError:
        cached = None
    if cached and cached[0] == key:
        return cached[1]

    user = [{"role": "user", "content": _SENTINEL_USER}]
    base = _render(tokenizer, user)
    with_prompt = _render(tokenizer, user, add_generation_prompt=True)
    if not with_prompt.startswith(base) or len(with_prompt) == len(base):
        raise ChatTemplateError("the chat template has no usable generation prompt "
                                "(add_generation_prompt=True must append the assistant header)")
    header = with_prompt[len(base):]

    turn = _render(tokenizer, user + [{"role": "assistant", "content": _SENTINEL_ASSISTANT}])
    at = turn.find(_SENTINEL_ASSISTANT)
    if at < 0:
        raise ChatTemplateError("the chat template does not render assistant content")
    after = turn[at + len(_SENTINEL_ASSISTANT):]
    end = next((s for s in _special_strings(tokenizer) if after.startswith(s)), "")
    if header not in turn:
        # Some templates end the generation prompt with whitespace a rendered turn does not have.
        header = header.rstrip()
        if not header or header not in turn:
            raise ChatTemplateError("cannot find the generation prompt inside a rendered assistant turn")

    markers = TemplateMarkers(assistant_header=header, end_of_turn=end)
    try:
        _MARKERS[tokenizer] = (key, markers)
    except TypeError:
        pass
    return markers


def _answer_text(content: str) -> str:
    """The part of an assistant message every template keeps (reasoning may be dropped)."""
    return content.rsplit("</think>", 1)[-1].strip()


def assistant_spans(tokenizer, messages: list[dict], text: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [start, end) character spans of each assistant turn incl. its end token)."""
    markers = template_markers(tokenizer)
    if text is None:
        text = _render(tokenizer, messages)
    header, end_tok = markers.assistant_header, markers.end_of_turn
    assistants = [m for m in messages if m.get("role") == "assistant"]
    if text.count(header) != len(assistants):
        raise ChatTemplateError(
            f"found the assistant header {header!r} {text.count(header)} times in the rendered "
            f"conversation but it has {len(assistants)} assistant turns (does some content "
            "contain the template's special tokens?)")
    spans: list[tuple[int, int]] = []
    pos = 0
    for msg in assistants:
        start = text.index(header, pos) + len(header)
        answer = _answer_text(str(msg.get("content", "")))
        if end_tok:
            stop = text.find(end_tok, start)
            if stop < 0:
                raise ChatTemplateError(f"no {end_tok!r} after an assistant turn in the rendered text")
            end = stop + len(end_tok)
            body = text[start:stop]
        else:  # no special end token: the turn ends where its content ends
            at = text.find(answer, start) if answer else start
            if at < 0:
                raise ChatTemplateError("cannot locate an assistant turn's content in the rendered text")
            end = at + len(answer)
            body = text[start:end]
        if answer and answer not in body:
            raise ChatTemplateError("an assistant turn's content is not where the template "
                                    "renders it (the template rewrites it beyond recognition?)")
        spans.append((start, end))
        pos = end
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> TokenizedConversation:
    """Token ids of the chat-template render and a loss mask on assistant turns (+ end token).

    Truncation to `max_length` cuts ids and mask together, so they stay aligned.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("a fast tokenizer (with offset mappings) is needed to build loss masks")
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    mask = [0] * len(ids)
    # A token belongs to a turn when it starts inside the turn's span. Tokens that straddle a
    # header/content boundary start in the header and stay unsupervised. (Offsets may be
    # zero-width where a ByteLevel post-processor trims spaces; their start still counts.)
    k = 0
    for i, (s, _e) in enumerate(offsets):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if spans[k][0] <= s < spans[k][1]:
            mask[i] = 1
    if max_length is not None:
        if max_length <= 0:
            raise UsageError(f"max_length must be positive, got {max_length}")
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedConversation(input_ids=ids, loss_mask=mask)


def load_tokenizer(path: str):
    """A fast tokenizer from a local folder (offline); 'demo' means the embedded demo target."""
    if path == "demo":
        from core.assets import demo_target

        path = str(demo_target())
    folder = Path(path)
    if not folder.exists():
        raise InputDataError("tokenizer folder not found", path=path)
    if folder.is_dir() and not any((folder / f).is_file() for f in
                                   ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise InputDataError("no tokenizer files here (tokenizer.json / tokenizer_config.json)",
                             path=path, hint="give the target model's folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputDataError(f"cannot load a tokenizer: {first}", path=path) from e
