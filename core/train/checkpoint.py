"""Training checkpoints: the run directory of design.md, exact resume, and loading a trained draft.

Layout of a run directory:
    manifest.json                      kind "train": settings, draft config, target, vocab, aux ids
    vocab/                             the draft vocab (vocab.safetensors + vocab.json)
    embed_tokens.safetensors           the target's frozen embedding matrix, stored once per run
    metrics.jsonl                      one JSON object per train / val step
    latest                             "checkpoints/step-N": written atomically after a checkpoint
    best                               "checkpoints/step-N": the checkpoint with the highest held-out
                                       real τ so far (best.json: its τ and step); kept when pruning
    trained_on.jsonl                   index and prompt sha256 of every conversation it trained on
    checkpoints/step-N/
        draft.safetensors              the draft's state (export key names) without embed_tokens
        optimizer.safetensors          AdamW state tensors; optimizer.json: groups and scalars
        state.json                     step, epoch, data position, scheduler, RNG states per rank
        draft_config.json              DraftConfig.to_dict(), so a step dir alone describes the draft

A checkpoint is written into a hidden temporary folder and renamed into place, then `latest` is
replaced atomically: a kill at any moment leaves the previous checkpoint intact and `latest`
pointing at a complete one. Nothing here is a pickle.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import CorruptDataError, InputDataError
from core import disk
from core.manifest import load_manifest, read_json, write_bytes_atomic

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
BEST_INFO = "best.json"
DRAFT_FILE = "draft.safetensors"
OPTIM_FILE = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
STATE_FILE = "state.json"
DRAFT_CONFIG = "draft_config.json"
EMBED_FILE = "embed_tokens.safetensors"
EMBED_KEY = "embed_tokens.weight"
VOCAB_DIR = "vocab"
METRICS = "metrics.jsonl"


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- optimizer state <-> safetensors + JSON ----------------------------------------------------
def flatten_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state dict -> (tensors, JSON meta). Keys may be ints or parameter names."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    keys = []
    for key, st in osd["state"].items():
        keys.append([key, type(key).__name__])
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{key}/{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(key), {})[name] = v
    return tensors, {"keys": keys, "scalars": scalars, "param_groups": osd["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {}
    for key, kind in meta["keys"]:
        k = int(key) if kind == "int" else key
        st = dict(meta["scalars"].get(str(key), {}))
        prefix = f"state/{key}/"
        for name, t in tensors.items():
            if name.startswith(prefix):
                st[name[len(prefix):]] = t
        state[k] = st
    # JSON turned tuples (AdamW betas) into lists
    groups = [{n: tuple(v) if n == "betas" else v for n, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- RNG states as JSON -----------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    out = {"python": [version, list(state), gauss],
           "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_cached)],
           "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_state(d: dict[str, Any]) -> None:
    version, state, gauss = d["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = d["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(d["torch"]))
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in d["cuda"]])


# ---- writing ----------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, draft_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], state: dict[str, Any], draft_config: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoints/step-N atomically, point `latest` at it, prune to the last `keep_last`."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    disk.check_free(root, _tensor_bytes(v for k, v in draft_state.items() if k != EMBED_KEY) + _tensor_bytes(
        v for st in optim_state.get("state", {}).values() for v in st.values()), f"checkpoint step {step}", during_run=True)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in draft_state.items() if k != EMBED_KEY}
    with disk.naming_full_disk(tmp / DRAFT_FILE):
        save_file(weights, str(tmp / DRAFT_FILE), metadata={"step": str(step)})
    o_tensors, o_meta = flatten_optimizer_state(optim_state)
    with disk.naming_full_disk(tmp / OPTIM_FILE):
        save_file(o_tensors, str(tmp / OPTIM_FILE), metadata={"step": str(step)})
    for name, obj in ((OPTIM_META, o_meta), (STATE_FILE, {**state, "step": step}),
                      (DRAFT_CONFIG, draft_config)):
        (tmp / name).write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (a resumed run ending where it was saved)
        old = root / f".{step_dir_name(step)}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    write_bytes_atomic(run_dir / LATEST, f"{CHECKPOINTS}/{step_dir_name(step)}\n".encode())
    prune_checkpoints(run_dir, keep_last)
    return final


def _tensor_bytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor)) + (64 << 10)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                out.append((int(p.name[5:]), p))
    return sorted(out)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names) and
    leftovers of interrupted writes."""
    run_dir = Path(run_dir)
    keep = {p.resolve() for p in (latest_checkpoint(run_dir), best_checkpoint(run_dir)) if p is not None}
    ckpts = list_checkpoints(run_dir)
    for _, p in ckpts[:-keep_last] if keep_last > 0 else []:
        if p.resolve() not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in (run_dir / CHECKPOINTS).glob(".step-*"):
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    p = Path(run_dir) / LATEST
    if not p.exists():
        return None
    rel = p.read_text().strip()
    d = Path(run_dir) / rel
    if not (d / STATE_FILE).exists():
        raise CorruptDataError(f"{p} points at {rel}, which is not a complete checkpoint")
    return d


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `best` names, or None (no held-out τ measured yet, or it is gone)."""
    p = Path(run_dir) / BEST
    if not p.exists():
        return None
    d = Path(run_dir) / p.read_text().strip()
    return d if (d / STATE_FILE).exists() else None


def beats_best(best: dict[str, Any], tau: float, val_loss: float | None) -> bool:
    """Whether a checkpoint with held-out τ `tau` replaces `best`. A few short selection prompts
    often give checkpoints the very same τ (the same accepted counts): the tie goes to the lower
    validation loss, else to the later checkpoint, not to the first one reached (a run on 388
    conversations kept step 200 of 786 that way, tied with steps 600, 700 and 786)."""
    if not best or tau != best["tau"]:
        return not best or tau > best["tau"]
    old = best.get("val_loss")
    return val_loss is None or old is None or val_loss < old


def mark_best(run_dir: str | Path, step: int, info: dict[str, Any]) -> None:
    """Point `best` at checkpoints/step-N (written after the checkpoint itself, atomically)."""
    run_dir = Path(run_dir)
    write_bytes_atomic(run_dir / BEST_INFO, (json.dumps({"step": step, **info}, indent=1) + "\n").encode())
    write_bytes_atomic(run_dir / BEST, f"{CHECKPOINTS}/{step_dir_name(step)}\n".encode())


def pick_checkpoint(run_dir: str | Path, which: str = "best") -> Path | None:
    """`best` (highest held-out τ; the latest when none was measured), `latest`, or a step
    (`step-N` or `N`)."""
    run_dir = Path(run_dir)
    if which == "best":
        return best_checkpoint(run_dir) or latest_checkpoint(run_dir)
    if which == "latest":
        return latest_checkpoint(run_dir)
    name = which if which.startswith("step-") else f"step-{which}"
    if not name[5:].isdigit():
        raise InputDataError(f"checkpoint {which!r} is not best, latest, step-N or N", path=str(run_dir))
    d = run_dir / CHECKPOINTS / step_dir_name(int(name[5:]))
    if not (d / STATE_FILE).exists():
        have = ", ".join(p.name for _, p in list_checkpoints(run_dir)) or "none"
        raise InputDataError(f"no checkpoint {name} (have: {have})", path=str(run_dir))
    return d


def find_checkpoint(path: str | Path, which: str = "best") -> Path | None:
    """The checkpoint folder (holding draft.safetensors) of a run dir (its `which` checkpoint) or
    of a checkpoint dir; for other layouts a `latest` link/file or the highest step-N; else None."""
    path = Path(path)
    if (path / DRAFT_FILE).is_file():
        return path
    if (path / "manifest.json").is_file() and (path / CHECKPOINTS).is_dir():
        cand = pick_checkpoint(path, which)
        if cand is not None and (cand / DRAFT_FILE).is_file():
            return cand
    for base in (path, path / CHECKPOINTS):
        latest = base / LATEST
        if latest.is_symlink() or latest.is_dir():
            cand = latest.resolve()
        elif latest.is_file():
            cand = path / CHECKPOINTS / latest.read_text().strip()
            if not cand.is_dir():
                cand = base / latest.read_text().strip()
        else:
            continue
        if (cand / DRAFT_FILE).is_file():
            return cand
    steps = [p for _, p in list_checkpoints(path) if (p / DRAFT_FILE).is_file()]
    return steps[-1] if steps else None


# ---- reading ----------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    path: Path
    step: int
    draft_state: dict[str, torch.Tensor]
    optim_state: dict[str, Any]
    state: dict[str, Any]
    draft_config: dict[str, Any]


def load_checkpoint(step_dir: str | Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(step_dir)
    try:
        draft = load_file(str(d / DRAFT_FILE))
        o_tensors = load_file(str(d / OPTIM_FILE))
        o_meta = read_json(d / OPTIM_META)
        state = read_json(d / STATE_FILE)
        cfg = read_json(d / DRAFT_CONFIG)
    except (SafetensorError, OSError) as e:
        raise CorruptDataError(f"{d}: checkpoint unreadable ({e})",
                               hint="delete it and point `latest` at an earlier one") from e
    return Checkpoint(d, int(state["step"]), draft, unflatten_optimizer_state(o_tensors, o_meta),
                      state, cfg)


def resolve_checkpoint(path: str | Path, which: str = "best") -> tuple[Path, Path | None]:
    """(step dir, run dir or None) for a run dir (its `which` checkpoint) or a step dir."""
    p = Path(path).expanduser()
    if (p / DRAFT_FILE).exists():
        run = p.parent.parent if p.parent.name == CHECKPOINTS else None
        return p, run if run is not None and (run / "manifest.json").exists() else None
    if (p / "manifest.json").exists():
        m = load_manifest(p)
        if m is None or m.kind != "train":
            raise InputDataError(f"not a training run (manifest kind {m.kind if m else None!r})",
                                 path=str(p))
        ck = pick_checkpoint(p, which)
        if ck is None:
            raise InputDataError("this run has no checkpoint yet", path=str(p))
        return ck, p
    raise InputDataError("neither a training run dir nor a checkpoint dir (no manifest.json or "
                         f"{DRAFT_FILE})", path=str(p))


def write_run_embeddings(run_dir: str | Path, embed: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from core.manifest import atomic_path

    path = Path(run_dir) / EMBED_FILE
    disk.check_free(run_dir, embed.numel() * embed.element_size() + (1 << 12), "the run's embedding file")
    with disk.naming_full_disk(path), atomic_path(path) as tmp:
        save_file({EMBED_KEY: embed.detach().cpu().contiguous()}, str(tmp))


def write_metrics_line(run_dir: str | Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """On resume: drop records past the checkpoint's step (and a torn last line), atomically."""
    p = Path(run_dir) / METRICS
    if not p.exists():
        return
    keep = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("step", 0)) <= step:
            keep.append(line)
    write_bytes_atomic(p, ("\n".join(keep) + "\n" if keep else "").encode())
