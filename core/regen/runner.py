"""The async engine of a regeneration run (entry.py prepares it, this module runs it).

Samples are sent with bounded concurrency; each finished sample is journaled; a shard is sealed
(parquet + manifest checksum + failures.jsonl) as soon as all of its samples are done, failed or
skipped. Shards cover fixed blocks of `shard_size` input positions, so a resumed run rebuilds
exactly the same shards; the journal (not the shards) is the source of truth for what is finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import CorruptDataError, FailureLimitError
from core.events import Log, Progress, RateMeter, SampleFailed, ShardDone, StageFinished, StageStarted
from core.manifest import sha256_file
from core.regen.client import ChatClient, RequestFailed, ServerPool
from core.regen.journal import DONE, FAILED, SKIPPED, Journal
from core.regen.turns import Skip, plan, replay
from core.regen.writer import shard_name, write_failures, write_shard

STAGE = "regen"
WORK_DIR = ".regen"  # journal and server log: not part of the dataset


@dataclass
class RegenResult:
    output_dir: str
    total: int
    done: int
    failed: int
    skipped: int
    bad_rows: int
    shards: int
    tokens_generated: int
    prompt_tokens: int
    requested: int  # samples sent in this run (not counting resumed ones)
    retries: int
    elapsed_s: float
    samples_per_s: float
    tokens_per_s: float
    resumed: bool
    dead_servers: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RegenRun:
    def __init__(self, cfg, events, convs, report, manifest, resumed, urls, model):
        self.cfg, self.events, self.convs, self.manifest = cfg, events, convs, manifest
        self.resumed, self.urls, self.model = resumed, urls, model
        self.seed = cfg.seed  # None: requests carry no seed (an engine that cannot take one)
        self.out = Path(cfg.output_dir)
        self.bad_rows = [{"index": int(b.index), "kind": "bad_row", "reason": f"{b.reason}: {b.detail}",
                          "attempts": 0} for b in report.bad_rows]
        self.journal = Journal(self.out / WORK_DIR / "journal.jsonl", sync_every_s=cfg.journal_sync_s)
        self.n_shards = (len(convs) + cfg.shard_size - 1) // cfg.shard_size
        self.pos_of = {c.index: p for p, c in enumerate(convs)}  # sample index -> input position
        self.requested = self.tokens_now = 0
        self.seal_lock = asyncio.Lock()

    # -- bookkeeping -------------------------------------------------------------------------
    def _counts(self) -> dict[str, int]:
        return dict(self.counts)

    def _index_counters(self) -> None:
        """Status counts and unfinished samples per shard, kept up to date by `_record`."""
        self.counts = {DONE: 0, FAILED: 0, SKIPPED: 0}
        self.remaining = [len(self._shard_positions(k)) for k in range(self.n_shards)]
        for idx, e in self.journal.entries.items():
            self.counts[e["status"]] += 1
            self.remaining[self.pos_of[idx] // self.cfg.shard_size] -= 1

    def _record(self, entry: dict[str, Any]) -> None:
        old = self.journal.entries.get(entry["index"])
        self.journal.append(entry)
        if old is not None:
            self.counts[old["status"]] -= 1
        else:
            self.remaining[self.pos_of[entry["index"]] // self.cfg.shard_size] -= 1
        self.counts[entry["status"]] += 1

    def _shard_positions(self, k: int) -> range:
        return range(k * self.cfg.shard_size, min(len(self.convs), (k + 1) * self.cfg.shard_size))

    def _shard_finished(self, k: int) -> bool:
        return self.remaining[k] == 0

    def _failure_records(self) -> list[dict[str, Any]]:
        recs = [{"index": e["index"], "kind": e["status"], "reason": e["reason"],
                 "attempts": e.get("attempts", 0)}
                for e in self.journal.entries.values() if e["status"] != DONE]
        return recs + self.bad_rows

    def _seal(self, k: int) -> None:
        self._write_sealed(self._seal_plan(k))

    def _seal_plan(self, k: int) -> dict[str, Any]:
        """Everything shard k needs, copied from the journal on the event-loop thread (the write
        itself may run in a worker thread while new samples keep arriving)."""
        rows, failed, skipped = [], 0, 0
        for p in self._shard_positions(k):
            conv = self.convs[p]
            e = self.journal.entries[conv.index]
            if e["status"] == DONE:
                rows.append({**e, "original_messages": conv.messages})
            else:
                failed += e["status"] == FAILED
                skipped += e["status"] == SKIPPED
        pos = self._shard_positions(k)
        return {"name": shard_name(k), "rows": rows, "failed": failed, "skipped": skipped,
                "first": pos.start, "last": pos.stop - 1, "counts": self._counts(),
                "failures": self._failure_records()}

    def _write_sealed(self, plan: dict[str, Any]) -> None:
        """Shard parquet, then its checksum in the manifest, then failures.jsonl (all atomic)."""
        write_shard(self.out / plan["name"], plan["rows"], with_reasoning=self.cfg.reasoning == "save")
        self.manifest.add_shard(self.out, plan["name"], len(plan["rows"]), failed=plan["failed"],
                                skipped=plan["skipped"], first_position=plan["first"],
                                last_position=plan["last"])
        self._refresh_manifest(counts=plan["counts"])
        write_failures(self.out, plan["failures"])

    def _refresh_manifest(self, complete: bool = False, counts: dict[str, int] | None = None,
                          **extra: Any) -> None:
        c = counts or self._counts()
        self.manifest.extra.update(done=c[DONE], failed=c[FAILED], skipped=c[SKIPPED],
                                   bad_rows=len(self.bad_rows), shards_total=self.n_shards, **extra)
        self.manifest.complete = complete
        self.manifest.save(self.out)

    def _sealed_ok(self, k: int) -> bool:
        rec = next((s for s in self.manifest.shards if s["file"] == shard_name(k)), None)
        p = self.out / shard_name(k)
        return rec is not None and p.exists() and sha256_file(p) == rec["sha256"]

    # -- the run ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def opened(self):
        """The journal loaded (a resumed run's outcomes) and open for appending; closed on the way
        out, whatever happens in between (a server that fails to start included)."""
        self.t0 = time.monotonic()
        for stray in self.out.glob(".*.tmp"):  # temp files of writes cut by a kill
            stray.unlink(missing_ok=True)
        self.journal.load()
        unknown = self.journal.entries.keys() - self.pos_of.keys()
        if unknown:
            raise CorruptDataError(f"{self.journal.path} records samples that are not in the input "
                                   f"(e.g. index {min(unknown)})",
                                   hint="the input changed since the first run; use a new output directory")
        self.stale: set[int] = set()  # sealed shards whose failed samples are sent again
        if self.cfg.retry_failed:  # forget the failures in memory; the file keeps them until
            for idx in [i for i, e in self.journal.entries.items() if e["status"] == FAILED]:
                del self.journal.entries[idx]  # the new outcome is appended
                self.stale.add(self.pos_of[idx] // self.cfg.shard_size)
        self._index_counters()
        if self.journal.torn_bytes:
            self.events(Log(stage=STAGE, level="warning", message=(
                f"dropped a torn last journal line ({self.journal.torn_bytes} bytes); that sample "
                "will be sent again")))
        self.journal.open()
        try:
            yield self
        finally:
            self.journal.close()

    def pending(self) -> list[int]:
        """Input positions still to send (inside `opened`); a conversation with nothing to send is
        journaled as skipped here. The caller starts a server only when this is not empty."""
        todo: list[int] = []
        for p, conv in enumerate(self.convs):
            if conv.index in self.journal.entries:
                continue
            try:
                plan(conv.messages, self.cfg.turns)  # raises Skip for a conversation with nothing to send
            except Skip as s:
                self._record({"index": conv.index, "status": SKIPPED, "reason": s.reason,
                              "attempts": 0})
                continue
            todo.append(p)
        return todo

    async def main(self, todo: list[int]) -> RegenResult:
        """Send `todo` (from `pending`, inside `opened`) to the servers; seal shards as they finish."""
        cfg, events = self.cfg, self.events
        already = len(self.convs) - len(todo)
        events(StageStarted(stage=STAGE, total=len(self.convs), unit="samples", settings={
            **self.manifest.settings, "servers": self.urls, "concurrency": cfg.concurrency,
            "resumed": self.resumed, "already_finished": already, "to_send": len(todo)}))
        if self.resumed:
            events(Log(stage=STAGE, message=f"resuming: {already} of {len(self.convs)} samples "
                                            f"already finished, {len(todo)} to send"))
        # seal shards that were finished before a kill but not (or not completely) written
        for k in range(self.n_shards):
            if self._shard_finished(k) and not self._sealed_ok(k):
                self._seal(k)
        self.meter = RateMeter(total=len(self.convs), already_done=already)
        self.t_send = time.monotonic()
        self.pool = None
        if todo:
            pool = self.pool = ServerPool(self.urls, dead_after=cfg.dead_after)
            client = ChatClient(pool, self.model, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p,
                                disable_thinking=cfg.reasoning == "disable",
                                request_timeout=cfg.request_timeout, max_retries=cfg.max_retries,
                                backoff_base=cfg.backoff_base, backoff_max=cfg.backoff_max,
                                connections=cfg.concurrency + 4)
            self.client = client
            queue: asyncio.Queue[int] = asyncio.Queue()
            for p in todo:
                queue.put_nowait(p)
            syncer = asyncio.create_task(self._sync_journal())
            try:
                async with client:
                    workers = [asyncio.create_task(self._worker(queue))
                               for _ in range(min(cfg.concurrency, len(todo)))]
                    try:  # the first worker error (failure cap, all servers dead) stops the others
                        done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
                    finally:  # also on Ctrl-C: in-flight requests are dropped before the session
                        for t in workers:  # closes, so none of them is journaled as failed
                            t.cancel()
                        await asyncio.gather(*workers, return_exceptions=True)
                    error = next((t.exception() for t in done if t.exception() is not None), None)
                    if error is not None:
                        raise error
            except Exception:
                self._refresh_manifest()
                write_failures(self.out, self._failure_records())
                raise
            finally:
                syncer.cancel()
                await asyncio.gather(syncer, return_exceptions=True)
        return self._finish(self.t0)

    async def _sync_journal(self) -> None:
        """Group commit: fsync the journal off the event loop every `journal_sync_s`. Each line is
        already flushed to the OS when its sample finishes, which is what survives a kill -9."""
        while self.cfg.journal_sync_s > 0:
            await asyncio.sleep(self.cfg.journal_sync_s)
            await asyncio.to_thread(self.journal.sync)

    async def _worker(self, queue: asyncio.Queue[int]) -> None:
        cfg = self.cfg
        while True:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            conv = self.convs[p]
            self.requested += 1
            try:
                r = await replay(conv.messages, plan(conv.messages, cfg.turns), conv.index,
                                 self.seed, self.client.chat)
                entry = {"index": conv.index, "status": DONE, "messages": r.messages,
                         "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                         "completion_tokens": r.completion_tokens, "reasoning": r.reasoning,
                         "turns_regenerated": r.turns, "attempts": r.attempts}
                self.tokens_now += r.completion_tokens
            except RequestFailed as f:
                entry = {"index": conv.index, "status": FAILED, "reason": f.reason,
                         "attempts": f.attempts}
            self._record(entry)
            if entry["status"] == FAILED:
                self.events(SampleFailed(stage=STAGE, index=conv.index, reason=entry["reason"]))
            self._progress()
            k = p // cfg.shard_size
            if self._shard_finished(k):
                async with self.seal_lock:
                    sealed_now = k in self.stale or not self._sealed_ok(k)
                    self.stale.discard(k)
                    if sealed_now:
                        await asyncio.to_thread(self._write_sealed, self._seal_plan(k))
                if sealed_now:
                    self.events(ShardDone(stage=STAGE, shard=k, samples=_samples_of(self.manifest, k),
                                          path=str(self.out / shard_name(k)),
                                          shards_done=len(self.manifest.shards),
                                          shards_total=self.n_shards))
            self._check_failure_rate(final=False)

    def _progress(self) -> None:
        c = self._counts()
        finished = sum(c.values())
        dt = max(1e-9, time.monotonic() - self.t_send)
        self.events(Progress(stage=STAGE, done=finished, total=len(self.convs), unit="samples",
                             rate=self.meter.rate(finished), eta_s=self.meter.eta(finished),
                             extra={"tokens_per_s": round(self.tokens_now / dt, 2),
                                    "failed": c[FAILED], "skipped": c[SKIPPED]}))

    def _check_failure_rate(self, final: bool) -> None:
        c = self._counts()
        sent = c[DONE] + c[FAILED]
        if sent == 0 or (not final and sent < self.cfg.min_attempts_for_rate):
            return
        rate = c[FAILED] / sent
        if rate <= self.cfg.max_failure_rate:
            return
        reasons: dict[str, int] = {}
        for e in self.journal.entries.values():
            if e["status"] == FAILED:
                key = e["reason"].split(" (gave up")[0][:120]
                reasons[key] = reasons.get(key, 0) + 1
        top = max(reasons.items(), key=lambda kv: kv[1])[0]
        raise FailureLimitError(
            f"regen: {c[FAILED]} of {sent} samples failed ({rate:.1%} > --max-failure-rate "
            f"{self.cfg.max_failure_rate:.1%}); most common reason: {top}. Finished work is kept in "
            f"{self.out} (failures.jsonl lists every failure)",
            hint="fix the cause, then re-run with --resume --retry-failed")

    def _finish(self, t0: float) -> RegenResult:
        cfg = self.cfg
        for k in range(self.n_shards):  # normally all sealed already; be sure
            if k in self.stale or not self._sealed_ok(k):
                self._seal(k)
        write_failures(self.out, self._failure_records())
        c = self._counts()
        elapsed = time.monotonic() - t0
        send_dt = max(1e-9, time.monotonic() - self.t_send)
        tokens_total = sum(int(e.get("completion_tokens") or 0) for e in self.journal.entries.values())
        prompt_total = sum(int(e.get("prompt_tokens") or 0) for e in self.journal.entries.values())
        result = RegenResult(
            output_dir=str(self.out), total=len(self.convs), done=c[DONE], failed=c[FAILED],
            skipped=c[SKIPPED], bad_rows=len(self.bad_rows), shards=self.n_shards,
            tokens_generated=tokens_total, prompt_tokens=prompt_total, requested=self.requested,
            retries=getattr(getattr(self, "client", None), "retries", 0),
            elapsed_s=round(elapsed, 3),
            samples_per_s=round(self.requested / send_dt, 3) if self.requested else 0.0,
            tokens_per_s=round(self.tokens_now / send_dt, 2) if self.requested else 0.0,
            resumed=self.resumed, dead_servers=[s.url for s in self.pool.servers if s.dead]
            if self.pool else [])
        sent = c[DONE] + c[FAILED]
        over = sent > 0 and c[FAILED] / sent > cfg.max_failure_rate
        self._refresh_manifest(complete=not over, tokens_generated=tokens_total,
                               failure_limit_exceeded=over)
        self._check_failure_rate(final=True)
        self.events(StageFinished(stage=STAGE, summary=result.to_dict()))
        return result


def _samples_of(manifest, k: int) -> int:
    rec = next((s for s in manifest.shards if s["file"] == shard_name(k)), None)
    return int(rec["samples"]) if rec else 0
