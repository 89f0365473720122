"""Peer trainers for the benchmarks, each in its own pinned venv in the user cache.

    .venv/bin/python bench/peers.py install      # create (once) and check the speculators venv
    .venv/bin/python bench/peers.py check        # say whether it is ready, exit non-zero if not

vLLM's speculators 0.9.0 pins its own transformers, so it never goes into the project's .venv: it
gets `<cache>/peers/speculators-0.9.0` (cache = $EAGLE_CACHE_DIR or ~/.cache/eagle-tui). The install
follows shared/docs/quality.md: torch==2.13.0 first (this pin is the local CPU wheel; anything else
pulls multi-GB CUDA builds), then speculators with --no-deps and only its runtime needs (a plain
install also pulls CUDA torchvision/torchaudio wheels). A marker file written last records a
complete install; a half-made venv is removed and rebuilt.

`speculators_step_speed(docs, ...)` times speculators' real training step (their `Eagle3DraftModel`,
their kl_div loss) on packed features in that venv and returns tokens/s and peak RSS, for
bench/train.py's "ours vs theirs" row. Anything that cannot install or run raises PeerError with a
one-line reason; the command line prints it and exits 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
SPECULATORS_VERSION = "0.9.0"
TORCH_PIN = "torch==2.13.0"
# speculators' runtime needs, as measured in quality.md ("Peers on this machine")
SPECULATORS_DEPS = ["aiohttp", "click", "datasets<=5.1.0", "httpx", "huggingface-hub", "loguru",
                    "numpy<=2.5.4", "openai>=2", "protobuf", "psutil", "pydantic", "pydantic-settings",
                    "rich", "safetensors", "tqdm<=4.70.1", "transformers<=5.19.0", "typer",
                    f"hs-connectors=={SPECULATORS_VERSION}"]
MARKER = "eagle_peer.json"
TRAIN_SCRIPT = REPO / "bench" / "peer_speculators_train.py"


class PeerError(RuntimeError):
    """A peer that cannot be installed or run: the message is the one line to print."""


def cache_dir() -> Path:
    env = os.environ.get("EAGLE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eagle-tui"


def speculators_venv() -> Path:
    return cache_dir() / "peers" / f"speculators-{SPECULATORS_VERSION}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _run(cmd: list[str], what: str, log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if r.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise PeerError(f"speculators {SPECULATORS_VERSION}: {what} failed (exit {r.returncode}): "
                        f"{tail[0][:300]} (full log: {log})")


def _import_check(py: Path) -> str:
    """'' when speculators' model class imports in the venv, else the error line."""
    code = ("import importlib.metadata as m, torch, transformers\n"
            "from speculators.models.eagle3 import Eagle3DraftModel\n"
            "print(torch.__version__, m.version('speculators'), transformers.__version__)")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=False,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if r.returncode == 0:
        return ""
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {r.returncode}"


def speculators_ready() -> dict[str, Any] | None:
    """The install record of a complete venv, or None."""
    venv = speculators_venv()
    try:
        info = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("version") == SPECULATORS_VERSION and _python(venv).exists() else None


