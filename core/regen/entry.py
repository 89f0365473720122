"""`regenerate(cfg, events)`: replay a chat dataset against the target and write the new dataset.

Order matters (design rule 4): validate the config and the backend -> apply the output-directory
refusal rules -> load the conversations -> create or reopen the output -> (start a server) -> run.
Nothing is written and no socket is opened before the arguments are known to be good.
The output folder's writer lock is taken with it (core.locking) and given back at the end; the
disk estimate is checked before anything is written; a full disk is reported naming the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from core import disk, locking
from core.errors import OutputExistsError, SettingsMismatchError
from core.events import EventSink, Log, NullSink
from core.manifest import diff_settings, has_output, load_manifest, prepare_output_dir
from core.regen.client import AllServersDeadError
from core.regen.config import FORMAT_VERSION, RegenConfig
from core.regen.runner import STAGE, WORK_DIR, RegenResult, RegenRun


def _input_fingerprint(convs: list) -> str:
    h = hashlib.sha256()
    for c in convs:
        h.update(json.dumps([c.index, c.messages], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _keep_recorded_paths(cfg: RegenConfig, settings: dict[str, Any]) -> None:
    """Older runs recorded a local input's path among their settings. Where they also recorded the
    conversations' fingerprint (checked after loading), the same conversations at another path
    resume them; without one the path is all there is, so it must still match. A local model
    folder they recorded by its path must likewise still be at that path."""
    if not cfg.resume or not has_output(Path(cfg.output_dir)):
        return
    m = load_manifest(Path(cfg.output_dir))
    if m is None or m.kind != "regen":
        return
    recorded = m.settings.get("input")
    if recorded and settings["input"] is None:
        settings["input"] = recorded if "input_fingerprint" in m.extra else os.path.abspath(cfg.input_data)
    if isinstance(m.settings.get("model"), str) and isinstance(settings["model"], dict):
        settings["model"] = os.path.abspath(cfg.model)


def _precheck_output(cfg: RegenConfig, settings: dict[str, Any]) -> None:
    """The refusal rules, checked before the (possibly slow) input load."""
    d = Path(cfg.output_dir)
    who = locking.holder(d)  # a second writer is told now, not after loading the input
    if who is not None and not locking.is_held(d):
        raise locking.FolderLockedError(str(d), who)
    if not has_output(d):
        return
    if not cfg.resume:
        raise OutputExistsError(f"{d} already holds earlier output",
                                hint="pass --resume to continue it, or choose an empty directory")
    m = load_manifest(d)
    if m is not None and m.kind == "regen":
        diff = diff_settings(m.settings, settings)
        if diff:
            raise SettingsMismatchError(str(d), diff)


BYTES_PER_TOKEN = 4  # UTF-8 bytes of an answer token, about (English text)


def disk_estimate(convs: list, cfg: RegenConfig) -> int:
    """Upper bound on the bytes a regeneration writes: per sample its journal line (conversation
    + answers of max_new_tokens) and its shard row (conversation twice + answers, zstd halves
    text at least)."""
    total = 0
    for c in convs:
        text = sum(len(str(m.get("content") or "").encode()) + 32 for m in c.messages)
        turns = 1 if cfg.turns == "last" else max(1, sum(m.get("role") == "assistant" for m in c.messages))
        answer = cfg.max_new_tokens * BYTES_PER_TOKEN * turns
        total += (text + answer + 256) + (2 * text + answer) // 2
    return total


def regenerate(cfg: RegenConfig, events: EventSink | None = None) -> RegenResult:
    """The one public entry of the regen stage (see the module docstring)."""
    had_lock = locking.is_held(cfg.output_dir)
    try:
        with disk.raising_disk_full(cfg.output_dir):
            return _regenerate(cfg, events)
    finally:
        if not had_lock:
            locking.release(cfg.output_dir)


def _regenerate(cfg: RegenConfig, events: EventSink | None) -> RegenResult:
    events = events or NullSink()
    cfg.validate()
    if cfg.launch:
        from core.target_server import check_backend_installed

        check_backend_installed(cfg.launch)  # exit 2 with an install hint, before any work
    settings = cfg.content_settings()
    _keep_recorded_paths(cfg, settings)
    _precheck_output(cfg, settings)

    from core.data import DataSpec, load_conversations  # lazy: pulls in datasets/pyarrow

    source = cfg.input_data
    if source == "demo":
        from core.assets import demo_dataset

        source = str(demo_dataset(events=events))
    spec = DataSpec(source=source, split=cfg.split, messages_column=cfg.messages_column,
                    shuffle_seed=cfg.shuffle_seed, limit=cfg.limit, strict=cfg.strict,
                    exclude=cfg.exclude)
    convs, report = load_conversations(spec, events=events)
    fingerprint = _input_fingerprint(convs)
    disk.check_free(cfg.output_dir, disk_estimate(convs, cfg) - disk.bytes_under(cfg.output_dir),
                    f"regenerating {len(convs)} samples (answers of up to {cfg.max_new_tokens} tokens)")
    manifest, resumed = prepare_output_dir(cfg.output_dir, "regen", FORMAT_VERSION, settings,
                                           cfg.resume)
    old = manifest.extra.get("input_fingerprint")
    if resumed and old is not None and old != fingerprint:
        raise SettingsMismatchError(cfg.output_dir, {"input content": (old, fingerprint)})
    manifest.extra.update(input_fingerprint=fingerprint, input_path=source, total=len(convs))
    manifest.save(cfg.output_dir)

    with contextlib.ExitStack() as stack:
        urls, model, server = cfg.server_urls(), cfg.model, None
        if model == "demo":  # the embedded SmolLM2; `transformers serve` pins it by its path
            from core.assets import demo_target

            model = str(demo_target(events=events))
        run = RegenRun(cfg, events, convs, report, manifest, resumed, urls, model)
        try:
            with run.opened():
                todo = run.pending()
                if cfg.launch and todo:  # a server only when there is something to send to it
                    from core.target_server import start_target_server

                    events(Log(stage=STAGE, message=f"starting a {cfg.launch} server for {model}"))
                    server = stack.enter_context(start_target_server(
                        cfg.launch, model, extra_args=cfg.launch_args, device=cfg.launch_device,
                        ready_timeout=cfg.launch_ready_timeout,
                        log_path=Path(cfg.output_dir) / WORK_DIR / f"{cfg.launch}-server.log"))
                    events(Log(stage=STAGE, message=f"target server ready at {server.url}"))
                    run.urls, run.model = [server.url], server.model_name
                    if cfg.temperature > 0 and cfg.seed is not None and not server.seeds_requests:
                        run.seed = None
                        events(Log(stage=STAGE, message=(
                            f"{cfg.launch} on CPU cannot seed single requests (its engine dies on them), "
                            f"so these answers, sampled at temperature {cfg.temperature:g}, are not "
                            f"reproducible per sample")))
                return asyncio.run(run.main(todo))
        except AllServersDeadError:
            if server is not None:  # say why: the server's own words (a crashing one may still be shutting down)
                from core.target_server import TargetServerError

                state = "died" if server.wait_exit(10) else "stopped answering"
                cause = server.root_cause()
                raise TargetServerError(
                    f"the {cfg.launch} server we started {state} during the run"
                    + (f" ({cause})" if cause else "")
                    + f"; log {server.log_path} ends with:\n{server.log_tail()}",
                    hint="fix the cause, then re-run with --resume") from None
            raise
