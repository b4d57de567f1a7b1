"""Newton's method with a dense Hessian: the reference solver of the numerical test problems."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .._tree import tree_flatten, tree_unflatten


class Newton:
    r"""Newton's method with a dense Hessian and backtracking line search.

    Iterates :math:`x \leftarrow x - t H^{-1} \nabla f` with the Armijo step ``t``; a
    Hessian that is not positive definite is replaced by ``|H|`` (absolute eigenvalues)
    so every step descends. Converges quadratically near a strict minimum, so a handful
    of iterations reach the round-off floor of float64 — the accuracy that finite
    differences through re-solving need. It stops when
    :math:`\|\nabla f\| \le \text{tol} \cdot \max(1, \|\nabla f(x_0)\|)` or when the
    gradient norm stops halving below ``1e-10`` of that scale (round-off). For problems
    of up to a few hundred unknowns.

    Args:
        maxiter: largest number of Newton steps.
        tol: relative gradient norm at which to stop.

    Example:
        >>> import torch
        >>> from implicitgrad.testing.problems import Newton
        >>> f = lambda x, a: (x ** 4).sum() / 4 + 0.5 * (x ** 2).sum() - (a * x).sum()
        >>> x = Newton()(f, torch.zeros(2, dtype=torch.float64), torch.tensor([2.0, 0.0], dtype=torch.float64))
        >>> torch.allclose(x ** 3 + x, torch.tensor([2.0, 0.0], dtype=torch.float64))
        True
    """

    unrollable = False

    def __init__(self, maxiter: int = 100, tol: float = 1e-14) -> None:
        if not isinstance(maxiter, int) or maxiter < 1:
            raise ValueError(f"Newton: maxiter must be a positive integer, got {maxiter!r}.")
        if not tol > 0:
            raise ValueError(f"Newton: tol must be positive, got {tol!r}.")
        self.maxiter, self.tol = maxiter, tol

    def __repr__(self) -> str:
        return f"Newton(maxiter={self.maxiter}, tol={self.tol})"

    def __call__(self, objective: Callable, x0: Any, *params: Any) -> Any:
        params = detached(params)
        v, unflatten = flat_variable(x0)

        def f(w: torch.Tensor) -> torch.Tensor:
            return objective(unflatten(w), *params)

        v = v.detach()
        threshold: Optional[float] = None
        floor = 0.0  # set with threshold on the first iteration
        previous = math.inf
        with torch.enable_grad():
            for _ in range(self.maxiter):
                g, h = gradient_and_hessian(f, v)
                g_norm = float(g.norm())
                if threshold is None:
                    threshold = self.tol * max(1.0, g_norm)
                    floor = 1e-10 * max(1.0, g_norm)
                if g_norm <= threshold or (g_norm <= floor and g_norm > 0.5 * previous):
                    break
                previous = g_norm
                step = _descent_direction(h, g)
                v = _backtrack(f, v, step, g)
        return unflatten(v.detach())


def detached(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], spec)


def flat_variable(x: Any):
    """Tensor leaves of ``x`` as one vector, and the map back to the pytree."""
    leaves, spec = tree_flatten(x)
    index = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    shapes = [leaves[i].shape for i in index]
    sizes = [leaves[i].numel() for i in index]
    vector = torch.cat([leaves[i].detach().reshape(-1) for i in index])

    def unflatten(v: torch.Tensor) -> Any:
        out = list(leaves)
        for i, piece, shape in zip(index, torch.split(v, sizes), shapes):
            out[i] = piece.reshape(shape)
        return tree_unflatten(out, spec)

    return vector, unflatten


def gradient_and_hessian(f: Callable, v: torch.Tensor):
    v = v.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(v), v, create_graph=True)
    eye = torch.eye(v.numel(), dtype=v.dtype, device=v.device)
    (h,) = torch.autograd.grad(g, v, eye, is_grads_batched=True)
    return g.detach(), 0.5 * (h + h.T).detach()


def _descent_direction(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # |H| (absolute eigenvalues) equals H at a strict minimum and keeps the step a descent
    # direction where H is indefinite, away from it.
    eig, vec = torch.linalg.eigh(h)
    magnitude = eig.abs().clamp_min(1e-8 * float(eig.abs().max()))
    return -vec @ ((vec.T @ g) / magnitude)


def _backtrack(f: Callable, v: torch.Tensor, step: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Armijo backtracking along ``step``; the full step once the decrease is below round-off."""
    with torch.no_grad():
        value, slope = float(f(v)), float(g @ step)
        # Near the minimum the predicted decrease drowns in the round-off of f: comparing
        # values would accept tiny steps at random and stall, while the Newton step is exact.
        if -slope <= 1e-12 * (1.0 + abs(value)):
            return v + step
        t = 1.0
        for _ in range(40):
            candidate = v + t * step
            if float(f(candidate)) <= value + 1e-4 * t * slope:
                return candidate
            t *= 0.5
    return v + step
