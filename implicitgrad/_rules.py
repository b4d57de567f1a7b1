"""The differentiation rules of an implicit solve, as pure functions.

Each rule takes the condition ``F``, the point ``(x, θ)``, a cotangent or a tangent and a
``solve(lin, transpose, b)`` for the linear systems; it holds no state and never asks
which form the condition came from. With ``A = ∂ₓF(x*, θ)`` and ``B = ∂_θF(x*, θ)``:

* :func:`root_vjp`: solve ``Aᵀ u = v``, return ``−Bᵀ u``;
* :func:`root_jvp`: solve ``A ẋ = −B θ̇``;
* :func:`linear_solve_vjp` / :func:`linear_solve_jvp`: the rules of ``z = Op(x, θ)⁻¹ b``
  (``Op = A`` or ``Aᵀ``) itself, so that derivatives of any order compose:
  ``b̄ = w`` with ``Opᵀ w = z̄``, ``(x̄, θ̄) = −∂_{x,θ}⟨w, Op(x, θ) z⟩``, and
  ``ż = Op⁻¹(ḃ − Ȯp z)``.

``lin`` is the condition's linearisation at the point (see :mod:`._linearize`); the
caller chooses whether its products must be differentiable again.

References:
    Blondel et al., Efficient and Modular Implicit Differentiation, 2022 (``root_vjp``,
    ``root_jvp``).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ._linearize import linearize
from ._problem import Condition

#: ``solve(lin, transpose, b)``: ``A⁻¹ b`` (``A⁻ᵀ b`` if ``transpose``) at ``lin``'s point.
Solve = Callable[[object, bool, List[torch.Tensor]], List[torch.Tensor]]
Tensors = Sequence[torch.Tensor]


def root_vjp(cond: Condition, x: Tensors, p: Tensors, v: Tensors, p_needs: Sequence[bool],
             solve: Solve, differentiable: bool, lin: Optional[Any] = None) -> List[Optional[torch.Tensor]]:
    """``−(∂_θF)ᵀ (∂ₓF)⁻ᵀ v`` for the parameters in ``p_needs`` (``None`` for the others);
    ``lin``: a linearisation at ``(x, θ)`` already built (by the forward check), if any."""
    if lin is None:
        lin = linearize(cond, x, p, p_needs, differentiable)
    u = solve(lin, True, list(v))
    return [None if g is None else -g for g in lin.vjp_params(u)]


def root_jvp(cond: Condition, x: Tensors, p: Tensors, p_dot: Sequence[Optional[torch.Tensor]],
             solve: Solve, differentiable: bool) -> List[torch.Tensor]:
    """``ẋ = −(∂ₓF)⁻¹ (∂_θF) θ̇`` (``None`` entries of ``p_dot`` are zero)."""
    lin = linearize(cond, x, p, [t is not None for t in p_dot], differentiable)
    return solve(lin, False, [-r for r in lin.jvp(None, p_dot)])


def linear_solve_vjp(cond: Condition, x: Tensors, p: Tensors, z: Tensors, w: Tensors, transpose: bool,
                     x_needs: Sequence[bool], p_needs: Sequence[bool]) -> Tuple[List, List]:
    """``−∂_{x,θ}⟨w, Op(x, θ) z⟩`` given ``w = Op⁻ᵀ z̄``, for the inputs that need it."""
    if not (any(x_needs) or any(p_needs)):
        return [None] * len(x), [None] * len(p)
    lin = linearize(cond, x, p, p_needs, differentiable=True)
    px, pp = lin.op_partials(w, z, transpose)
    return ([-g if need else None for g, need in zip(px, x_needs)],
            [None if g is None else -g for g in pp])


def linear_solve_jvp(cond: Condition, x: Tensors, p: Tensors, z: Tensors, transpose: bool,
                     x_dot: Sequence[Optional[torch.Tensor]], p_dot: Sequence[Optional[torch.Tensor]],
                     b_dot: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """The right-hand side ``ḃ − Ȯp z`` whose solve is ``ż``."""
    rhs = [torch.zeros_like(t) if d is None else d for t, d in zip(z, b_dot)]
    p_needs = [t is not None for t in p_dot]
    if any(t is not None for t in x_dot) or any(p_needs):
        lin = linearize(cond, x, p, p_needs, differentiable=True)
        rhs = [r - d for r, d in zip(rhs, lin.op_jvp(z, transpose, x_dot, p_dot))]
    return rhs
