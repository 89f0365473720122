"""torchrun support: process group, DDP (default) or FSDP wrapping, collectives, full state dicts.

`eagle train --nproc N` re-launches itself under torchrun (`python -m core.train.torchrun --standalone
--nproc-per-node N -m core.train.launch ...`); several nodes run the `torchrun` line of the CLI help.
Every process builds the same data plan and takes its own share of micro-batches (core.train.data).
Backend: NCCL on CUDA, gloo on CPU. Gradients are averaged over processes, which with the
plan's micro-batch assignment equals one process accumulating the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from core.errors import EagleError, UsageError

T = TypeVar("T")


@dataclass
class DistEnv:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # we initialised the process group (and tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available to this torch build")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Read torchrun's environment; initialise the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    owns = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistEnv(world, rank, local, device, owns)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def on_main(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and share its result; an EagleError there is raised on every rank
    (so no process waits forever at the next collective)."""
    if not env.distributed:
        return fn()
    box: list[Any] = [None]
    if env.is_main:
        try:
            box[0] = ("ok", fn())
        except EagleError as e:
            box[0] = ("err", type(e).__name__, e.message, e.hint, e.exit_code)
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "err":
        _, name, message, hint, code = box[0]
        err = EagleError(message, hint)
        err.exit_code = code
        raise err
    return box[0][1]


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---- wrapping ---------------------------------------------------------------------------------
def wrap(module: torch.nn.Module, env: DistEnv, fsdp: bool, shard_units: list[torch.nn.Module]):
    """DDP (default) or FSDP2 `fully_shard` (each decoder layer, then the root) over `module`."""
    if not env.distributed and not fsdp:
        return module
    if fsdp:
        if not env.distributed:
            raise UsageError("--fsdp needs several processes (--nproc N or torchrun)")
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # torch < 2.6
            raise UsageError("--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from e
        for unit in shard_units:
            fully_shard(unit)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def no_sync(wrapped: torch.nn.Module, last_micro_batch: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP)."""
    if last_micro_batch or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def clip_and_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` (0: no clipping) and return the total gradient norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


# ---- full (unsharded) state dicts for checkpoints ----------------------------------------------
def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def full_model_state(root: torch.nn.Module, draft: torch.nn.Module, fsdp: bool,
                     prefix: str) -> dict[str, torch.Tensor]:
    """The draft's full state dict on rank 0 (a collective under FSDP: every rank calls it)."""
    if not fsdp:
        return {k: v.detach().cpu().clone() for k, v in draft.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {_strip(k, prefix): v for k, v in sd.items()}


def full_optim_state(root: torch.nn.Module, draft: torch.nn.Module, optim: torch.optim.Optimizer,
                     fsdp: bool, prefix: str) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (not position), full, on rank 0."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(root, optim,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {_strip(k, prefix): v for k, v in osd.get("state", {}).items()}
        groups = [{**g, "params": [_strip(n, prefix) for n in g["params"]]}
                  for g in osd.get("param_groups", [])]
        return {"state": state, "param_groups": groups}
    names = _param_names(draft, optim)
    osd = optim.state_dict()
    state = {names[i]: {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                        for k, v in st.items()} for i, st in osd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_model_state(root: torch.nn.Module, draft: torch.nn.Module, state: dict[str, torch.Tensor],
                     fsdp: bool, prefix: str) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {prefix + k: v for k, v in state.items()}
        set_model_state_dict(root, full, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "embed_tokens.weight"]
    if missing or unexpected:
        raise EagleError(f"checkpoint does not match the draft (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")


def load_optim_state(root: torch.nn.Module, draft: torch.nn.Module, optim: torch.optim.Optimizer,
                     osd: dict[str, Any], fsdp: bool, prefix: str) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        full = {"state": {prefix + k: v for k, v in osd["state"].items()},
                "param_groups": [{**g, "params": [prefix + n for n in g["params"]]}
                                 for g in osd["param_groups"]]}
        set_optimizer_state_dict(root, optim, full, options=StateDictOptions(full_state_dict=True))
        return
    names = _param_names(draft, optim)
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for n in osd["state"] if n not in index]
    if unknown:
        raise EagleError(f"optimizer state names unknown parameters {unknown[:5]}")
    state = {index[n]: st for n, st in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    optim.load_state_dict({"state": state, "param_groups": groups})


def _param_names(draft: torch.nn.Module, optim: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): n for n, p in draft.named_parameters()}
    return [by_id[id(p)] for g in optim.param_groups for p in g["params"]]
