"""`train(cfg, events) -> TrainResult`: the EAGLE-3 draft training loop (one entry for the stage).

Per optimizer step: each process takes its `grad_accum` packed micro-batches (core.train.data),
computes the TTT loss of core.model.ttt (online: the frozen target runs first), backpropagates
loss / grad_accum (DDP syncs gradients on the last micro-batch), clips, steps AdamW with the
cosine-with-warmup learning rate, and logs metrics averaged over processes. Validation runs at
step 0, every `eval_every` steps and at the end; checkpoints every `save_every` steps and at the end.

Exact resume: weights, AdamW state, the schedule position, RNG states and the data position (a
pure function of the step) come back from the latest checkpoint, and the CPU path runs with
deterministic algorithms, so an interrupted run ends with the same weights as an uninterrupted one.
SIGINT / SIGTERM (core.train.interrupt) finish the current step, save it and raise KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.events import (CheckpointSaved, EventSink, Log, NullSink, Progress, StageFinished,
                         StageStarted)
from core.manifest import read_json
from core.train import checkpoint as ckpt
from core.train import distributed as D
from core.train.interrupt import StopSignals
from core.train.config import TRAIN_FORMAT_VERSION, TrainConfig
from core.train.cpualloc import keep_freed_memory
from core.train.data import BatchPlan, OfflineSource, OnlineSource, prefetch_loader, to_device
from core.train.overlap import OverlappedBatches, overlap_wanted
from core.train.inputs import STAGE, build_draft, check_fingerprint, load_offline, load_online
from core.train.metrics import MetricAccumulator, MetricsLog

PREFIX = "draft."  # parameter names under the LossModule root (FSDP state dicts)


@dataclass
class TrainResult:
    run_dir: str
    steps: int  # optimizer steps done in total
    resumed_from: int | None
    checkpoint: str | None
    tokens: int  # tokens trained on by this invocation (all processes)
    seconds: float
    tokens_per_s: float | None
    train_metrics: dict[str, float] = field(default_factory=dict)  # last step
    val_first: dict[str, float] = field(default_factory=dict)  # first validation of this invocation
    val_last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)  # held-out τ of the `best` checkpoint

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The StageFinished summary (also what `eagle train` prints)."""
        return {"run_dir": self.run_dir, "steps": self.steps, "checkpoint": self.checkpoint,
                "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "tokens_per_s": self.tokens_per_s, "train_loss": self.train_metrics.get("loss"),
                "val_acc_0_first": self.val_first.get("acc_0"), "val_acc_0": self.val_last.get("acc_0"),
                "val_tau_sim": self.val_last.get("tau_sim"), "resumed_from": self.resumed_from,
                "best_step": self.best.get("step"), "best_heldout_tau": self.best.get("tau")}


class LossModule(torch.nn.Module):
    """Root module for DDP / FSDP: forward(batch) = the TTT loss of the draft."""

    def __init__(self, draft: torch.nn.Module, ttt_length: int, decay: float, attention: str,
                 feature_noise: float = 0.0):
        super().__init__()
        self.draft = draft
        self.ttt_length, self.decay, self.attention = ttt_length, decay, attention
        self.feature_noise = feature_noise
        self.noise_seed: int | None = None  # set per micro-batch by the loop: resumes draw the same noise

    def forward(self, batch: dict[str, torch.Tensor]):
        from core.model.ttt import ttt_forward_loss

        if self.feature_noise > 0 and self.draft.training and self.noise_seed is not None:
            batch = {**batch, "aux_hidden": noisy_features(batch["aux_hidden"], self.feature_noise,
                                                           len(self.draft.config.aux_layer_ids),
                                                           self.noise_seed)}
        return ttt_forward_loss(self.draft, batch, ttt_length=self.ttt_length, decay=self.decay,
                                attention_backend=self.attention)


def noisy_features(aux: torch.Tensor, scale: float, num_layers: int, seed: int) -> torch.Tensor:
    """aux + N(0, (scale * RMS)^2), the RMS taken per token and per aux layer (their scales differ
    by orders of magnitude); the noise comes from `seed` alone, so a resumed run draws it again."""
    gen = torch.Generator(device=aux.device).manual_seed(seed)
    parts = aux.float().unflatten(-1, (num_layers, -1))
    rms = parts.pow(2).mean(-1, keepdim=True).sqrt()
    noise = torch.randn(parts.shape, generator=gen, device=aux.device) * rms * scale
    return (parts + noise).flatten(-2).to(aux.dtype)


