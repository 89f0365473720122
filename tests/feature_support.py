"""Helpers for the features area's tests (vocab, features, cache, budget): small chat datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path

# Sentences the tiny fixture tokenizer was trained on: they tokenize compactly.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Speculative decoding drafts tokens with a small model and verifies them with the target.",
    "def add(a, b):\n    return a + b\n",
    "Hello! How can I help you today? Sure, here is a short answer.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; : ! ? ( ) [ ] { }",
]


def conversations(n: int, seed: int = 0, max_sentences: int = 3) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = []
        for _turn in range(rng.choice([1, 1, 2])):
            msgs.append({"role": "user", "content": " ".join(rng.choice(SENTENCES)
                                                           for _ in range(rng.randint(1, max_sentences)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choice(SENTENCES)
                                                                for _ in range(rng.randint(1, max_sentences)))})
        rows.append({"messages": msgs})
    return rows


def write_conversations(path: Path, n: int, seed: int = 0, max_sentences: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(n, seed, max_sentences)))
    return path
