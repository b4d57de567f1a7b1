r"""Euclidean projections onto convex sets, as plain functions.

The projection onto a closed convex set :math:`C` is

.. math::

    P_C(x) = \arg\min_{z \in C} \tfrac12 \|z - x\|_2^2 ,

characterised by :math:`P_C(x) \in C` and :math:`\langle x - P_C(x), y - P_C(x)\rangle \le 0`
for every :math:`y \in C`. It is the prox of the indicator of :math:`C`, so these are the
steps of :class:`~implicitgrad.solvers.ProjectedGradient`.

``x`` is a Tensor or a pytree of Tensors; every tensor leaf is projected on its own.
The sets defined by a norm, a sum or an inner product act on vectors: along ``axis``
(default ``-1``: the last dimension holds the vector and the leading dimensions index
independent vectors, e.g. the rows of a matrix) or on the whole flattened leaf
(``axis=None``). Set parameters (``radius``, ``scale``, ``a``, ``b``, bounds) are numbers,
Tensors that broadcast against the leaf (with ``axis`` kept as a dimension of size 1),
or pytrees with the structure of ``x``. All functions are written with differentiable
torch operations — differentiable in ``x`` and in the set's parameters wherever the
projection is — and work under ``torch.func.vmap``.

Example:
    >>> import torch, implicitgrad as ig
    >>> ig.projections.simplex(torch.tensor([0.5, 1.0, -1.0]))
    tensor([0.2500, 0.7500, 0.0000])
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .prox import clip, map_leaves

__all__ = ["box", "halfspace", "hyperplane", "l1_ball", "l2_ball", "linf_ball", "nonnegative", "simplex"]


def _along(fn: Callable[..., torch.Tensor], t: torch.Tensor, axis: Optional[int], *args: Any) -> torch.Tensor:
    """``fn`` on vectors along the last dimension, for vectors along ``axis`` of ``t``."""
    if axis is None:
        flat = [a.reshape(1) if isinstance(a, torch.Tensor) and a.numel() == 1 else
                a.reshape(-1) if isinstance(a, torch.Tensor) and a.shape == t.shape else a for a in args]
        return fn(t.reshape(-1), *flat).reshape(t.shape)
    moved = [a.movedim(axis, -1) if isinstance(a, torch.Tensor) and a.ndim == t.ndim else a for a in args]
    return fn(t.movedim(axis, -1), *moved).movedim(-1, axis)


def _simplex_last(v: torch.Tensor, scale: Any) -> torch.Tensor:
    u = torch.sort(v, dim=-1, descending=True).values
    excess = torch.cumsum(u, dim=-1) - scale
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    # The support is the largest k with u_k > (Σ_{j≤k} u_j − scale) / k (a prefix of u).
    support = (u - excess / k > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    threshold = torch.gather(excess, -1, support - 1) / support.to(v.dtype)
    return torch.relu(v - threshold)


def simplex(x: Any, scale: Any = 1.0, axis: Optional[int] = -1) -> Any:
    r"""Projection onto the simplex :math:`\{z : z \ge 0,\ \sum_i z_i = s\}`.

    The solution is :math:`z_i = \max(x_i - \tau, 0)` with the threshold :math:`\tau` that
    makes the sum equal :math:`s`. Algorithm: sort :math:`x` in decreasing order
    :math:`u_1 \ge \dots \ge u_n`, take the support size
    :math:`\rho = \max\{k : u_k > (\sum_{j \le k} u_j - s)/k\}` and
    :math:`\tau = (\sum_{j \le \rho} u_j - s)/\rho`. O(n log n) per vector (the sort).
    On the support :math:`S` the derivative is :math:`I - \mathbf{1}\mathbf{1}^\top/|S|` in
    ``x`` and :math:`1/|S|` in ``scale``.

    Args:
        x: Tensor or pytree.
        scale: :math:`s \ge 0` (number, Tensor broadcasting with the reduced axis kept as
            size 1, or pytree like ``x``).
        axis: the dimension holding the vectors; ``None``: the whole leaf is one vector.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.projections.simplex(torch.tensor([[2.0, 0.0], [0.3, 0.3]]))
        tensor([[1.0000, 0.0000],
                [0.5000, 0.5000]])

    References:
        Held, Wolfe and Crowder, Validation of Subgradient Optimization, 1974. Duchi et
        al., Efficient Projections onto the l1-Ball for Learning in High Dimensions, 2008.
    """
    return map_leaves(lambda t, s: _along(_simplex_last, t, axis, s), x, scale)


def box(x: Any, lower: Any, upper: Any) -> Any:
    r"""Projection onto the box :math:`\{z : l \le z \le u\}`: :math:`\min(\max(x, l), u)`.

    Elementwise clipping, O(n). Differentiable in the bounds (a coordinate clipped to a
    bound moves with it).

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.projections.box(torch.tensor([-1.0, 0.5, 2.0]), 0.0, 1.0)
        tensor([0.0000, 0.5000, 1.0000])
    """
    return map_leaves(clip, x, lower, upper)


def nonnegative(x: Any) -> Any:
    r"""Projection onto the non-negative orthant: :math:`\max(x, 0)` elementwise, O(n).

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.projections.nonnegative(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    return map_leaves(torch.relu, x)


def _l1_ball_last(v: torch.Tensor, radius: Any) -> torch.Tensor:
    inside = v.abs().sum(dim=-1, keepdim=True) <= radius
    return torch.where(inside, v, torch.sign(v) * _simplex_last(v.abs(), radius))


def l1_ball(x: Any, radius: Any = 1.0, axis: Optional[int] = -1) -> Any:
    r"""Projection onto the l1 ball :math:`\{z : \|z\|_1 \le r\}`.

    A point inside is returned as is; outside, the projection is
    :math:`\operatorname{sign}(x) \odot P_{\Delta_r}(|x|)`, with :math:`P_{\Delta_r}` the
    projection onto the simplex of sum :math:`r` (:func:`simplex`). O(n log n) per vector.

    Args:
        x: Tensor or pytree.
        radius: :math:`r \ge 0`.
        axis: the dimension holding the vectors; ``None``: the whole leaf.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.projections.l1_ball(torch.tensor([2.0, -1.0]), 1.0)
        tensor([1., -0.])

    References:
        Duchi et al., Efficient Projections onto the l1-Ball for Learning in High
        Dimensions, 2008.
    """
    return map_leaves(lambda t, r: _along(_l1_ball_last, t, axis, r), x, radius)


def _l2_ball_last(v: torch.Tensor, radius: Any) -> torch.Tensor:
    radius = torch.as_tensor(radius, dtype=v.dtype, device=v.device)
    length = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v * (radius / torch.maximum(length, radius))


def l2_ball(x: Any, radius: Any = 1.0, axis: Optional[int] = -1) -> Any:
    r"""Projection onto the Euclidean ball :math:`\{z : \|z\|_2 \le r\}`.

    :math:`z = x \cdot r / \max(\|x\|_2, r)`: radial scaling of a point outside, identity
    inside. O(n) per vector.

    Args:
        x: Tensor or pytree.
        radius: :math:`r > 0`.
        axis: the dimension holding the vectors; ``None``: the whole leaf.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.projections.l2_ball(torch.tensor([3.0, 4.0]), 1.0)
        tensor([0.6000, 0.8000])
    """
    return map_leaves(lambda t, r: _along(_l2_ball_last, t, axis, r), x, radius)


def linf_ball(x: Any, radius: Any = 1.0) -> Any:
    r"""Projection onto the max-norm ball :math:`\{z : \|z\|_\infty \le r\}`: clipping to
    :math:`[-r, r]` elementwise, O(n).

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.projections.linf_ball(torch.tensor([3.0, -0.5]), 1.0)
        tensor([ 1.0000, -0.5000])
    """
    return map_leaves(lambda t, r: clip(t, -r, r), x, radius)


def _hyperplane_last(v: torch.Tensor, a: Any, b: Any, inequality: bool) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=v.dtype, device=v.device)
    violation = (a * v).sum(dim=-1, keepdim=True) - b
    if inequality:
        violation = torch.relu(violation)
    return v - violation / (a * a).sum(dim=-1, keepdim=True) * a


