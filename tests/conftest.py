"""Shared fixtures. Nothing here reads a hub: tiny models and tokenizers are built locally."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from feature_support import SENTENCES  # plain data, no heavy imports

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# Persistent cache for the embedded SmolLM2 conversion: converted once per machine, reused by
# later runs (CI converts it once per clean clone). Overridable like the product's own cache.
os.environ.setdefault("EAGLE_CACHE_DIR", str(REPO / ".cache" / "eagle"))

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = SENTENCES * 20  # what the tiny tokenizer is trained on


def build_tiny_tokenizer(out_dir: Path, chat_template: str = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer trained on a small corpus, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out_dir: Path, vocab_size: int, seed: int = 0, **overrides):
    """A random 4-layer Llama with tied embeddings (like SmolLM2), saved as a plain HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    """Path of a tiny random Llama target with its own ChatML tokenizer (fast to load, offline)."""
    d = tmp_path_factory.mktemp("tiny_target")
    tok = build_tiny_tokenizer(d)
    build_tiny_llama(d, vocab_size=len(tok))
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the tiny model's ops are small, and on a shared, busy machine spinning
    OpenMP threads make them many times slower. Subprocesses get OMP_NUM_THREADS=1 to match."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