ADAMW_ENV = "EAGLE_CPU_ADAMW"


def adamw_impl(device: torch.device, fsdp: bool = False) -> dict[str, bool]:
    """AdamW's implementation: CUDA foreach; CPU the fused kernel (one pass per tensor: about 15x
    faster than the per-parameter loop on the 2-core CPU, equal to it within float32 rounding, 1e-8 on
    the weights, a test holds training losses equal). EAGLE_CPU_ADAMW=foreach (bit-identical to the
    loop) or =loop picks another on CPU; FSDP on CPU keeps foreach (its sharded parameters)."""
    import os

    if device.type == "cuda":
        return {"foreach": True}
    choice = os.environ.get(ADAMW_ENV, "").strip().lower() or ("foreach" if fsdp else "fused")
    return {"fused": {"fused": True}, "foreach": {"foreach": True}}.get(choice, {"foreach": False})


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: TrainConfig, events: EventSink | None = None) -> TrainResult:
    """Train (or resume) an EAGLE-3 draft per `cfg`; only rank 0 emits events and writes files.

    SIGINT / SIGTERM: the current optimizer step finishes and is checkpointed, then
    KeyboardInterrupt is raised (exit code 130); `resume=True` continues from that step.
    """
    cfg.validate()
    env = D.init_distributed(cfg.device)
    prev_det = torch.are_deterministic_algorithms_enabled()
    try:
        with StopSignals() as stop:
            if env.device.type == "cpu":
                torch.use_deterministic_algorithms(True, warn_only=True)
                keep_freed_memory()  # no page faults on every step's large tensors (core.train.cpualloc)
            sink = events if env.is_main and events is not None else NullSink()
            result = _Trainer(cfg, env, sink, stop).run()
        if stop.requested:  # during the last step or after it: the run is complete, but the
            sink(Log(stage=STAGE, level="warning",  # caller (e.g. the pipeline) must stop too
                     message=f"interrupted by {stop.name} as the run finished (step {result.steps})"))
            raise KeyboardInterrupt
        return result
    finally:
        torch.use_deterministic_algorithms(prev_det)
        D.shutdown(env)


