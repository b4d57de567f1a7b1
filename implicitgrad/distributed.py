r"""Data-parallel inner problems over ``torch.distributed``.

When the data of an inner problem is split over processes ("ranks"), the global objective
is a sum of per-rank contributions,

.. math::

    F(x, \theta) = \sum_{r=0}^{W-1} f_r(x, \theta) + R(x, \theta),

with :math:`f_r` the part of rank :math:`r`'s shard and :math:`R` an optional term (a
regulariser) that every rank computes identically. The variable :math:`x` and the
hyperparameters :math:`\theta` are *replicated*: the same values on every rank. Two autograd
operations, each the adjoint of the other, make every derivative of ``F`` global:

* :func:`sum_over_ranks` (forward: all-reduce; backward: identity) turns a rank's partial
  value into the global one;
* :func:`replicate` (forward: identity; backward: all-reduce) marks a replicated tensor used
  by a rank's partial computation, so that its gradient is the sum of the ranks' partial
  gradients.

Both are differentiable again (the backward of each is the other), so the gradient
:math:`\nabla_x F`, every Hessian-vector product :math:`\nabla^2_x F\,u` and the final
vector-Jacobian product :math:`(\partial_\theta \nabla_x F)^\top u` of
:func:`~implicitgrad.implicit_solve` come out global and bitwise identical on every rank:
the inner solver's iterates, the conjugate-gradient iterates, the forward check, the
:class:`~implicitgrad.SolveInfo` figures and the hypergradient are then the same everywhere.
:func:`all_reduce_objective` wires the two around a rank's objective.

Why not ``torch.distributed.nn.functional.all_reduce`` alone: its backward all-reduces the
incoming gradient, which is right when every rank's *copy* of the inputs is a separate
variable and the loss is the sum of all the ranks' losses. Here the inputs are one
replicated variable and the loss is computed once, replicated: with that operation the
gradient on rank ``r`` would be :math:`W\,\nabla f_r` — a local gradient, scaled by the
number of ranks — instead of :math:`\sum_r \nabla f_r`.

Without an initialised process group (or with one process) every function here is the
identity, so the same script runs on one process unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ._tree import is_float_tensor, tree_flatten, tree_unflatten
from .meta.distributed import is_distributed

__all__ = ["all_reduce_objective", "count_all_reduces", "replicate", "shard", "sum_over_ranks"]


def _world(group: Any) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def _all_reduce_flat(tensors: Sequence[torch.Tensor], group: Any, op: Any = None) -> List[torch.Tensor]:
    """Sum (or ``op``) over ranks of every tensor, one ``all_reduce`` per dtype and device."""
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    buckets: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    for index in buckets.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in index])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if op is None else op, group=group)
        start = 0
        for i in index:
            n = tensors[i].numel()
            out[i] = flat[start:start + n].view_as(tensors[i])
            start += n
    return [t for t in out if t is not None]


class _SumOverRanks(torch.autograd.Function):
    """Forward: sum over ranks; backward: the gradient passes unchanged (see module docstring)."""

    @staticmethod
    def forward(group: Any, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(_all_reduce_flat(tensors, group))

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Tuple[Any, ...]:
        return (None, *_Replicate.apply(ctx.group, *grads))

    @staticmethod
    def vmap(info: Any, in_dims: Tuple[Any, ...], group: Any, *tensors: torch.Tensor) -> Any:
        # The sum is elementwise: reducing the whole batched tensor reduces every slice.
        return _SumOverRanks.apply(group, *tensors), tuple(in_dims[1:])


class _Replicate(torch.autograd.Function):
    """Forward: identity; backward: sum over ranks of the gradients that are needed."""

    @staticmethod
    def forward(group: Any, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Tuple[Any, ...]:
        needed = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
        out: List[Optional[torch.Tensor]] = [None] * len(grads)
        if needed:
            summed = _SumOverRanks.apply(ctx.group, *[grads[i] for i in needed])
            for i, g in zip(needed, summed):
                out[i] = g
        return (None, *out)

    @staticmethod
    def vmap(info: Any, in_dims: Tuple[Any, ...], group: Any, *tensors: torch.Tensor) -> Any:
        return _Replicate.apply(group, *tensors), tuple(in_dims[1:])


def _map_float_leaves(tree: Any, fn: Callable[[List[torch.Tensor]], Sequence[torch.Tensor]]) -> Any:
    """``tree`` with its floating tensor leaves replaced by ``fn(leaves)`` (one call for all)."""
    leaves, spec = tree_flatten(tree)
    index = [i for i, t in enumerate(leaves) if is_float_tensor(t)]
    if not index:
        return tree
    new = fn([leaves[i] for i in index])
    leaves = list(leaves)
    for i, t in zip(index, new):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


def sum_over_ranks(tree: Any, group: Any = None) -> Any:
    r"""Sum over the ranks of ``group`` of every floating tensor leaf; the gradient passes through.

    For a partial value :math:`v_r` on rank :math:`r` returns :math:`\sum_r v_r` on every
    rank (bitwise identical), by one ``all_reduce`` per dtype and device for all the leaves
    together. Its derivative treats the result as one replicated value: the incoming
    gradient is handed to each rank's :math:`v_r` unchanged (the adjoint of
    :func:`replicate`). The identity without a process group.

    Args:
        tree: a Tensor or a pytree of Tensors; non-floating leaves pass through unchanged
            (use ``.double()`` to sum integer counts).
        group: the process group; ``None`` is the default group.

    Returns:
        ``tree`` with its floating leaves summed over ranks.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.distributed.sum_over_ranks(torch.tensor([1.0, 2.0]))   # one process: unchanged
        tensor([1., 2.])
    """
    if _world(group) == 1:
        return tree
    return _map_float_leaves(tree, lambda ts: _SumOverRanks.apply(group, *ts))


def replicate(tree: Any, group: Any = None) -> Any:
    r"""Mark replicated tensors (equal on every rank) used by a rank's partial computation.

    The identity in the forward pass. In the backward pass the gradient of every floating
    leaf is summed over ranks, so that with :math:`y = \sum_r f_r(x)` computed as
    ``sum_over_ranks(f_r(replicate(x)))``, every rank receives
    :math:`\nabla_x y = \sum_r \nabla f_r(x)`. All the leaves share one ``all_reduce`` per
    dtype and device. The identity without a process group.

    Args:
        tree: a Tensor or a pytree of Tensors, identical on every rank.
        group: the process group; ``None`` is the default group.

    Returns:
        ``tree``, with the floating leaves attached to the all-reducing backward.

    Example:
        >>> import torch, implicitgrad as ig
        >>> w = torch.ones(2, requires_grad=True)
        >>> ig.distributed.replicate(w).sum().backward(); w.grad   # one process: plain gradient
        tensor([1., 1.])
    """
    if _world(group) == 1:
        return tree
    return _map_float_leaves(tree, lambda ts: _Replicate.apply(group, *ts))


def _check_replicated(named: Sequence[Tuple[str, Any]], group: Any) -> None:
    """Raise if a leaf declared replicated differs between ranks (one small ``all_reduce``).

    Compares per leaf its number of elements, sum and sum of squares (float64), by a
    maximum over ranks of ``(s, −s)``: the leaf is equal everywhere when max = −max(−s).
    """
    labels: List[str] = []
    stats: List[torch.Tensor] = []
    for name, tree in named:
        leaves = tree_flatten(tree)[0]
        for j, t in enumerate(leaves):
            if is_float_tensor(t):
                d = t.detach().double()
                labels.append(f"{name} (leaf {j}, shape {tuple(t.shape)})")
                stats.append(torch.stack([torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device),
                                          d.sum(), d.square().sum()]))
    if not stats:
        return
    s = torch.stack(stats).cpu() if dist.get_backend(group) == "gloo" else torch.stack(stats)
    both = torch.cat([s, -s])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(s)], -both[len(s):]
    differ = [label for label, h, lo in zip(labels, high, low) if not torch.equal(h, lo)]
    if differ:
        raise ValueError(
            "all_reduce_objective: these arguments are declared replicated but differ between "
            f"ranks: {', '.join(differ)}. Give every rank the same x0 and hyperparameters (same "
            "seed, or broadcast them from rank 0); pass the positions of per-rank data in "
            "sharded=... so that their gradients stay local."
        )


def all_reduce_objective(
    shard_objective: Callable[..., torch.Tensor],
    regularizer: Optional[Callable[..., torch.Tensor]] = None,
    *,
    sharded: Sequence[int] = (),
    group: Any = None,
    check_replicated: bool = True,
) -> Callable[..., torch.Tensor]:
    r"""The global objective of a problem whose data is split over ranks.

    Returns ``objective(x, *params)`` computing, on every rank,

    .. math::

        F(x, \theta) = \sum_{r} f_r(x, \theta) + R(x, \theta),

    where ``shard_objective(x, *params)`` is :math:`f_r`, this rank's contribution, and
    ``regularizer(x, *params)`` is :math:`R`, computed identically on every rank and
    counted once. The value, the gradient in ``x``, every Hessian-vector product and the
    vector-Jacobian products in the replicated parameters are global (see the module
    docstring), so ``ig.implicit_solve(objective, x0, *params, ...)`` returns, on every
    rank, the solution, :class:`~implicitgrad.SolveInfo` and hypergradient of the whole
    data.

    **Normalisation.** :math:`F` is a *sum* over ranks. For a global mean over :math:`N`
    examples, :math:`\frac1N\sum_i \ell_i`, rank :math:`r` returns
    :math:`\frac1N\sum_{i \in \text{shard}_r} \ell_i` with :math:`N` the *global* count
    (``sum_over_ranks(torch.tensor(n_r, dtype=...))``), not the shard's mean: the mean of
    the shard means is the global mean only when the shards have equal sizes. A penalty
    belongs in ``regularizer``; written into ``shard_objective`` it would be counted
    :math:`W` times.

    **Communication.** Each evaluation of the value costs one ``all_reduce`` of one number;
    each gradient in ``x`` (an inner-solver step, the linearisation) or Hessian-vector
    product (one conjugate-gradient iteration) one ``all_reduce`` of ``x``'s size; the final
    vector-Jacobian product one of the size of the replicated parameters that need a
    gradient. The first call also checks (``check_replicated``) that ``x`` and the
    replicated parameters are equal on every rank: one ``all_reduce`` of 6 numbers per leaf.

    The same wrapper serves the outer loss when the validation data is split too:
    ``val = all_reduce_objective(val_shard_loss)``; ``val(x_star, theta)`` is the global
    loss and its ``backward`` gives every rank the global hypergradient.

    Args:
        shard_objective: ``f_r(x, *params) -> scalar``, this rank's part of the objective.
        regularizer: ``R(x, *params) -> scalar``, the part computed on every rank and
            counted once; ``None`` for none.
        sharded: positions in ``params`` (0 is the first argument after ``x``) of per-rank
            arguments, such as the data shard; their gradients stay local (the derivative
            of ``F`` in rank ``r``'s data is rank ``r``'s partial derivative). Every other
            argument must be equal on every rank.
        group: the process group; ``None`` is the default group.
        check_replicated: on the first call, raise ``ValueError`` if ``x`` or a replicated
            argument differs between ranks.

    Returns:
        ``objective(x, *params) -> scalar`` for :func:`~implicitgrad.implicit_solve`; the
        identity wrapper (``f_r + R``) without a process group.

    Raises:
        TypeError: ``shard_objective`` or ``regularizer`` not callable, ``sharded`` not a
            sequence of non-negative integers.
        ValueError: (first call) replicated arguments that differ between ranks, or a
            ``sharded`` position beyond the arguments given.

    Example:
        >>> import torch, implicitgrad as ig
        >>> X, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
        >>> Xr, yr = ig.distributed.shard(X), ig.distributed.shard(y)  # this rank's rows
        >>> lam = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        >>> objective = ig.distributed.all_reduce_objective(
        ...     lambda w, lam, Xr, yr: 0.5 * ((Xr @ w - yr) ** 2).sum() / len(X),
        ...     lambda w, lam, Xr, yr: 0.5 * lam * (w ** 2).sum(), sharded=(1, 2))
        >>> w = ig.implicit_solve(objective, torch.zeros(3, dtype=torch.float64), lam, Xr, yr,
        ...                       solver=ig.solvers.GradientDescent(lr=0.5, maxiter=500))
        >>> w.sum().backward()
        >>> A = X.T @ X / len(X) + 0.1 * torch.eye(3, dtype=X.dtype)
        >>> torch.allclose(lam.grad, -torch.linalg.solve(A, w.detach()).sum())
        True
    """
    if not callable(shard_objective):
        raise TypeError(f"all_reduce_objective: shard_objective must be callable, got {shard_objective!r}.")
    if regularizer is not None and not callable(regularizer):
        raise TypeError(f"all_reduce_objective: regularizer must be callable or None, got {regularizer!r}.")
    if isinstance(sharded, (str, bytes)) or not isinstance(sharded, Sequence) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in sharded
    ):
        raise TypeError(
            "all_reduce_objective: sharded must be a sequence of positions in params (0 is the "
            f"first argument after x), got {sharded!r}."
        )
    local = frozenset(sharded)
    state = {"checked": not check_replicated}

    def objective(x: Any, *params: Any) -> torch.Tensor:
        if max(local, default=-1) >= len(params):
            raise ValueError(
                f"all_reduce_objective: sharded={sorted(local)} names argument positions beyond "
                f"the {len(params)} params given (0 is the first argument after x)."
            )
        if _world(group) == 1:
            value = shard_objective(x, *params)
            return value if regularizer is None else value + regularizer(x, *params)
        if not state["checked"]:
            named = [("x", x)] + [(f"params[{i}]", p) for i, p in enumerate(params) if i not in local]
            _check_replicated(named, group)
            state["checked"] = True
        shared = [i for i in range(len(params)) if i not in local]
        copies = replicate(tuple(params[i] for i in shared), group)
        mixed = list(params)
        for i, p in zip(shared, copies):
            mixed[i] = p
        value = sum_over_ranks(shard_objective(replicate(x, group), *mixed), group)
        return value if regularizer is None else value + regularizer(x, *params)

    return objective


def shard(tensor: torch.Tensor, group: Any = None, rank: Optional[int] = None,
          world_size: Optional[int] = None) -> torch.Tensor:
    """This rank's contiguous block of ``tensor`` along its first dimension.

    The blocks of :func:`torch.tensor_split` into ``world_size`` parts: sizes differ by at
    most one, ranks in order cover the whole tensor. Every rank draws or loads the same full
    tensor and keeps its block — convenient for tests and examples; with data that does not
    fit one process, load only the block instead.

    Args:
        tensor: the full data, indexed by example along dimension 0.
        group: the process group; ``None`` is the default group.
        rank: this process's rank; default its rank in ``group`` (0 without a group).
        world_size: number of ranks; default the size of ``group`` (1 without a group).

    Returns:
        A view of rows ``[start, stop)`` of ``tensor``.

    Raises:
        ValueError: a rank outside ``[0, world_size)``, a 0-d tensor.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.distributed.shard(torch.arange(5), rank=1, world_size=2)
        tensor([3, 4])
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        raise ValueError("shard: tensor must be a Tensor with at least one dimension (examples along dim 0).")
    distributed = is_distributed()
    if world_size is None:
        world_size = dist.get_world_size(group) if distributed else 1
    if rank is None:
        rank = dist.get_rank(group) if distributed else 0
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"shard: world_size must be a positive integer, got {world_size!r}.")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"shard: rank must be in [0, {world_size}), got {rank!r}.")
    return torch.tensor_split(tensor, world_size)[rank]


@contextlib.contextmanager
def count_all_reduces() -> Iterator[List[Tuple[int, int]]]:
    """Record every ``torch.distributed.all_reduce`` made inside the block.

    Yields a list that receives ``(elements, bytes)`` per call, in order: the communication of
    a solve or a hypergradient, counted (a measurement tool; it wraps the function
    ``torch.distributed.all_reduce`` for the duration of the block, so it sees the calls made
    from Python — those of this module and of :mod:`implicitgrad.meta` — not the buckets that
    ``DistributedDataParallel`` reduces from C++).

    Example:
        >>> import torch, implicitgrad as ig
        >>> with ig.distributed.count_all_reduces() as calls:
        ...     _ = ig.distributed.sum_over_ranks(torch.ones(3))   # one process: no call
        >>> calls
        []
    """
    calls: List[Tuple[int, int]] = []
    original = dist.all_reduce

    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((tensor.numel(), tensor.numel() * tensor.element_size()))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield calls
    finally:
        dist.all_reduce = original
