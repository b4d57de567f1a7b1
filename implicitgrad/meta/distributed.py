"""Data-parallel meta-learning over ``torch.distributed``.

Each process takes a shard of the meta-batch; :meth:`MetaLearner.meta_step` then
all-reduces the meta-gradient so that every process holds the mean over all the tasks of
all the processes. With the same initial model, optimizer and seed on every rank the
models stay identical without any parameter broadcast. Works with any backend: gloo on
CPU, NCCL on CUDA (the tensors are reduced on the device they live on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, List, Optional, Tuple, TypeVar

import torch

__all__ = ["all_reduce_mean", "is_distributed", "shard_tasks"]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and a default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shard_tasks(tasks: Sequence[T], rank: Optional[int] = None, world_size: Optional[int] = None,
                group: Any = None) -> List[T]:
    """This process's share of a meta-batch: ``tasks[rank::world_size]``.

    Shards differ in size by at most one task; :meth:`MetaLearner.meta_step` weights each
    process by its number of tasks, so the all-reduced result is the mean over the whole
    meta-batch exactly. Every process needs at least one task.

    Args:
        tasks: the whole meta-batch, drawn identically on every process (same seed).
        rank: this process's rank; default the rank in ``group`` (0 when not distributed).
        world_size: number of processes; default the size of ``group`` (1 when not
            distributed).
        group: the process group; ``None`` is the default group.

    Returns:
        The list of tasks this process handles.

    Raises:
        ValueError: a rank outside ``[0, world_size)``, or fewer tasks than processes.

    Example:
        >>> from implicitgrad.meta import shard_tasks
        >>> shard_tasks(list(range(5)), rank=1, world_size=2)
        [1, 3]
    """
    distributed = is_distributed()
    if rank is None:
        rank = torch.distributed.get_rank(group) if distributed else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size(group) if distributed else 1
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"shard_tasks: world_size must be a positive integer, got {world_size!r}.")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"shard_tasks: rank must be in [0, {world_size}), got {rank!r}.")
    if len(tasks) < world_size:
        raise ValueError(
            f"shard_tasks: {len(tasks)} tasks cannot give each of {world_size} processes one; use a "
            "meta-batch of at least as many tasks as processes."
        )
    return list(tasks[rank::world_size])


def all_reduce_mean(tensors: Sequence[torch.Tensor], loss: torch.Tensor, count: int,
                    group: Any = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Task-weighted mean over processes of per-process means; identity when not distributed.

    With process ``r`` holding means ``g_r`` over ``n_r`` tasks, returns
    ``Σ_r n_r g_r / Σ_r n_r`` for every tensor and for ``loss``, computed by one
    ``all_reduce`` of a single flat buffer.

    Args:
        tensors: this process's mean meta-gradient, one tensor per meta-parameter.
        loss: this process's mean query loss (0-d).
        count: number of tasks behind this process's means.
        group: the process group; ``None`` is the default group.

    Returns:
        ``(tensors, loss)``, averaged over all the tasks of all the processes.
    """
    if not is_distributed():
        return list(tensors), loss
    flat = torch.cat([t.detach().reshape(-1) for t in tensors] + [loss.detach().reshape(1).to(tensors[0])])
    weight = torch.tensor([float(count)], dtype=flat.dtype, device=flat.device)
    buffer = torch.cat([flat * count, weight])
    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM, group=group)
    mean = buffer[:-1] / buffer[-1]
    out, start = [], 0
    for t in tensors:
        out.append(mean[start : start + t.numel()].reshape(t.shape).to(t.dtype).clone())
        start += t.numel()
    return out, mean[-1].to(loss.dtype)
