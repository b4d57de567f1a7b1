r"""Proximal operators, as plain functions of ``(x, strength, scaling=1.0)``.

The proximal operator of a convex function :math:`g` with step :math:`s > 0` is

.. math::

    \operatorname{prox}_{s g}(x) = \arg\min_z \; \tfrac12 \|z - x\|^2 + s\, g(z) .

Every function here computes :math:`\operatorname{prox}_{s g}(x)` for one family
:math:`g = g_\lambda` with ``strength`` :math:`\lambda` and ``scaling`` :math:`s` (for
indicator functions the scaling has no effect). This is the call shape
:class:`~implicitgrad.solvers.ProximalGradient` uses: its step ``x ← prox(x − η∇f(x),
λ, η)``.

``x`` is a Tensor or a pytree (nested tuple / list / dict) of Tensors; non-tensor leaves
pass through. ``strength`` is a number or Tensor broadcast against every leaf, or a pytree
with the structure of ``x`` (one strength per leaf). Everything is written with
differentiable torch operations: the result is differentiable in ``x`` and in
``strength`` wherever the operator is (everywhere except on the kinks, e.g.
:math:`|x_i| = s\lambda` for the lasso, where autograd returns one of the one-sided
derivatives), and it works under ``torch.func.vmap``.

Example:
    >>> import torch, implicitgrad as ig
    >>> ig.prox.lasso(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
    tensor([-1.,  0.,  2.])
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch

from ._tree import tree_flatten, tree_unflatten

__all__ = ["box", "elastic_net", "group_lasso", "lasso", "nonnegative", "ridge"]

Strength = Union[float, torch.Tensor, Any]


def map_leaves(fn: Callable[..., torch.Tensor], x: Any, *args: Any) -> Any:
    """Apply ``fn(leaf, *leaf_args)`` to every tensor leaf of ``x``.

    Each of ``args`` is either given per leaf (a pytree with the structure of ``x``, when
    ``x`` is a container) or shared by every leaf (anything else).
    """
    if isinstance(x, torch.Tensor):
        return fn(x, *args)
    leaves, spec = tree_flatten(x)
    per_leaf = []
    for a in args:
        a_leaves, a_spec = tree_flatten(a)
        per_leaf.append(a_leaves if a_spec == spec else None)
    out = list(leaves)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            out[i] = fn(leaf, *[a if p is None else p[i] for a, p in zip(args, per_leaf)])
    return tree_unflatten(out, spec)


def _soft_threshold(x: torch.Tensor, threshold: Any) -> torch.Tensor:
    return torch.sign(x) * torch.relu(torch.abs(x) - threshold)


def _pair(name: str, strength: Any) -> Tuple[Any, Any]:
    if not (isinstance(strength, (tuple, list)) and len(strength) == 2):
        raise TypeError(
            f"prox.{name}: strength must be a pair, got {type(strength).__name__}. Pass "
            + ("(l1, l2), e.g. (0.1, 0.01)." if name == "elastic_net" else "(lower, upper), e.g. (0.0, 1.0).")
        )
    return strength[0], strength[1]


def lasso(x: Any, strength: Strength, scaling: float = 1.0) -> Any:
    r"""Soft thresholding: the prox of :math:`g(z) = \lambda \|z\|_1`.

    .. math::

        \operatorname{prox}_{s g}(x)_i = \operatorname{sign}(x_i)\,\max(|x_i| - s\lambda, 0) .

    Elementwise, O(n). Derivative: :math:`\partial z_i / \partial x_i = 1` and
    :math:`\partial z_i / \partial \lambda = -s \operatorname{sign}(x_i)` on the support
    :math:`|x_i| > s\lambda`, zero off it.

    Args:
        x: Tensor or pytree.
        strength: :math:`\lambda \ge 0`: a number, a Tensor broadcast against each leaf
            (e.g. one weight per coordinate), or a pytree like ``x``.
        scaling: the step :math:`s`.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.prox.lasso({"w": torch.tensor([0.3, -1.0])}, 0.5)
        {'w': tensor([ 0.0000, -0.5000])}
    """
    return map_leaves(lambda t, lam: _soft_threshold(t, scaling * lam), x, strength)


def elastic_net(x: Any, strength: Tuple[Strength, Strength], scaling: float = 1.0) -> Any:
    r"""The prox of :math:`g(z) = \lambda_1 \|z\|_1 + \tfrac{\lambda_2}{2} \|z\|_2^2`.

    .. math::

        \operatorname{prox}_{s g}(x)_i = \frac{\operatorname{sign}(x_i)\,
        \max(|x_i| - s\lambda_1, 0)}{1 + s\lambda_2} .

    Elementwise, O(n).

    Args:
        x: Tensor or pytree.
        strength: the pair ``(l1, l2)`` of :math:`\lambda_1, \lambda_2 \ge 0` (each a
            number, a broadcast Tensor or a pytree like ``x``).
        scaling: the step :math:`s`.

    Raises:
        TypeError: ``strength`` is not a pair.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.prox.elastic_net(torch.tensor([3.0, -0.5]), (1.0, 1.0))
        tensor([1., -0.])
    """
    l1, l2 = _pair("elastic_net", strength)
    return map_leaves(lambda t, a, b: _soft_threshold(t, scaling * a) / (1 + scaling * b), x, l1, l2)


def group_lasso(x: Any, strength: Strength, scaling: float = 1.0, axis: Optional[int] = None) -> Any:
    r"""Block soft thresholding: the prox of :math:`g(z) = \lambda \sum_G \|z_G\|_2`.

    .. math::

        \operatorname{prox}_{s g}(x)_G = \max\Big(1 - \frac{s\lambda}{\|x_G\|_2}, 0\Big)\, x_G .

    The groups :math:`G` are each whole tensor leaf (``axis=None``) or its slices along
    ``axis`` (``axis=-1``: every row of a matrix is a group). O(n). A group at zero stays
    at zero with a zero (not NaN) derivative.

    Args:
        x: Tensor or pytree.
        strength: :math:`\lambda \ge 0`, shared or a pytree like ``x``; with ``axis`` it
            may hold one value per group (shape of the leaf with ``axis`` kept as 1).
        scaling: the step :math:`s`.
        axis: the dimension that runs within a group; ``None``: the leaf is one group.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.prox.group_lasso(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0, axis=-1)
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
    """

    def block(t: torch.Tensor, lam: Any) -> torch.Tensor:
        squares = (t * t).sum() if axis is None else (t * t).sum(dim=axis, keepdim=True)
        positive = squares > 0
        # The double where keeps the derivative of sqrt at 0 out of the graph.
        group_norm = torch.sqrt(torch.where(positive, squares, torch.ones_like(squares)))
        factor = torch.where(positive, torch.relu(1 - scaling * lam / group_norm), torch.zeros_like(squares))
        return factor * t

    return map_leaves(block, x, strength)


def nonnegative(x: Any, strength: Any = None, scaling: float = 1.0) -> Any:
    r"""The prox of the indicator of :math:`\{z \ge 0\}`: :math:`\max(x, 0)` elementwise, O(n).

    ``strength`` and ``scaling`` are accepted for the common call shape and ignored.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.prox.nonnegative(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    return map_leaves(torch.relu, x)


def box(x: Any, strength: Tuple[Strength, Strength], scaling: float = 1.0) -> Any:
    r"""The prox of the indicator of :math:`\{l \le z \le u\}`: :math:`\min(\max(x, l), u)`.

    Elementwise, O(n); differentiable in the bounds (a coordinate at a bound moves with
    it). ``scaling`` is ignored (an indicator).

    Args:
        x: Tensor or pytree.
        strength: the pair ``(lower, upper)``, each a number, a broadcast Tensor or a
            pytree like ``x``, with ``lower ≤ upper``.
        scaling: ignored.

    Raises:
        TypeError: ``strength`` is not a pair.

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.prox.box(torch.tensor([-1.0, 0.5, 2.0]), (0.0, 1.0))
        tensor([0.0000, 0.5000, 1.0000])
    """
    lower, upper = _pair("box", strength)
    return map_leaves(clip, x, lower, upper)


def clip(t: torch.Tensor, lower: Any, upper: Any) -> torch.Tensor:
    """``min(max(t, lower), upper)``, differentiable in the bounds when they are Tensors."""
    lower = torch.as_tensor(lower, dtype=t.dtype, device=t.device)
    upper = torch.as_tensor(upper, dtype=t.dtype, device=t.device)
    return torch.minimum(torch.maximum(t, lower), upper)


def ridge(x: Any, strength: Strength, scaling: float = 1.0) -> Any:
    r"""The prox of :math:`g(z) = \tfrac{\lambda}{2} \|z\|_2^2`: :math:`x / (1 + s\lambda)`, O(n).

    Example:
        >>> import torch, implicitgrad as ig
        >>> ig.prox.ridge(torch.tensor([2.0]), 1.0)
        tensor([1.])
    """
    return map_leaves(lambda t, lam: t / (1 + scaling * lam), x, strength)