def hyperplane(x: Any, a: Any, b: Any, axis: Optional[int] = -1) -> Any:
    r"""Projection onto the hyperplane :math:`\{z : \langle a, z\rangle = b\}`, :math:`a \ne 0`.

    :math:`z = x - \frac{\langle a, x\rangle - b}{\|a\|_2^2}\, a`. O(n) per vector.

    Args:
        x: Tensor or pytree.
        a: the normal, shaped like the vectors (or broadcasting against the leaf).
        b: the offset (a number, or a Tensor broadcasting with the reduced axis kept as
            size 1).
        axis: the dimension holding the vectors; ``None``: the whole leaf.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.projections.hyperplane(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), 0.0)
        tensor([0., 1.])
    """
    return map_leaves(lambda t, ai, bi: _along(_hyperplane_last, t, axis, ai, bi, False), x, a, b)


def halfspace(x: Any, a: Any, b: Any, axis: Optional[int] = -1) -> Any:
    r"""Projection onto the half-space :math:`\{z : \langle a, z\rangle \le b\}`, :math:`a \ne 0`.

    :math:`z = x - \frac{\max(\langle a, x\rangle - b, 0)}{\|a\|_2^2}\, a`. O(n) per vector.
    Arguments as in :func:`hyperplane`.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.projections.halfspace(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]), 1.0)
        tensor([1., 1.])
    """
    return map_leaves(lambda t, ai, bi: _along(_hyperplane_last, t, axis, ai, bi, True), x, a, b)
