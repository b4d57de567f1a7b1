"""Anderson acceleration of a fixed-point iteration."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, cast

import torch

from .._tree import tree_flatten
from .._validation import check_fraction, check_nonnegative
from ..linalg._base import check_interval
from ._base import InnerSolver, SolverStats, check_positive, check_tol, default_tol, flatten_x, threshold_stats

__all__ = ["AndersonAcceleration"]


class AndersonAcceleration(InnerSolver):
    r"""Anderson acceleration (type II) for :math:`x = T(x, \theta)`.

    With the last :math:`m_k = \min(k + 1, m)` iterates :math:`x_i` and their residuals
    :math:`r_i = T(x_i) - x_i`, each step solves the small least-squares problem

    .. math::

        \alpha = \arg\min_{\sum_i \alpha_i = 1} \Big\|\sum_i \alpha_i r_i\Big\|_2^2
        + \rho\, \|\alpha\|_2^2
        \quad\Longleftrightarrow\quad
        \alpha = \frac{(G + \rho I)^{-1} \mathbf 1}{\mathbf 1^\top (G + \rho I)^{-1} \mathbf 1},
        \quad G_{ij} = \langle r_i, r_j\rangle ,

    and mixes :math:`x_{k+1} = \sum_i \alpha_i \big((1-\beta) x_i + \beta T(x_i)\big)`.
    The ridge :math:`\rho = \text{ridge} \cdot \operatorname{tr}(G)/m_k` (relative, so the
    method does not depend on the scale of ``x``) keeps the solve stable when residuals
    become nearly collinear; the small system is solved in float64. With ``memory=1`` it
    is the damped iteration of :class:`FixedPointIteration`. For a linear contraction it
    is equivalent to GMRES on :math:`(I - \partial T) x = b` (Walker and Ni); in general
    it converges locally at least as fast as the iteration it accelerates, often much
    faster, one evaluation of ``T`` per step.

    Stops when :math:`\|T(x) - x\| \le \text{tol} \cdot \max(1, \|T(x_0) - x_0\|)` and
    returns the iterate with the smallest residual it measured (Anderson steps are not
    monotone). Under ``torch.func.vmap`` every problem of the batch has its own
    coefficients :math:`\alpha`, stopping rule and returned iterate.

    Args:
        memory: :math:`m \ge 1`, the number of iterates combined.
        maxiter: largest number of evaluations of ``T``.
        tol: relative residual at which to stop; ``None``: 1e-8 (float64), 1e-4
            otherwise; ``0``: always ``maxiter`` steps.
        damping: the mixing :math:`\beta \in (0, 1]`.
        ridge: the relative Tikhonov term :math:`\ge 0`; ``None``: the square root of
            the dtype's machine epsilon (1.5e-8 in float64).
        check_every: steps between convergence checks (``None``: 1 on CPU, 10 elsewhere).

    Raises:
        TypeError, ValueError: a setting of the wrong kind or out of range; a mapping
            that does not return the structure of ``x``.

    Example:
        >>> import torch, implicitgrad as ig
        >>> c = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> M = torch.tensor([[0.9, 0.05], [0.0, 0.95]], dtype=torch.float64)
        >>> x = ig.fixed_point_solve(lambda x, c: M @ x + c, torch.zeros(2, dtype=torch.float64), c,
        ...                          solver=ig.solvers.AndersonAcceleration())
        >>> torch.allclose(x, torch.linalg.solve(torch.eye(2, dtype=M.dtype) - M, c))
        True

    References:
        Anderson, Iterative Procedures for Nonlinear Integral Equations, 1965. Walker and
        Ni, Anderson Acceleration for Fixed-Point Iterations, 2011.
    """

    unrollable = True
    batchable = True
    per_system = True

    def __init__(
        self,
        memory: int = 5,
        maxiter: int = 1000,
        tol: Optional[float] = None,
        damping: float = 1.0,
        ridge: Optional[float] = None,
        check_every: Optional[int] = None,
    ) -> None:
        owner = "AndersonAcceleration"
        check_positive("memory", owner, memory, integer=True)
        check_positive("maxiter", owner, maxiter, integer=True)
        check_tol(owner, tol)
        check_fraction("damping", damping, owner)
        if ridge is not None:
            check_nonnegative("ridge", ridge, owner)
        if check_every is not None:
            check_positive("check_every", owner, check_every, integer=True)
        self.memory, self.maxiter, self.tol = memory, maxiter, tol
        self.damping, self.ridge, self.check_every = float(damping), ridge, check_every

    def __repr__(self) -> str:
        return (f"AndersonAcceleration(memory={self.memory}, maxiter={self.maxiter}, tol={self.tol}, "
                f"damping={self.damping}, ridge={self.ridge})")

    def run(self, fn: Callable, x0: Any, *params: Any, batch_ndim: int = 0) -> Tuple[Any, SolverStats]:
        """Iterate; with ``batch_ndim > 0`` the leading dims of every leaf index independent problems."""
        leaves, rebuild = flatten_x(x0)
        if not leaves:
            raise TypeError("AndersonAcceleration: x0 must be a Tensor or a pytree with a Tensor leaf.")
        flat, unflatten = _flattener(leaves, batch_ndim)
        dtype = leaves[0].dtype
        tol = self.tol if self.tol is not None else default_tol(dtype)
        ridge = self.ridge if self.ridge is not None else torch.finfo(dtype).eps ** 0.5
        every = check_interval(self.check_every, leaves[0].device)
        beta = self.damping

        def mapping(x: torch.Tensor) -> torch.Tensor:
            out = [v for v in tree_flatten(fn(rebuild(unflatten(x)), *params))[0] if isinstance(v, torch.Tensor)]
            if len(out) != len(leaves) or any(o.shape != t.shape for o, t in zip(out, leaves)):
                raise ValueError("AndersonAcceleration: the mapping must return the structure and shapes of x.")
            return flat(out)

        x = flat(leaves)
        xs = ts = None  # histories: (*batch, m_k, n)
        best, best_norm = x, None
        threshold: Optional[torch.Tensor] = None
        moving = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        k = 0
        for k in range(1, self.maxiter + 1):
            t = mapping(x)
            r_norm = torch.linalg.vector_norm((t - x).detach(), dim=-1)
            if best_norm is None:
                best_norm = r_norm
                threshold = tol * r_norm.clamp_min(1.0)
            improved = r_norm < best_norm
            best = torch.where(improved.unsqueeze(-1), x, best)
            best_norm = torch.where(improved, r_norm, best_norm)
            if tol > 0 and (k == 1 or k % every == 0):
                # NaN counts as not converged: it keeps the run going and is reported.
                moving = moving & ~(best_norm <= cast(torch.Tensor, threshold))
                if not bool(moving.any()):
                    k -= 1
                    break
            xs = x.unsqueeze(-2) if xs is None else torch.cat([xs, x.unsqueeze(-2)], -2)[..., -self.memory:, :]
            ts = t.unsqueeze(-2) if ts is None else torch.cat([ts, t.unsqueeze(-2)], -2)[..., -self.memory:, :]
            step = _mix(xs, ts, beta, ridge)
            x = torch.where(moving.unsqueeze(-1), step, x) if batch_ndim else step
        if tol == 0:
            return rebuild(unflatten(x)), SolverStats(k, float("nan"), None, "")
        best_norm, threshold = cast(torch.Tensor, best_norm), cast(torch.Tensor, threshold)
        stats = threshold_stats(best_norm, threshold, tol, k, batch_ndim, "fixed-point residual",
                                f"after {k} steps (memory={self.memory}, damping={beta})")
        return rebuild(unflatten(best)), stats


def _mix(xs: torch.Tensor, ts: torch.Tensor, beta: float, ridge: float) -> torch.Tensor:
    """The Anderson step from histories ``xs``, ``ts = T(xs)`` of shape ``(*batch, m, n)``."""
    r = (ts - xs).double()
    gram = r @ r.transpose(-1, -2)
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)
    system = gram + (ridge * scale + torch.finfo(gram.dtype).tiny) * eye
    weights = torch.linalg.solve(system, torch.ones(gram.shape[:-1] + (1,), dtype=gram.dtype, device=gram.device))
    alpha = (weights / weights.sum(-2, keepdim=True)).to(xs.dtype)
    mixed = (1 - beta) * xs + beta * ts if beta != 1 else ts
    step = (alpha.transpose(-1, -2) @ mixed).squeeze(-2)
    # A breakdown of the small solve (non-finite weights) falls back to the damped step.
    plain = (1 - beta) * xs[..., -1, :] + beta * ts[..., -1, :]
    ok = torch.isfinite(alpha).all(-2)
    return torch.where(ok, step, plain)


def _flattener(leaves: List[torch.Tensor], batch_ndim: int):
    """Functions between the leaves and one ``(*batch, n)`` tensor per problem."""
    batch = leaves[0].shape[:batch_ndim]
    shapes = [t.shape[batch_ndim:] for t in leaves]
    sizes = [s.numel() for s in shapes]

    def flat(ts: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(*batch, -1) for t in ts], -1)

    def unflatten(x: torch.Tensor) -> List[torch.Tensor]:
        return [p.reshape(tuple(batch) + tuple(s)) for p, s in zip(torch.split(x, sizes, -1), shapes)]

    return flat, unflatten