def ensure_speculators(log=print) -> dict[str, Any]:
    """Create the speculators venv once (reused afterwards); returns its install record."""
    info = speculators_ready()
    if info is not None:
        return info
    venv = speculators_venv()
    if venv.exists() and not _python(venv).exists():  # not even a venv: start over
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    pip_log = venv.parent / f"speculators-{SPECULATORS_VERSION}.install.log"
    pip_log.write_text("")
    # no marker but a venv: an interrupted install; the same pip steps complete it quickly
    log(f"[peers] {'completing' if venv.exists() else 'creating'} {venv} "
        f"(speculators {SPECULATORS_VERSION}; log {pip_log})")
    t0 = time.perf_counter()
    if not venv.exists():
        # the project venv's interpreter, but a venv of its own: nothing lands in .venv
        base = getattr(sys, "_base_executable", None) or sys.executable
        _run([base, "-m", "venv", str(venv)], "python -m venv", pip_log)
    py = str(_python(venv))
    pip = [py, "-m", "pip", "install", "--no-input", "--progress-bar", "off"]
    _run(pip + [TORCH_PIN], f"pip install {TORCH_PIN}", pip_log)
    _run(pip + ["--no-deps", f"speculators=={SPECULATORS_VERSION}"], "pip install speculators", pip_log)
    # the torch pin again keeps pip from swapping torch for another build while resolving the rest
    _run(pip + [TORCH_PIN, *SPECULATORS_DEPS], "pip install speculators' runtime dependencies", pip_log)
    err = _import_check(_python(venv))
    if err:
        raise PeerError(f"speculators {SPECULATORS_VERSION} installed but does not import: {err}")
    info = {"version": SPECULATORS_VERSION, "venv": str(venv), "python": py,
            "install_seconds": round(time.perf_counter() - t0, 1), "bytes": _dir_bytes(venv),
            "created": time.time()}
    (venv / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: marks the install complete
    log(f"[peers] speculators venv ready in {info['install_seconds']:.0f} s, "
        f"{info['bytes'] / 2**30:.2f} GiB")
    return info


def run_peer_script(args: Sequence[str], timeout: float | None = None, log=print,
                    stream: bool = False) -> dict[str, Any]:
    """Run bench/peer_speculators_train.py in the peer venv; returns the JSON of its last line.
    stream: pass its progress lines (stderr) on to `log` as they come."""
    import collections
    import threading

    info = ensure_speculators(log)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [info["python"], str(TRAIN_SCRIPT), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=str(REPO))
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def read_err() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            line = line.rstrip()
            if line:
                tail.append(line)
                if stream and line.startswith("[speculators]"):
                    log(f"  {line}")

    expired: list[bool] = []

    def kill() -> None:
        expired.append(True)
        proc.kill()

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    try:
        out = proc.stdout.read()  # type: ignore[union-attr]
        proc.wait()
    finally:
        if timer:
            timer.cancel()
    reader.join(timeout=5)
    if expired:
        raise PeerError(f"speculators peer run exceeded {timeout:.0f} s")
    if proc.returncode != 0:
        err = [t for t in tail if t.startswith("error:")] or list(tail)
        raise PeerError(f"speculators peer run failed (exit {proc.returncode}): "
                        f"{err[-1] if err else 'no output'}")
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise PeerError("speculators peer run printed no result line")


# ---- the speed half: their real training step on given packed features -------------------------
def write_peer_features(path: Path, docs: Sequence[dict], t2d: Any, d2t: Any) -> None:
    """Documents -> one safetensors file the peer script reads (doc i: `i.input_ids` [T] int64,
    `i.aux` [T, 3H] f32, `i.loss_mask` [T] int64, `i.final_hidden` [T, H] f32 (the target's last
    layer BEFORE its final norm: speculators' forward applies the verifier's norm and head itself)
    plus `t2d` [V] bool and `d2t` [Vd] int64."""
    import torch
    from safetensors.torch import save_file

    out = {"t2d": t2d.to(torch.bool).contiguous(), "d2t": d2t.to(torch.int64).contiguous()}
    for i, d in enumerate(docs):
        out[f"{i}.input_ids"] = d["input_ids"].to(torch.int64).contiguous()
        out[f"{i}.aux"] = d["aux_hidden"].float().contiguous()
        out[f"{i}.loss_mask"] = d["loss_mask"].to(torch.int64).contiguous()
        out[f"{i}.final_hidden"] = d["final_hidden"].float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))


def speculators_step_speed(docs: Sequence[dict], t2d: Any, d2t: Any, *, target: str | os.PathLike,
                           docs_per_step: int = 4, ttt_steps: int = 3, lr: float = 1e-4,
                           steps: int | None = None, warmup: int = 1, threads: int = 2,
                           timeout: float = 1800, log=print,
                           features: Path | None = None, decay: float | None = None) -> dict[str, Any]:
    """Time speculators' real training step (their Eagle3DraftModel, their alignment and packing
    with document ids, their kl_div loss; AdamW, grad clip 0.5) on `docs`: `docs_per_step`
    consecutive documents packed into one row per step (no attention across documents; the
    grouping of bench/train.py's groups_of), supervision where loss_mask is 1.

    docs: dicts with input_ids [T], aux_hidden [T, 3H], loss_mask [T], final_hidden [T, H] (as
    bench/train.py's real features hold them); t2d [V] bool, d2t [Vd]; target: the verifier folder
    (their frozen lm_head rows and embeddings come from it). `steps` timed steps (default: one
    pass over the groups, cycling when more) after `warmup` untimed ones; reading and collating a
    step's inputs stay outside the clock. Tokens are the documents' stored tokens (their alignment
    drops one per document). Returns tokens_per_s, tokens, seconds, peak_rss_mb (VmHWM of the peer
    process, reset just before the timed steps; it holds only the current step's documents),
    rss_before_mb, losses. Runs in its own process, so timings are not interleaved with ours:
    compare medians of repeated runs on a busy machine. `features`: a file write_peer_features
    already wrote for these docs (repeated runs skip writing it again).
    """
    with tempfile.TemporaryDirectory(prefix="peer-speed-") as tmp:
        feats = Path(features) if features is not None else Path(tmp) / "features.safetensors"
        if features is None:
            write_peer_features(feats, docs, t2d, d2t)
        n_groups = -(-len(docs) // docs_per_step)
        args = ["speed", "--features", feats, "--target", target, "--docs-per-step", docs_per_step,
                "--ttt-steps", ttt_steps, "--lr", lr, "--steps", steps or n_groups,
                "--warmup", warmup, "--threads", threads]
        if decay is not None:  # their TTT loss decay (default 1.0); their loss stays kl_div
            args += ["--decay", decay]
        return run_peer_script(args, timeout=timeout, log=log)


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["install", "check"])
    a = p.parse_args()
    try:
        if a.action == "check":
            info = speculators_ready()
            if info is None:
                raise PeerError(f"speculators {SPECULATORS_VERSION} venv not installed at "
                                f"{speculators_venv()} (run: bench/peers.py install)")
            err = _import_check(Path(info["python"]))
            if err:
                raise PeerError(f"speculators venv at {info['venv']} does not import: {err}")
        else:
            info = ensure_speculators()
        print(json.dumps(info))
        return 0
    except PeerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
