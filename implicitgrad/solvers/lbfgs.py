"""Limited-memory BFGS, batched per problem, with a line search that needs gradients only."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

import torch

from .._tree import tree_flatten
from ..linalg._base import axpy, check_interval, dot, norm, packing, safe_div, scale
from ._base import (
    InnerSolver,
    SolverStats,
    batch_stats,
    check_positive,
    check_tol,
    default_tol,
    flatten_x,
    objective_grad,
    where_leaves,
)

Vector = List[torch.Tensor]

#: Curvature condition of the line search: accept a step once |φ'(α)| ≤ WOLFE · |φ'(0)|.
WOLFE = 0.9


class LBFGS(InnerSolver):
    r"""Limited-memory BFGS with a gradient-only line search, per problem under ``vmap``.

    The direction is :math:`d_k = -H_k \nabla f(x_k)` with :math:`H_k` the L-BFGS
    inverse-Hessian approximation built by the two-loop recursion from the last
    ``history`` pairs :math:`s_i = x_{i+1} - x_i`, :math:`y_i = \nabla f(x_{i+1}) -
    \nabla f(x_i)` and the scaling :math:`H_k^0 = \frac{s^\top y}{y^\top y} I` of the
    newest pair. A pair with :math:`s^\top y \le 0` (negative curvature along the step)
    is not stored, so :math:`H_k` stays positive definite and :math:`d_k` a descent
    direction. On a strongly convex objective this converges superlinearly and adapts to
    curvature that differs by orders of magnitude between parameter blocks (the last
    layer of a network against its biases), where a single step size, as in gradient
    descent or :class:`AcceleratedGradient`, needs :math:`O(\sqrt{\kappa})` or
    :math:`O(\kappa)` steps.

    **Line search from derivatives only.** Along :math:`d`, with :math:`\varphi(\alpha)
    = f(x + \alpha d)`, a step is accepted when :math:`|\varphi'(\alpha)| \le 0.9\,
    |\varphi'(0)|` (the strong Wolfe curvature condition) or the gradient there meets
    the tolerance. Otherwise the next trial is the secant root of :math:`\varphi'` — exact
    for a quadratic — inside the bracket found so far (kept 10% away from its ends), or an
    extrapolation when no trial has yet overshot. A non-finite gradient counts as an
    overshoot. Only gradients are used, so under ``torch.func.vmap``, where the solver
    sees the sum of the independent objectives, each problem still gets its own step,
    history, scaling and stopping rule. The first step is :math:`-\nabla f /
    \|\nabla f\|`, scaled by the line search.

    Stops when :math:`\|\nabla_x f(x_k)\| \le \text{tol} \cdot \max(1, \|\nabla_x
    f(x_0)\|)` (per problem) or after ``maxiter`` iterations, and returns the point with
    the smallest gradient norm it measured. Every iteration costs one gradient
    evaluation per line-search trial (usually one; two or three in the first
    iterations). In ``mode="unrolled"`` the iterations are recorded with the step
    lengths :math:`\alpha_k` and the curvature pairs (so :math:`H_k`) held constant:
    the result is differentiated through :math:`x_{k+1} = x_k - \alpha_k H_k \nabla_x
    f(x_k, \theta)`. Differentiating :math:`H_k` and the line search too would divide by
    :math:`s^\top y`, which vanishes as the iterates converge, and amplify rounding
    without bound; with them held, the unrolled derivative converges to the implicit one
    as the iterates converge, since :math:`I - \alpha_k H_k \nabla^2_x f \to 0`.

    Args:
        maxiter: largest number of iterations.
        tol: relative gradient norm at which to stop; ``None``: 1e-8 (float64), 1e-4
            otherwise.
        history: number of ``(s, y)`` pairs kept.
        line_search_steps: largest number of trials per line search; a search that
            finds no acceptable step takes the longest trial that still descended, or
            stays put and drops the history of that problem.
        check_every: iterations between convergence checks (``None``: 1 on CPU, 10
            elsewhere).

    Raises:
        ValueError: a setting out of range.

    Example:
        >>> import torch, implicitgrad as ig
        >>> A = torch.diag(torch.tensor([1.0, 1e4], dtype=torch.float64))
        >>> x, stats = ig.solvers.LBFGS(tol=1e-10).run(
        ...     lambda x: 0.5 * x @ A @ x - x.sum(), torch.zeros(2, dtype=torch.float64))
        >>> torch.allclose(x, torch.tensor([1.0, 1e-4], dtype=torch.float64)), stats.converged
        (True, True)

    References:
        Liu and Nocedal, On the Limited Memory BFGS Method for Large Scale Optimization,
        1989. Nocedal and Wright, Numerical Optimization, 2nd ed., §7.2 and §3.5.
    """

    unrollable = True
    batchable = True
    per_system = True

    def __init__(
        self,
        maxiter: int = 100,
        tol: Optional[float] = None,
        history: int = 10,
        line_search_steps: int = 10,
        check_every: Optional[int] = None,
    ) -> None:
        owner = "LBFGS"
        check_positive("maxiter", owner, maxiter, integer=True)
        check_positive("history", owner, history, integer=True)
        check_positive("line_search_steps", owner, line_search_steps, integer=True)
        check_tol(owner, tol)
        if check_every is not None:
            check_positive("check_every", owner, check_every, integer=True)
        self.maxiter, self.tol, self.history = maxiter, tol, history
        self.line_search_steps, self.check_every = line_search_steps, check_every

    def __repr__(self) -> str:
        return f"LBFGS(maxiter={self.maxiter}, tol={self.tol}, history={self.history})"

    def run(self, fn: Callable, x0: Any, *params: Any, batch_ndim: int = 0) -> Tuple[Any, SolverStats]:
        """Solve; with ``batch_ndim > 0`` the leading dims of every leaf index independent problems.

        ``fn`` is then the sum of the independent objectives (as under ``torch.func.vmap``).
        """
        leaves, rebuild = flatten_x(x0)
        record = torch.is_grad_enabled() and any(
            t.requires_grad for t in leaves + tree_flatten(params)[0] if isinstance(t, torch.Tensor)
        )
        tol = self.tol if self.tol is not None else default_tol(leaves[0].dtype)
        every = check_interval(self.check_every, leaves[0].device)
        # All iterations work on one row per problem, (systems, n): the two-loop recursion is
        # then a few fused ops instead of a Python loop over leaves.
        pack, unpack = packing(leaves, batch_ndim)
        problems_ndim, batch_ndim = batch_ndim, 1
        evaluations = [0]

        def gradient(point: Vector) -> Vector:
            evaluations[0] += 1
            return [pack(objective_grad(fn, unpack(point[0]), rebuild, params, create_graph=record)[1])]

        x = [pack(leaves)]
        g = gradient(x)
        g0_norm = norm(_detached(g), batch_ndim)
        threshold = tol * g0_norm.clamp_min(1.0)
        best, best_norm = x, g0_norm
        active = g0_norm > threshold
        gamma = safe_div(torch.ones_like(g0_norm), g0_norm)  # first step: -g / ‖g‖
        pairs: List[Tuple[Vector, Vector, torch.Tensor]] = []
        k = 0
        for k in range(1, self.maxiter + 1):
            if (k % every == 0 or k == self.maxiter) and not bool(active.any()):
                k -= 1
                break
            d = _two_loop(g, pairs, gamma, batch_ndim)
            slope = dot(g, d, batch_ndim).detach()
            uphill = ~(slope < 0)  # lost positive definiteness to rounding: steepest descent
            d = where_leaves(uphill, [-scale(gamma, gi) for gi in g], d)
            slope = torch.where(uphill, -gamma * dot(g, g, batch_ndim).detach(), slope)
            x_new, g_new, moved = self._line_search(gradient, x, g, d, slope, active, threshold, batch_ndim)
            g_norm = norm(_detached(g_new), batch_ndim)
            improved = moved & (g_norm < best_norm)
            best = where_leaves(improved, x_new, best)
            best_norm = torch.where(improved, g_norm, best_norm)
            # Curvature pair (s, y); kept only where sᵀy > 0 and the point moved.
            s = [(a - b).detach() for a, b in zip(x_new, x)]
            y = [(a - b).detach() for a, b in zip(g_new, g)]
            sy = dot(s, y, batch_ndim)
            yy = dot(y, y, batch_ndim)
            good = moved & (sy > 1e-10 * (norm(s, batch_ndim) * yy.sqrt()))
            rho = torch.where(good, safe_div(torch.ones_like(sy), sy), torch.zeros_like(sy))
            gamma = torch.where(good, safe_div(sy, yy), gamma)
            pairs.append((s, y, rho))
            if len(pairs) > self.history:
                pairs.pop(0)
            # A problem whose line search found nothing forgets its history and shortens its first
            # trial (steepest descent next).
            stuck = active & ~moved
            pairs = [(s_, y_, torch.where(stuck, torch.zeros_like(r_), r_)) for s_, y_, r_ in pairs]
            gamma = torch.where(stuck, 0.1 * gamma, gamma)
            x, g = x_new, g_new
            active = active & (g_norm > threshold)
        return rebuild(unpack(best[0])), batch_stats(
            best_norm, g0_norm, tol, k, problems_ndim, f"after {k} iterations ({evaluations[0]} gradient evaluations)")

    def _line_search(
        self,
        gradient: Callable[[Vector], Vector],
        x: Vector,
        g: Vector,
        d: Vector,
        slope: torch.Tensor,
        active: torch.Tensor,
        threshold: torch.Tensor,
        batch_ndim: int,
    ) -> Tuple[Vector, Vector, torch.Tensor]:
        """Per problem, a step ``α`` along ``d`` meeting the curvature condition (see the class).

        Returns the new point, its gradient, and which problems moved (the others keep
        ``x`` and ``g``).
        """
        zero = torch.zeros_like(slope)
        lo, d_lo = zero, slope  # largest trial known to be short (φ' < 0), and φ' there
        hi, d_hi = torch.full_like(slope, math.inf), torch.full_like(slope, math.nan)
        alpha = torch.where(active, torch.ones_like(slope), zero)
        pending = active.clone()
        x_out, g_out, moved = x, g, torch.zeros_like(active)
        x_lo, g_lo = x, g
        for _ in range(self.line_search_steps):
            trial = axpy(alpha, d, x)
            g_t = gradient(trial)
            slope_t = dot(g_t, d, batch_ndim).detach()
            finite = torch.isfinite(slope_t) & torch.isfinite(norm(_detached(g_t), batch_ndim))
            accept = pending & finite & (
                (slope_t.abs() <= WOLFE * slope.abs())
                | (norm(_detached(g_t), batch_ndim) <= threshold)
            )
            x_out, g_out = where_leaves(accept, trial, x_out), where_leaves(accept, g_t, g_out)
            moved = moved | accept
            pending = pending & ~accept
            over = pending & (~finite | (slope_t > 0))
            short = pending & ~over
            hi, d_hi = torch.where(over, alpha, hi), torch.where(over, torch.where(finite, slope_t, d_hi), d_hi)
            x_lo, g_lo = where_leaves(short, trial, x_lo), where_leaves(short, g_t, g_lo)
            lo, d_lo = torch.where(short, alpha, lo), torch.where(short, slope_t, d_lo)
            if not bool(pending.any()):
                break
            alpha = torch.where(pending, _next_trial(lo, d_lo, hi, d_hi), alpha)
        # No acceptable step: take the longest one that still descended, if any.
        fallback = pending & (lo > 0)
        x_out = where_leaves(fallback, x_lo, x_out)
        g_out = where_leaves(fallback, g_lo, g_out)
        return x_out, g_out, moved | fallback


def _next_trial(lo: torch.Tensor, d_lo: torch.Tensor, hi: torch.Tensor, d_hi: torch.Tensor) -> torch.Tensor:
    """Secant root of φ' inside ``[lo, hi]`` (10% from the ends), bisection without ``φ'(hi)``,
    and extrapolation (2× to 10×) while no trial has overshot."""
    bracketed = torch.isfinite(hi)
    width = torch.where(bracketed, hi - lo, torch.zeros_like(hi))
    secant = lo - d_lo * safe_div(width, d_hi - d_lo)
    inside = torch.minimum(torch.maximum(secant, lo + 0.1 * width), lo + 0.9 * width)
    inside = torch.where(torch.isfinite(d_hi) & torch.isfinite(inside), inside, lo + 0.1 * width)
    # Not bracketed: φ'(lo) < 0 still; extrapolate along the secant through 0 and lo.
    grow = torch.where(lo > 0, lo, torch.ones_like(lo))
    return torch.where(bracketed, inside, 4.0 * grow)


def _two_loop(g: Vector, pairs, gamma: torch.Tensor, batch_ndim: int) -> Vector:
    """``-H g`` by the L-BFGS two-loop recursion, per problem (pairs with ``rho = 0`` are skipped)."""
    q = list(g)
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * dot(s, q, batch_ndim)
        alphas.append(a)
        q = axpy(-a, y, q)
    r = [scale(gamma, qi) for qi in q]
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        b = rho * dot(y, r, batch_ndim)
        r = axpy(a - b, s, r)
    return [-ri for ri in r]


def _detached(v: Vector) -> Vector:
    return [t.detach() for t in v]
