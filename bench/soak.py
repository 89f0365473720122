"""Fault soak: kill -9 every stage at random (seeded) moments, resume, and compare with a clean run.

For regen (against the deterministic fault-injecting server of the tests), cache and train (on the
tests' tiny random Llama), each stage runs as the `eagle` CLI in a subprocess. A round starts in a
fresh folder and kills the run at a random moment (a random point of its progress plus a random
delay, or during start-up), then runs it again with --resume, until a run ends by itself; the
final outputs are then compared with an uninterrupted run of the same command:

  regen  every input sample exactly once (0 lost, 0 duplicated), rows equal, shards byte-identical
  cache  every shard present and byte-identical
  train  the final checkpoint's weights torch.equal

Besides kill -9, once per stage: SIGTERM (exit 130, then --resume), and a truncated file before
--resume (regen: a torn last journal line and a cut shard; cache: a cut shard); for regen also a
server that dies mid-run (the run stops with exit 1; --resume --retry-failed on a new server).

    python bench/soak.py                 # 20 kills per stage (10-15 min on a shared 2-core CPU)
    python bench/soak.py --kills 3 --stages regen,cache
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

EAGLE = [sys.executable, "-c", "from eagle_tui.cli import entry; entry()"]
KILLS_PER_ROUND = 4  # then the round runs to its end and is compared


def child_env() -> dict[str, str]:
    # one thread on both sides: the same numerics as the clean run, and a quiet shared CPU
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


@dataclass
class Figures:
    stage: str
    kills: int = 0  # kill -9 while the stage ran
    survived: int = 0  # kills whose --resume went on to finish the work
    mid_work: int = 0  # kills after the killed run had written some of its work (not in start-up)
    rounds: int = 0  # finished runs compared with the clean run
    lost: int = 0  # samples (regen, cache) missing from a finished run
    duplicated: int = 0  # samples present twice
    mismatches: int = 0  # rows, shards or tensors that differ from the clean run
    faults: dict[str, str] = field(default_factory=dict)  # sigterm, server death, truncation -> ok | why not
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.survived == self.kills and not self.lost and not self.duplicated
                and not self.mismatches and all(v == "ok" for v in self.faults.values()))

    def line(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in self.faults.items())
        return (f"{self.stage:<6} kills {self.kills:>3} ({self.mid_work} mid-work)  survived {self.survived:>3}  "
                f"rounds {self.rounds:>2}  "
                f"lost {self.lost}  duplicated {self.duplicated}  mismatches {self.mismatches}  "
                f"({self.seconds:.0f} s)  {faults}")


class StageFailed(Exception):
    pass


def run_to_end(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*EAGLE, *argv], capture_output=True, text=True, timeout=timeout,
                          env=child_env(), cwd=REPO)


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


# whether the last interrupted run had written some of its work, and whether it had written all of it
LAST = {"advanced": False, "done": False}


def interrupt(argv: list[str], progress: Callable[[], int], total: int, rng: random.Random,
              sig: int = signal.SIGKILL, startup_s: float = 3.0) -> int | None:
    """Start the stage and send `sig` at a random moment: once a random share of the remaining
    work is written, plus up to 0.3 s, or (one time in five) a random time into start-up. Returns the exit
    code, or None if the run ended before the signal (then it ran to its end)."""
    start = progress()
    proc = subprocess.Popen([*EAGLE, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=child_env(), cwd=REPO)
    try:
        if rng.random() < 0.2:
            deadline = time.monotonic() + rng.uniform(0.1, startup_s)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        else:
            target = start + rng.randint(1, max(1, total - start - 1))  # after some new work
            delay = rng.uniform(0.0, 0.3)
            t_end = time.monotonic() + 600
            while proc.poll() is None and progress() < target:
                if time.monotonic() > t_end:
                    raise StageFailed(f"no progress past {progress()} of {total} in 600 s")
                time.sleep(0.005)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.005)
        if proc.poll() is not None:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise StageFailed(f"exit {proc.returncode}: {one_line(err)}")
            return None
        LAST["advanced"], LAST["done"] = progress() > start, progress() >= total
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # it ended by itself in the instant before the signal
            return None
        return proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_round(fig: Figures, argv: list[str], progress: Callable[[], int], total: int,
               rng: random.Random, kills: int, **kw) -> None:
    """Kill -9 up to `kills` times at random moments, resuming each time, then finish the run."""
    resume: list[str] = []
    pending = 0  # kills not yet followed by a finished --resume
    for _ in range(kills):
        rc = interrupt(argv + resume, progress, total, rng, **kw)
        if rc is None:  # it finished before the kill
            break
        if rc != -signal.SIGKILL:
            raise StageFailed(f"killed run exited {rc}")
        fig.kills += 1
        fig.mid_work += LAST["advanced"]
        pending += 1
        resume = ["--resume"]
    else:
        r = run_to_end(argv + resume)
        if r.returncode != 0:
            raise StageFailed(f"--resume exited {r.returncode}: {one_line(r.stderr)}")
    fig.survived += pending


def soak_rounds(fig: Figures, work: Path, kills: int, rng: random.Random, argv: Callable[[Path], list[str]],
                progress: Callable[[Path], Callable[[], int]], total: int,
                compare: Callable[[Path, Path], None], **kw) -> Path:
    """The uninterrupted run (WORK/STAGE-clean), then rounds of kill_round into fresh folders until
    `kills` kills happened, each round's outputs compared with the clean run's. Returns the clean
    folder for the stage's other faults."""
    clean = work / f"{fig.stage}-clean"
    r = run_to_end(argv(clean))
    if r.returncode != 0:
        raise StageFailed(f"clean {fig.stage} exited {r.returncode}: {one_line(r.stderr)}")
    rnd = 0
    while fig.kills < kills:
        out = work / f"{fig.stage}-{rnd}"
        kill_round(fig, argv(out), progress(out), total, rng, min(KILLS_PER_ROUND, kills - fig.kills), **kw)
        compare(out, clean)
        rnd += 1
    return clean


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def cut_last_line(path: Path) -> None:
    """A torn write: the last line loses its second half and its newline."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    end = len(data.rstrip(b"\n"))
    path.write_bytes(data[:start + max(1, (end - start) // 2)])


def cut_file(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def same_files(a: Path, b: Path, pattern: str) -> tuple[int, int]:
    """(files of `a` missing from `b`, files whose bytes differ)."""
    missing = differ = 0
    for p in sorted(a.glob(pattern)):
        q = b / p.name
        if not q.exists():
            missing += 1
        elif q.read_bytes() != p.read_bytes():
            differ += 1
    return missing, differ


# ---- regen -----------------------------------------------------------------------------------
def soak_regen(work: Path, kills: int, rng: random.Random) -> Figures:
    from fault_server import FaultServer, read_output, write_conversations

    fig, t0 = Figures("regen"), time.monotonic()
    n = 160
    specs = [f"q{i} " + "lorem " * rng.randint(0, 40) for i in range(n)]
    inp = write_conversations(work / "regen-in.jsonl", specs)

    def argv(out: Path, url: str) -> list[str]:
        return ["regen", "--input-data", inp, "--output-dir", str(out), "--model", "tiny",
                "--target-server", url, "--shard-size", "16", "--concurrency", "4",
                "--max-new-tokens", "32", "--request-timeout", "5", "--max-retries", "2"]

    def compare(out: Path, clean: Path) -> None:
        rows, fails = read_output(out)
        ref, _ = read_output(clean)
        seen = [r["index"] for r in rows] + [f["index"] for f in fails]
        fig.lost += len(set(range(n)) - set(seen))
        fig.duplicated += len(seen) - len(set(seen))
        by_index = {r["index"]: r for r in rows}
        fig.mismatches += sum(by_index.get(r["index"]) != r for r in ref) + len(fails)
        missing, differ = same_files(clean, out, "shard-*.parquet")
        fig.mismatches += differ
        fig.rounds += 1

    with FaultServer(delay_s=0.03, max_lifetime_s=3600) as srv:
        clean = soak_rounds(fig, work, kills, rng, lambda out: argv(out, srv.url),
                            lambda out: lambda: count_lines(out / ".regen" / "journal.jsonl"), n, compare)

        # SIGTERM: stops like Ctrl-C (exit 130), then --resume
        out = work / "regen-sigterm"
        jr = out / ".regen" / "journal.jsonl"
        rc = interrupt(argv(out, srv.url), lambda: count_lines(jr), n, random.Random(rng.random()),
                       sig=signal.SIGTERM)
        fig.faults["sigterm"] = _resume_and_compare(rc, {130, None}, argv(out, srv.url),
                                                    lambda: compare(out, clean))

        # a torn journal line and a cut shard, then --resume
        out = work / "regen-torn"
        jr = out / ".regen" / "journal.jsonl"
        a = argv(out, srv.url)
        rc = interrupt(a, lambda: count_lines(jr), n, random.Random(rng.random()))
        for _ in range(5):  # until a shard is sealed, to have one to cut
            if list(out.glob("shard-*.parquet")):
                break
            rc = interrupt(a + ["--resume"], lambda: count_lines(jr), n, random.Random(rng.random()))
        cut_last_line(jr)
        cut_file(sorted(out.glob("shard-*.parquet"))[0])
        fig.faults["torn journal line + cut shard"] = _resume_and_compare(
            rc, {-signal.SIGKILL, None}, a, lambda: compare(out, clean))

    # a server that dies mid-run: the run stops (exit 1); --resume --retry-failed on a new server
    out = work / "regen-server-death"
    jr = out / ".regen" / "journal.jsonl"
    dying = FaultServer(delay_s=0.03, max_lifetime_s=600).start()
    proc = subprocess.Popen([*EAGLE, *argv(out, dying.url)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO)
    while count_lines(jr) < n // 3 and proc.poll() is None:
        time.sleep(0.005)
    dying.stop()
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 1:
        fig.faults["server death"] = f"exit {proc.returncode}, expected 1: {one_line(err)}"
    else:
        with FaultServer(delay_s=0.0, max_lifetime_s=600) as srv2:
            r = run_to_end(argv(out, srv2.url) + ["--resume", "--retry-failed"])
        fig.faults["server death"] = "ok" if r.returncode == 0 else f"resume exit {r.returncode}: {one_line(r.stderr)}"
        if r.returncode == 0:
            compare(out, clean)
    fig.seconds = time.monotonic() - t0
    return fig


def _resume_and_compare(rc: int | None, expect: set[int | None], argv: list[str],
                        compare: Callable[[], None]) -> str:
    """--resume after an interruption that ended with `rc` (None: the run had finished)."""
    if rc not in expect:
        return f"exit {rc}, expected one of {sorted(expect, key=str)}"
    r = run_to_end(argv + ["--resume"])
    if r.returncode != 0:
        return f"resume exit {r.returncode}: {one_line(r.stderr)}"
    compare()
    return "ok"


# ---- cache -----------------------------------------------------------------------------------
def tiny_target(work: Path) -> Path:
    d = work / "tiny-target"
    if not (d / "config.json").exists():
        from conftest import build_tiny_llama, build_tiny_tokenizer

        d.mkdir(parents=True, exist_ok=True)
        tok = build_tiny_tokenizer(d)
        build_tiny_llama(d, vocab_size=len(tok))
    return d


def soak_cache(work: Path, kills: int, rng: random.Random) -> Figures:
    from feature_support import write_conversations

    fig, t0 = Figures("cache"), time.monotonic()
    target = tiny_target(work)
    data = write_conversations(work / "cache-convs.jsonl", 48, max_sentences=2)
    shards = 24

    def argv(out: Path) -> list[str]:
        return ["cache", "--target", str(target), "--data", str(data), "--output", str(out),
                "--draft-vocab-size", "48", "--max-length", "128", "--shard-size", "2",
                "--batch-tokens", "128", "--aux-dtype", "fp8", "--target-store", "topk", "--topk", "8"]

    def progress(out: Path) -> Callable[[], int]:
        return lambda: len(list(out.glob("shard-*.safetensors")))

    def compare(out: Path, clean: Path) -> None:
        m = json.loads((out / "manifest.json").read_text())
        ref = json.loads((clean / "manifest.json").read_text())
        have = {s["file"]: s["samples"] for s in m["shards"]}
        fig.lost += sum(s["samples"] for s in ref["shards"] if s["file"] not in have)
        fig.duplicated += len(m["shards"]) - len(have)
        missing, differ = same_files(clean, out, "shard-*.safetensors")
        fig.mismatches += differ + int(m["shards"] != ref["shards"] or not m["complete"])
        fig.rounds += 1

    clean = soak_rounds(fig, work, kills, rng, argv, progress, shards, compare, startup_s=8.0)

    out = work / "cache-sigterm"  # no handler: SIGTERM ends it like a kill (-15); --resume
    rc = interrupt(argv(out), progress(out), shards, random.Random(rng.random()), sig=signal.SIGTERM)
    fig.faults["sigterm"] = _resume_and_compare(rc, {-signal.SIGTERM, 130, None}, argv(out),
                                                lambda: compare(out, clean))

    out = work / "cache-cut"
    a = argv(out)
    rc = interrupt(a, progress(out), shards, random.Random(rng.random()), startup_s=8.0)
    for _ in range(5):  # until a shard is written, to have one to cut
        if list(out.glob("shard-*.safetensors")):
            break
        rc = interrupt(a + ["--resume"] if (out / "manifest.json").exists() else a, progress(out), shards,
                       random.Random(rng.random()), startup_s=8.0)
    cut_file(sorted(out.glob("shard-*.safetensors"))[0])
    fig.faults["cut shard"] = _resume_and_compare(rc, {-signal.SIGKILL, None}, a, lambda: compare(out, clean))
    fig.seconds = time.monotonic() - t0
    return fig


# ---- train -----------------------------------------------------------------------------------
def soak_train(work: Path, kills: int, rng: random.Random) -> Figures:
    import torch
    from safetensors.torch import load_file

    from train_support import write_conversations

    fig, t0 = Figures("train"), time.monotonic()
    target = tiny_target(work)
    data = write_conversations(work / "train-convs.jsonl", 40)
    steps = 16

    def argv(out: Path) -> list[str]:
        return ["train", "--target", str(target), "--data", str(data), "--output-dir", str(out),
                "--max-length", "96", "--max-tokens-per-batch", "192", "--ttt-length", "3",
                "--draft-vocab-size", "64", "--val-fraction", "0.2", "--lr", "1e-3",
                "--save-every", "2", "--keep-last", "2", "--max-steps", str(steps), "--device", "cpu"]

    def progress(out: Path) -> Callable[[], int]:
        def step() -> int:
            try:
                return int((out / "latest").read_text().strip().rsplit("-", 1)[1])
            except (FileNotFoundError, ValueError, IndexError):
                return 0
        return step

    def compare(out: Path, clean: Path) -> None:
        ref_dir = clean / (clean / "latest").read_text().strip()
        got_dir = out / (out / "latest").read_text().strip()
        a, b = load_file(str(ref_dir / "draft.safetensors")), load_file(str(got_dir / "draft.safetensors"))
        fig.mismatches += int(a.keys() != b.keys()) + sum(not torch.equal(a[k], b[k]) for k in a if k in b)
        fig.mismatches += int(ref_dir.name != got_dir.name)
        fig.rounds += 1

    clean = soak_rounds(fig, work, kills, rng, argv, progress, steps, compare, startup_s=8.0)

    out = work / "train-sigterm"  # saves the step it is on, exits 130; --resume
    rc = interrupt(argv(out), progress(out), steps, random.Random(rng.random()), sig=signal.SIGTERM)
    # a signal during start-up (no checkpoint yet) may land before the handler exists, and one after
    # the last step was saved lands after train() gave the handler back: both end as a plain -15
    mid_training = LAST["advanced"] and not LAST["done"]
    expect = {130, None} if mid_training else {130, None, -signal.SIGTERM}
    fig.faults["sigterm"] = _resume_and_compare(rc, expect, argv(out), lambda: compare(out, clean))
    fig.seconds = time.monotonic() - t0
    return fig


STAGES = {"regen": soak_regen, "cache": soak_cache, "train": soak_train}


def run(kills: int, seed: int, stages: list[str], workdir: Path) -> list[Figures]:
    out = []
    for name in stages:
        rng = random.Random(f"{seed}-{name}")
        work = workdir / name
        work.mkdir(parents=True, exist_ok=True)
        try:
            fig = STAGES[name](work, kills, rng)
        except (StageFailed, subprocess.TimeoutExpired) as e:
            fig = Figures(name)
            fig.faults["soak"] = f"stopped: {e}"
        print(fig.line(), flush=True)
        out.append(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill -9 per stage (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="regen,cache,train")
    ap.add_argument("--workdir", default=None, help="keep the outputs here (default: a temp folder)")
    args = ap.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="eagle-soak-")
    work = Path(args.workdir or tmp)
    print(f"soak: {args.kills} kill -9 per stage, seed {args.seed}, in {work}", flush=True)
    try:
        figs = run(args.kills, args.seed, stages, work)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(f.kills for f in figs)
    print(f"total: {total} kills, {sum(f.survived for f in figs)} survived, "
          f"{sum(f.lost for f in figs)} samples lost, {sum(f.duplicated for f in figs)} duplicated, "
          f"{sum(f.mismatches for f in figs)} mismatches; "
          + ("all identical" if all(f.ok for f in figs) else "FAILURES above"), flush=True)
    return 0 if all(f.ok for f in figs) else 1


if __name__ == "__main__":
    sys.exit(main())
