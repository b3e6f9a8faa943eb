"""Data-parallel training over ``torch.distributed`` (started by ``torchrun``), domain-free.

``torchrun --nproc_per_node=N --no-python mtrl-arch train CONFIG ...`` starts N copies of
the CLI; :func:`init_from_env` sees torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and
joins the process group (gloo for CPU tensors, NCCL for CUDA ones, each rank on GPU
``LOCAL_RANK``). The scheme, and why it equals one process with the same global batch:

* every rank draws the same global batch (batches are a pure function of seed, epoch and
  position) and keeps its contiguous slice (:func:`shard_batch`; as
  ``DistributedSampler``, a batch that does not divide evenly is padded with its first
  examples, so every rank's loss is a mean over equally many examples and the global
  gradient is the plain mean of the ranks' gradients);
* per-task gradients of shared groups are all-reduced as rows ``[T, n]`` *before* they
  are combined (:class:`~mtrl_arch.update.GradientCombiner` calls
  :func:`all_reduce_mean`), so the conflict-noticed operation and every gradient method
  (PCGrad, CAGrad, Nash-MTL, ...) see the global per-task gradients, not a rank's; the
  combined vector is broadcast from rank 0 so methods that draw random numbers agree;
* every other gradient (task-specific modules, heads, UW's log-variances) is averaged by
  :func:`all_reduce_grads` before clipping; architecture parameters (their own
  optimisers) are averaged just before each of their optimiser steps
  (:func:`sync_other_optimizers`);
* BatchNorm running statistics are averaged before each evaluation and checkpoint
  (batch statistics in training are per rank, as DDP without SyncBatchNorm).

Multi-task SAC (``domain: rl``) uses the same gradient path with per-rank data instead of
slices of one batch: each rank steps its own environments (seeded by :func:`rank_seed`),
fills its own replay and samples its share of the batch; see ``agents/rl_loop.py``.

Nothing here runs unless :func:`active`: a single process pays nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


def _dist():
    import torch.distributed as dist

    return dist


def launched() -> bool:
    """True when started by torchrun (or any launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    if not torch.distributed.is_available():
        return False
    dist = _dist()
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def rank_from_env() -> int:
    """This process's rank as the launcher set it (0 without one), valid before and after the group."""
    return int(os.environ.get("RANK", "0"))


def init_from_env() -> bool:
    """Join the process group torchrun describes; False (and nothing done) for a single process.

    The backend serves CPU tensors with gloo and, where CUDA is visible, CUDA tensors with
    NCCL; each rank then uses GPU ``LOCAL_RANK``. ``MTRL_ARCH_DIST_TIMEOUT`` (seconds,
    default 600) bounds how long a rank waits for a peer that hangs (one that exits is
    noticed by torchrun, which stops the others).
    """
    if not launched():
        return False
    if active():
        return True
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; "
                           "start distributed runs with torchrun")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    timeout = datetime.timedelta(seconds=float(os.environ.get("MTRL_ARCH_DIST_TIMEOUT", "600")))
    _dist().init_process_group(backend, timeout=timeout)
    return True


def shutdown(wait: bool = False) -> None:
    """Close the process group. ``wait`` (a run that finished normally): first wait for every rank, since a
    rank that tears its connections down while another is still at work (rank 0's final evaluation) can
    abort in gloo's threads ("terminate called without an active exception")."""
    if torch.distributed.is_available() and _dist().is_initialized():
        if wait:
            _dist().barrier()
        _dist().destroy_process_group()


def rank_seed(seed: int) -> int:
    """This rank's seed for what must differ between ranks (environments, exploration); rank 0: ``seed``."""
    return seed + 1000 * rank()


def describe() -> str:
    return f"rank {rank()}/{world_size()}" if active() else ""