class _Trainer:
    def __init__(self, cfg: TrainConfig, env: D.DistEnv, events: EventSink, stop: StopSignals):
        self.cfg, self.env, self.events, self.stop = cfg, env, events, stop
        self.run_dir = cfg.run_dir
        from core.model.attention import resolve_backend

        self.attention = resolve_backend(cfg.attention, env.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda"
                         else contextlib.nullcontext())

    # ---- setup --------------------------------------------------------------------------------
    def _prepare_dir(self):
        from core.manifest import has_output, load_manifest, prepare_output_dir

        m = load_manifest(self.run_dir) if self.cfg.resume and has_output(self.run_dir) else None
        settings = self.cfg.settings(self.env.world_size, self.env.device.type, m.settings if m else None)
        return D.on_main(self.env, lambda: prepare_output_dir(
            self.run_dir, "train", TRAIN_FORMAT_VERSION, settings, self.cfg.resume))

    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        self.manifest, resumed = self._prepare_dir()
        latest = ckpt.latest_checkpoint(self.run_dir) if resumed else None
        if cfg.online:
            self.inputs, new_vocab = load_online(cfg, self.run_dir, resumed, env.device, self.events)
        else:
            self.inputs, new_vocab = load_offline(cfg, self.events), True
        if resumed:
            check_fingerprint(self.run_dir, self.manifest.extra.get("data_fingerprint"),
                              self.inputs.data_fingerprint)
        self.draft = build_draft(cfg, self.inputs).to(env.device)
        self.draft_config = self.draft.config.to_dict()
        if env.is_main:
            self._write_run_files(new_vocab or not resumed)
        D.barrier(env)

        ga, ws, rank = cfg.grad_accum, env.world_size, env.rank
        self.plan = BatchPlan(self.inputs.train.lengths, cfg.max_tokens_per_batch, cfg.seed, ws, rank, ga)
        self.plan.check_not_empty("training")
        self.val_plan = None
        if self.inputs.val is not None:
            self.val_plan = BatchPlan(self.inputs.val.lengths, cfg.max_tokens_per_batch, cfg.seed,
                                      ws, rank, 1, shuffle=False)
        self.total = cfg.max_steps or self.plan.total_steps(cfg.epochs)
        self.warmup = math.ceil(cfg.warmup_ratio * self.total)
        self.events(StageStarted(stage=STAGE, total=self.total, unit="steps", settings={
            "output_dir": str(self.run_dir), "mode": "online" if cfg.online else "offline",
            "resumed_from": latest.name if latest is not None else None,
            "world_size": env.world_size, "device": str(env.device), "attention": self.attention,
            "train_samples": len(self.inputs.train),
            "val_samples": len(self.inputs.val) if self.inputs.val is not None else 0,
            "draft_vocab_size": self.inputs.vocab.draft_vocab_size,
            "vocab_coverage": round(self.inputs.vocab.coverage, 4)}))

        self.module = LossModule(self.draft, cfg.ttt_length, cfg.decay, self.attention, cfg.feature_noise)
        self.root = D.wrap(self.module, env, cfg.fsdp, list(self.draft.decoder_layers()))
        self.params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optim = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas),
                                       weight_decay=cfg.weight_decay, eps=1e-8,
                                       **adamw_impl(env.device, cfg.fsdp))
        self.start_step = 0
        self.resumed_from = None
        if latest is not None:
            self._restore(latest)
        elif env.is_main:
            ckpt.truncate_metrics(self.run_dir, -1)  # a restart before the first checkpoint
        self.log = MetricsLog(self.run_dir, cfg.tensorboard and env.is_main, self.events) \
            if env.is_main else None
        self.selector = None
        if cfg.select_data and env.is_main:
            from core.train.select import HeldOutTau

            self.selector = HeldOutTau(Path(self.inputs.target), cfg.select_data, cfg.select_prompts,
                                       cfg.select_draft_tokens, cfg.select_max_new_tokens,
                                       cfg.select_seconds, env.device, self.events)
        best = self.run_dir / ckpt.BEST_INFO
        self.best = read_json(best) if resumed and best.is_file() else {}

    def _write_run_files(self, write_vocab: bool) -> None:
        from core.data.identity import TRAINED_ON, write_prompt_list

        if write_vocab:
            self.inputs.vocab.save(self.run_dir / ckpt.VOCAB_DIR)
        if self.inputs.prompts is not None:  # eval refuses prompts this run trained on
            write_prompt_list(self.run_dir / TRAINED_ON, self.inputs.prompts)
        if not (self.run_dir / ckpt.EMBED_FILE).exists():
            ckpt.write_run_embeddings(self.run_dir, self.draft.embed_tokens.weight)
        self.manifest.extra.update({
            "draft_config": self.draft_config, "aux_layer_ids": list(self.inputs.aux_layer_ids),
            "target": str(Path(self.inputs.target).resolve()), "vocab_dir": ckpt.VOCAB_DIR,
            "embed_file": ckpt.EMBED_FILE, "data_fingerprint": self.inputs.data_fingerprint,
            "vocab_coverage": self.inputs.vocab.coverage,
            "draft_vocab_size": self.inputs.vocab.draft_vocab_size, **self.inputs.extra})
        self.manifest.save(self.run_dir)

    def _restore(self, step_dir: Path) -> None:
        cfg, env = self.cfg, self.env
        ck = ckpt.load_checkpoint(step_dir)
        if ck.draft_config != self.draft_config:
            from core.errors import SettingsMismatchError
            from core.manifest import diff_settings

            raise SettingsMismatchError(str(step_dir), {f"draft_config.{k}": v for k, v in
                                                        diff_settings(ck.draft_config, self.draft_config).items()})
        D.load_model_state(self.root, self.draft, ck.draft_state, cfg.fsdp, PREFIX)
        D.load_optim_state(self.root, self.draft, self.optim, ck.optim_state, cfg.fsdp, PREFIX)
        rng = ck.state.get("rng", [])
        if len(rng) == env.world_size:
            ckpt.restore_rng_state(rng[env.rank])
        self.start_step = ck.step
        self.resumed_from = ck.step
        if env.is_main:
            ckpt.truncate_metrics(self.run_dir, ck.step)
        self.events(Log(stage=STAGE, message=f"resumed from {step_dir} (step {ck.step}, "
                                             f"epoch {ck.state.get('epoch')})"))

    # ---- steps --------------------------------------------------------------------------------
    def _train_step(self, step: int) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        plan = self.plan.step(step)
        lr = lr_at(step, cfg.lr, self.warmup, self.total)
        for g in self.optim.param_groups:
            g["lr"] = lr
        acc = MetricAccumulator(cfg.ttt_length)
        self.draft.train()
        n = len(plan.micro_batches)
        for j, mb in enumerate(plan.micro_batches):
            if self.prefetch is not None:  # the same micro-batch `mb`, read ahead by worker processes
                batch = to_device(next(self.prefetch), env.device)
            elif self.overlap is not None:  # the same micro-batch, its target forward run ahead
                batch = self.overlap.get(step, j, mb)
            else:
                batch = self.inputs.train.batch(mb, env.device)
            self.module.noise_seed = ((cfg.seed * 1_000_003 + step) * 1009 + j) * 131 + env.rank
            with D.no_sync(self.root, j == n - 1), self.autocast:
                out = self.root(batch)
                (out.loss / n).backward()
            acc.add(out)
        grad_norm = D.clip_and_norm(self.params, cfg.grad_clip)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        m = acc.reduce(self.env)
        m.update(lr=lr, grad_norm=grad_norm, epoch=float(plan.epoch))
        return m

    @torch.no_grad()
    def _validate(self) -> dict[str, float] | None:
        if self.val_plan is None:
            return None
        if getattr(self, "overlap", None) is not None:
            self.overlap.drain()  # the validation source shares the target (and its hooks)
        env = self.env
        micro = self.val_plan.epoch_micro_batches(0)
        need = math.ceil(len(micro) / env.world_size)
        mine = micro[env.rank::env.world_size]
        acc = MetricAccumulator(self.cfg.ttt_length)
        self.draft.eval()
        for k in range(need):  # equal forward counts on every rank (FSDP); extras weigh 0
            mb, weight = (mine[k], 1.0) if k < len(mine) else (micro[0], 0.0)
            with self.autocast:
                out = self.root(self.inputs.val.batch(mb, env.device))
            acc.add(out, weight)
        return acc.reduce(env)

    def _save(self, step: int) -> Path | None:
        with self.stop.saving():  # a further signal must not abandon the checkpoint half-way
            return self._save_checkpoint(step)

    def _save_checkpoint(self, step: int) -> Path | None:
        cfg, env = self.cfg, self.env
        model_sd = D.full_model_state(self.root, self.draft, cfg.fsdp, PREFIX)
        optim_sd = D.full_optim_state(self.root, self.draft, self.optim, cfg.fsdp, PREFIX)
        rngs = D.all_gather_objects(env, ckpt.capture_rng_state())
        path = None
        if env.is_main:
            e, k = self.plan.locate(step)
            state = {"epoch": e, "step_in_epoch": k, "data_position": {"epoch": e, "step_in_epoch": k,
                     "micro_batches_per_step": self.plan.group}, "rng": rngs, "world_size": env.world_size,
                     "scheduler": {"kind": "cosine", "base_lr": cfg.lr, "warmup_steps": self.warmup,
                                   "total_steps": self.total, "next_step": step},
                     "target": str(Path(self.inputs.target).resolve()), "time": time.time()}
            path = ckpt.save_checkpoint(self.run_dir, step, model_sd, optim_sd, state,
                                        self.draft_config, cfg.keep_last)
            self.events(CheckpointSaved(stage=STAGE, step=step, path=str(path)))
        D.barrier(env)
        return path

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t_start = time.monotonic()
        self._setup()
        val_first = val_last = None
        if self.start_step == 0:
            val_first = val_last = self._log_val(0)
        self.stop.deferred = True  # from here on a signal stops at the next step boundary
        self.prefetch = None
        if self.env.device.type == "cuda" and isinstance(self.inputs.train, OfflineSource):
            # cache reads, fp8 dequantisation and collation off the training process, pinned memory;
            # online sources run the target in-process, and on CPU workers would only steal cores
            self.prefetch = iter(prefetch_loader(self.inputs.train, self.plan, self.start_step, self.total,
                                                 workers=2, pin_memory=True))
        self.overlap = None
        if isinstance(self.inputs.train, OnlineSource) and overlap_wanted(self.env.device):
            # the target forward of the next micro-batch runs while the draft trains on this one
            self.overlap = OverlappedBatches(self.inputs.train, self.plan, self.start_step, self.total,
                                             self.env.device)
        try:
            return self._steps(t_start, val_first, val_last)
        finally:
            if self.overlap is not None:
                self.overlap.close()

    def _steps(self, t_start: float, val_first, val_last) -> TrainResult:
        cfg = self.cfg
        tokens = 0
        train_time = 0.0
        m: dict[str, float] = {}
        last_ckpt = None
        for step in range(self.start_step, self.total):
            t0 = time.monotonic()
            m = self._train_step(step)
            dt = time.monotonic() - t0
            step_tokens = self.plan.tokens_in_step(step)
            tokens += step_tokens
            train_time += dt
            m.update(tokens=float(step_tokens), tokens_per_s=step_tokens / dt if dt > 0 else 0.0,
                     step_seconds=dt)
            done = step + 1
            if self.log is not None and (done % cfg.log_every == 0 or done == self.total):
                self.log.write(done, "train", m)
            self.events(Progress(stage=STAGE, done=done, total=self.total, unit="steps",
                                 rate=(done - self.start_step) / max(1e-9, time.monotonic() - t_start),
                                 extra={"tokens_per_s": m["tokens_per_s"], "loss": m["loss"]}))
            last = done == self.total
            if not last and self.stop.agreed(self.env.distributed, self.env.device):
                self._stop_at(done)  # every process agrees on `done`: none waits on another
            v = None
            if done % cfg.resolved_eval_every() == 0 or last:
                v = self._log_val(done)
                val_first = val_first or v
                val_last = v or val_last
            if done % cfg.save_every == 0 or last:
                last_ckpt = self._save(done)
                self._select(done, last_ckpt, v)
        if self.start_step >= self.total:
            self.events(Log(stage=STAGE, message=f"nothing to do: the run is at step {self.start_step} "
                                                 f"of {self.total}"))
        seconds = time.monotonic() - t_start
        tps = tokens / train_time if train_time > 0 else None
        latest = ckpt.latest_checkpoint(self.run_dir)
        result = TrainResult(run_dir=str(self.run_dir), steps=max(self.total, self.start_step),
                             resumed_from=self.resumed_from,
                             checkpoint=str(last_ckpt or latest) if (last_ckpt or latest) else None,
                             tokens=tokens, seconds=seconds, tokens_per_s=tps, train_metrics=m,
                             val_first=val_first or {}, val_last=val_last or {}, best=self.best)
        if self.env.is_main:
            self.manifest.complete = True
            self.manifest.extra["result"] = {k: v for k, v in result.to_dict().items()
                                             if k not in ("train_metrics",)}
            self.manifest.save(self.run_dir)
            self.log.close()
        self.events(StageFinished(stage=STAGE, summary=result.summary()))
        return result

    def _stop_at(self, step: int) -> None:
        """Checkpoint the finished step `step` (no validation: stop soon) and end the run."""
        path = self._save(step)
        if self.log is not None:
            self.log.close()
        why = self.stop.name or "a signal to another process"
        self.events(Log(stage=STAGE, level="warning", message=(
            f"interrupted by {why}: stopped after step {step} of {self.total}, saved {path}; "
            f"continue with --resume")))
        raise KeyboardInterrupt

    def _select(self, step: int, path: Path | None, val: dict[str, float] | None) -> None:
        """Held-out real τ of the checkpoint just saved; `best` follows the highest (rank 0)."""
        if self.selector is not None and path is not None:
            m = self.selector.measure(path)
            if self.log is not None:
                self.log.write(step, "heldout", m)
            loss = (val or {}).get("loss")
            if ckpt.beats_best(self.best, m["tau"], loss):
                self.best = {"step": step, "tau": m["tau"], "prompts": m["prompts"]}
                if loss is not None:
                    self.best["val_loss"] = loss
                ckpt.mark_best(self.run_dir, step, self.best)
                ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_last)
        D.barrier(self.env)

    def _log_val(self, step: int) -> dict[str, float] | None:
        v = self._validate()
        if v is not None and self.log is not None:
            self.log.write(step, "val", v)
        return v
