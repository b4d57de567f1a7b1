"""Products with the Jacobians of the optimality condition ``F(x, θ)`` at a point.

Two implementations with one interface:

* :class:`AutogradLinearization` — the fast first-order path. ``F`` (for an objective,
  ``∇ₓf``) is built once with a graph on detached copies of ``x`` and ``θ``; each
  product is then one backward pass through that graph, as a hand-written
  Hessian-vector-product loop would do.
* :class:`FuncLinearization` — built from ``torch.func.vjp`` / ``jvp`` / ``grad``, so
  every product is differentiable again in ``x``, ``θ`` and in any tensor closed over
  (nested transforms keep each level's perturbations apart). Used for higher-order
  derivatives and under ``torch.func`` transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, List, Optional, Tuple, cast

import torch

from ._problem import Condition
from .linalg._base import dot


def total_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return dot(a, b, 0)


def _grad(outputs, inputs, cotangents, create_graph: bool) -> List[torch.Tensor]:
    """``Σ (∂ outputs / ∂ inputs)ᵀ cotangents`` by one backward pass (zeros for an input
    the outputs do not reach), the graph kept for the next product."""
    if all(o.requires_grad for o in outputs):
        outs, cots = outputs, cotangents
    else:
        outs = [o for o in outputs if o.requires_grad]
        cots = [c for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not outs or not inputs:
        return [torch.zeros_like(i) for i in inputs]
    if create_graph:
        with torch.enable_grad():
            return list(torch.autograd.grad(outs, inputs, cots, retain_graph=True, create_graph=True,
                                            allow_unused=True, materialize_grads=True))
    # A first-order product needs no grad mode (the hot path of every iterative solve).
    grads = torch.autograd.grad(outs, inputs, cots, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]


def linearize(cond: Condition, x: Sequence[torch.Tensor], p: Sequence[torch.Tensor],
              p_needs: Sequence[bool], differentiable: bool):
    """The condition's Jacobian products at ``(x, θ)``.

    ``differentiable=False``: plain autograd on detached copies, the graph of ``F`` built
    once (first-order backward, the fast path). ``True``: built with ``torch.func`` so the
    products are themselves differentiable in ``x``, ``θ`` and every tensor the caller
    closes over (higher order, ``torch.func`` transforms).
    """
    cls = FuncLinearization if differentiable else AutogradLinearization
    return cls(cond, list(x), list(p), list(p_needs))


class AutogradLinearization:
    """First-order products on one graph of ``F`` (see module docstring)."""

    def __init__(self, cond: Condition, x, p, p_needs) -> None:
        self.cond = cond
        self.p_needs = p_needs
        with torch.enable_grad():
            self.x = [t.detach().requires_grad_(True) for t in x]
            self.p = [
                t.detach().requires_grad_(True) if need and t.is_floating_point() else t.detach()
                for t, need in zip(p, p_needs)
            ]
            #: ``F`` at the point, and the outputs of the user's function it came from.
            self.F, self.outputs = cond.on_graph(self.x, self.p)
        self._dual: Optional[List[torch.Tensor]] = None

    def serves(self, p_needs: Sequence[bool]) -> bool:
        """Whether this graph reaches every parameter in ``p_needs``."""
        return all(have or not need for have, need in zip(self.p_needs, p_needs))

    def rmatvec(self, u: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``(∂ₓF)ᵀ u``."""
        return _grad(self.F, self.x, u, create_graph=False)

    def matvec(self, z: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``(∂ₓF) z`` (``rmatvec`` when ``A`` is symmetric by construction: a Hessian)."""
        if self.cond.symmetric:
            return self.rmatvec(z)
        return self.jvp(z, None)

    def vjp_params(self, u: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """``(∂_θF)ᵀ u`` for the parameters that need it, ``None`` for the others."""
        wanted = [t for t, need in zip(self.p, self.p_needs) if need]
        grads = iter(_grad(self.F, wanted, u, create_graph=False))
        return [next(grads) if need else None for need in self.p_needs]

    def jvp(self, x_dot, p_dot) -> List[torch.Tensor]:
        """``∂ₓF ẋ + ∂_θF θ̇`` by the double-vjp identity."""
        inputs, tangents = [], []
        for t, d in zip(self.x, x_dot if x_dot is not None else [None] * len(self.x)):
            if d is not None:
                inputs.append(t)
                tangents.append(d)
        for t, d, need in zip(self.p, p_dot if p_dot is not None else [None] * len(self.p),
                              self.p_needs):
            if d is not None and need:
                inputs.append(t)
                tangents.append(d)
        if not inputs:
            return [torch.zeros_like(f) for f in self.F]
        with torch.enable_grad():
            if self._dual is None:
                self._dual = [torch.zeros_like(f).requires_grad_(True) for f in self.F]
            g = _grad(self.F, inputs, self._dual, create_graph=True)
            return _grad(g, self._dual, tangents, create_graph=False)


class FuncLinearization:
    """Differentiable products built with ``torch.func`` (see module docstring)."""

    def __init__(self, cond: Condition, x, p, p_needs) -> None:
        self.cond = cond
        self.p_needs = p_needs
        self.x = list(x)
        self.p = list(p)
        self.pn = [t for t, need in zip(p, p_needs) if need]
        self.F, self._vjp = cast(Tuple[Any, Callable[..., Any]], torch.func.vjp(self.condition, self.x, self.pn))

    def _merge(self, pn: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        it = iter(pn)
        return [next(it) if need else t for t, need in zip(self.p, self.p_needs)]

    def condition(self, x: List[torch.Tensor], pn: List[torch.Tensor]) -> List[torch.Tensor]:
        return self.cond(x, self._merge(pn))

    def rmatvec(self, u: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return list(self._vjp(list(u))[0])

    def matvec(self, z: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self.cond.symmetric:
            return self.rmatvec(z)
        return self.jvp(z, None)

    def vjp_params(self, u: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        grads = iter(self._vjp(list(u))[1])
        return [next(grads) if need else None for need in self.p_needs]

    def jvp(self, x_dot, p_dot) -> List[torch.Tensor]:
        xd = [torch.zeros_like(t) if d is None else d
              for t, d in zip(self.x, x_dot or [None] * len(self.x))]
        pd_all = p_dot or [None] * len(self.p)
        pd = [torch.zeros_like(t) if d is None else d
              for t, d, need in zip(self.p, pd_all, self.p_needs) if need]
        return list(torch.func.jvp(self.condition, (self.x, self.pn), (xd, pd))[1])

    def _op_at(self, x, pn, z, transpose: bool):
        """``Op(x, θ) z`` as a function of ``(x, θ)``: ``Aᵀ z`` or ``A z``."""
        if transpose or self.cond.symmetric:
            return list(torch.func.vjp(self.condition, x, pn)[1](list(z))[0])
        return list(torch.func.jvp(lambda xx: self.condition(xx, pn), (x,), (list(z),))[1])

    def op_partials(self, w, z, transpose: bool):
        """``∂_{x,θ} ⟨w, Op(x, θ) z⟩`` with ``w``, ``z`` held fixed."""
        def inner(x, pn):
            return total_dot(list(w), self._op_at(x, pn, z, transpose))

        gx, gp = torch.func.grad(inner, argnums=(0, 1))(self.x, self.pn)
        it = iter(gp)
        return list(gx), [next(it) if need else None for need in self.p_needs]

    def op_jvp(self, z, transpose: bool, x_dot, p_dot):
        """Directional derivative of ``Op(x, θ) z`` along ``(ẋ, θ̇)``."""
        xd = [torch.zeros_like(t) if d is None else d for t, d in zip(self.x, x_dot)]
        pd = [torch.zeros_like(t) if d is None else d
              for t, d, need in zip(self.p, p_dot, self.p_needs) if need]
        return list(torch.func.jvp(lambda x, pn: self._op_at(x, pn, z, transpose),
                                   (self.x, self.pn), (xd, pd))[1])