# ---- data -----------------------------------------------------------------------------------------
def shard_batch(batch: dict[str, Tensor], dim: int = 0) -> dict[str, Tensor]:
    """This rank's contiguous slice of a global batch along ``dim`` (0: ``[B, ...]``, 1: ``[T, B, ...]``).

    ``B`` is taken from the first tensor; tensors without that size at ``dim`` are kept
    whole. When ``B`` does not divide by the world size the batch is padded with its first
    examples (as ``DistributedSampler``), so every rank gets ``ceil(B / W)`` examples.
    """
    if not active():
        return batch
    W, r = world_size(), rank()
    n = next(v.shape[dim] for v in batch.values() if isinstance(v, Tensor) and v.dim() > dim)
    k = -(-n // W)
    idx = torch.arange(r * k, (r + 1) * k) % n
    out = {}
    for key, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > dim and v.shape[dim] == n:
            out[key] = v.narrow(dim, r * k, k) if (r + 1) * k <= n else v.index_select(dim, idx.to(v.device))
        else:
            out[key] = v
    return out


# ---- collectives ----------------------------------------------------------------------------------
def _groups(tensors: Sequence[Tensor]) -> Iterator[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): one flat buffer, one collective per group."""
    by: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        by.setdefault((t.device, t.dtype), []).append(i)
    yield from by.values()


def all_reduce_mean(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The mean over ranks of each tensor (new tensors; the inputs are untouched)."""
    if not active() or not tensors:
        return list(tensors)
    out: list[Tensor] = list(tensors)
    for ix in _groups(tensors):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in ix])
        _dist().all_reduce(flat)
        flat /= world_size()
        for i, part in zip(ix, flat.split([tensors[i].numel() for i in ix])):
            out[i] = part.view_as(tensors[i])
    return out


def all_reduce_grads(params: Iterable[Tensor]) -> None:
    """Replace every parameter's ``.grad`` by its mean over ranks (a missing grad counts as zero;
    a parameter without a grad on every rank keeps none, so optimisers still skip it)."""
    if not active():
        return
    ps = list({id(p): p for p in params if p.requires_grad}.values())
    for ix in _groups(ps):
        group = [ps[i] for i in ix]
        has = torch.tensor([p.grad is not None for p in group], dtype=group[0].dtype, device=group[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group] + [has])
        _dist().all_reduce(flat)
        flags = flat[-len(group):].tolist()
        grads = flat[:-len(group)].div_(world_size()).split([p.numel() for p in group])
        for p, g, f in zip(group, grads, flags):
            if f > 0:
                if p.grad is None:
                    p.grad = g.view_as(p).clone()
                else:
                    p.grad.copy_(g.view_as(p))


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values."""
    if not active() or not tensors:
        return
    for ix in _groups(tensors):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in ix])
        _dist().broadcast(flat, src)
        for i, part in zip(ix, flat.split([tensors[i].numel() for i in ix])):
            with torch.no_grad():
                tensors[i].copy_(part.view_as(tensors[i]))


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Parameters and buffers of rank ``src`` on every rank (a fresh network starts identical)."""
    broadcast_([t for t in [*module.parameters(), *module.buffers()]], src)


def average_buffers(module: nn.Module) -> None:
    """Floating-point buffers (BatchNorm running statistics) averaged over ranks, in place."""
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    for b, m in zip(bufs, all_reduce_mean(bufs)):
        b.copy_(m)


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a signal that reached one rank)."""
    if not active():
        return flag
    t = torch.tensor([int(bool(flag))], device=torch.device("cpu"))
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    _dist().broadcast_object_list(box, src, device=torch.device("cpu"))
    return box[0]


# ---- optimisers other than the weights' ----------------------------------------------------------
SYNCED = "_mtrl_grads_synced"  # attribute on an optimiser whose gradients are already global


@contextlib.contextmanager
def sync_other_optimizers() -> Iterator[None]:
    """While active, average gradients over ranks just before *every* optimiser step, except
    optimisers marked ``SYNCED`` (the weights', reduced inside the gradient combiner,
    before clipping). Covers architecture optimisers wherever a method creates them
    (CoNAL-Pro makes a new one each round) without the methods knowing about ranks."""
    if not active():
        yield
        return
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def hook(opt, args, kwargs):
        if not getattr(opt, SYNCED, False):
            all_reduce_grads(p for g in opt.param_groups for p in g["params"])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
