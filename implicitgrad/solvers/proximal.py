"""Proximal and projected gradient (FISTA with adaptive restart and backtracking)."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from .._tree import tree_flatten
from ..linalg._base import dot
from ._base import InnerSolver, SolverStats, check_positive, check_tol, default_tol, flatten_x, objective_grad

__all__ = ["ProjectedGradient", "ProximalGradient"]

#: Where a solver finds the hyperparameters of its prox / projection among ``params``.
ParamsSelector = Union[None, int, Sequence[int], Callable[..., Any]]


def _check_selector(owner: str, name: str, selector: Any) -> None:
    if selector is None or callable(selector):
        return
    if isinstance(selector, int) and not isinstance(selector, bool):
        return
    if isinstance(selector, (tuple, list)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in selector
    ):
        return
    raise TypeError(
        f"{owner}: {name} must say where the hyperparameter is among params: an index "
        f"(e.g. {name}=0 for the first param), a tuple of indices, a callable "
        f"{name}(*params) -> value, or None; got {selector!r}. For a constant, write "
        f"{name}=lambda *params: 0.1."
    )


def _select(owner: str, name: str, selector: ParamsSelector, params: Tuple[Any, ...]) -> Any:
    """The value ``selector`` picks from ``params`` (see :class:`ProximalGradient`)."""
    if selector is None:
        return None
    if callable(selector):
        return selector(*params)
    indices = [selector] if isinstance(selector, int) else list(selector)
    for i in indices:
        if not -len(params) <= i < len(params):
            raise ValueError(
                f"{owner}: {name}={selector!r} points at params[{i}], but {len(params)} params "
                f"were passed. Pass the hyperparameter among params (after x0), or set {name} "
                "to its index, to a callable, or to None if the operator takes none."
            )
    if isinstance(selector, int):
        return params[selector]
    return tuple(params[i] for i in indices)


class CompositeMapping:
    r"""The optimality condition of a composite problem as a fixed-point mapping.

    ``mapping(x, *params) = prox(x − η ∇ₓf(x, *params), reg(*params), η)``: its fixed points
    are the minimisers of :math:`f + g`. The core differentiates this condition; the
    solver reads :attr:`objective` from it and records the step :attr:`stepsize` it ended
    with (any :math:`\eta > 0` has the same fixed points, hence the same derivative).
    """

    def __init__(self, solver: ProximalGradient, objective: Callable[..., torch.Tensor]) -> None:
        if not callable(objective):
            raise TypeError(
                f"The objective must be callable as objective(x, *params), got {type(objective).__name__}."
            )
        self.solver = solver
        self.objective = objective
        self.stepsize: Optional[float] = solver.stepsize

    def __call__(self, x: Any, *params: Any) -> Any:
        leaves, rebuild = flatten_x(x)
        grads = torch.func.grad(lambda ls: self.objective(rebuild(ls), *params))(leaves)
        eta = 1.0 if self.stepsize is None else self.stepsize
        return self.solver.prox_step(rebuild([t - eta * g for t, g in zip(leaves, grads)]), params, eta)


class ProximalGradient(InnerSolver):
    r"""Proximal gradient descent (FISTA) for :math:`\min_x f(x, \theta) + g_{\lambda}(x)`.

    ``f`` is the smooth ``objective`` and :math:`g_\lambda` the nonsmooth part given by
    its proximal operator ``prox(y, λ, η)`` (any function of :mod:`implicitgrad.prox`, or
    your own with that call shape). With step :math:`\eta` and
    :math:`t_0 = 1,\ t_{k+1} = \tfrac12(1 + \sqrt{1 + 4t_k^2})`:

    .. math::

        x_{k+1} = \operatorname{prox}_{\eta g}\big(y_k - \eta \nabla_x f(y_k, \theta)\big),
        \qquad
        y_{k+1} = x_{k+1} + \frac{t_k - 1}{t_{k+1}} (x_{k+1} - x_k) .

    The momentum restarts (:math:`t_k = 1`) when
    :math:`\langle y_k - x_{k+1}, x_{k+1} - x_k\rangle > 0` (adaptive restart). With
    ``stepsize=None`` the step starts from a secant estimate of the curvature at ``x0``
    and is halved until the sufficient-decrease condition
    :math:`f(x_{k+1}) \le f(y_k) + \langle \nabla f(y_k), x_{k+1} - y_k\rangle +
    \|x_{k+1} - y_k\|^2 / (2\eta)` holds (backtracking). With
    ``acceleration=False`` it is plain proximal gradient (ISTA). Stops when the
    fixed-point residual :math:`\|y_k - x_{k+1}\|` is at most
    :math:`\text{tol} \cdot \max(1, \text{its value at } x_0)`.

    **Differentiation.** Passed as the ``solver`` of
    :func:`~implicitgrad.implicit_solve`, the solver states the problem's optimality
    condition, the fixed point

    .. math::

        x^\star = \operatorname{prox}_{\eta g_\lambda}\big(x^\star - \eta \nabla_x f(x^\star, \theta)\big),

    and the core differentiates that (with :class:`~implicitgrad.GMRES` by default: its
    Jacobian :math:`I - \partial_x T` is not symmetric), in ``θ`` and in ``λ``. The
    forward residual reported is :math:`\|x - T(x)\|` with the step the solver ended
    with. The objective receives every param, including those that only the prox uses.

    **Where λ comes from.** ``reg`` picks the prox's strength from the params of the
    call: an index (default ``0``: the first param), a tuple of indices (the strength is
    then a tuple, e.g. ``(l1, l2)`` for :func:`~implicitgrad.prox.elastic_net`), a
    callable ``reg(*params) -> strength``, or ``None`` (``prox(y, None, η)``). Being a
    param, λ receives a gradient like any other.

    Args:
        prox: ``prox(y, strength, scaling) -> z``, the proximal operator of
            :math:`\text{scaling} \cdot g_{\text{strength}}`.
        stepsize: a fixed :math:`\eta` (at most :math:`1/L` for an :math:`L`-smooth
            ``f``); ``None`` (default): backtracking.
        acceleration: FISTA momentum with restart (``False``: ISTA).
        maxiter: largest number of iterations.
        tol: relative fixed-point residual at which to stop; ``None``: 1e-8 (float64),
            1e-4 otherwise; ``0``: always ``maxiter`` iterations.
        reg: where the prox's strength is among the params (see above).

    Raises:
        TypeError, ValueError: a setting of the wrong kind or out of range; ``reg``
            pointing past the params.

    Example:
        >>> import torch, implicitgrad as ig
        >>> X = torch.randn(30, 5, dtype=torch.float64); y = X @ torch.tensor([1.0, 0, 0, 2, 0], dtype=X.dtype)
        >>> lam = torch.tensor(0.1, dtype=X.dtype, requires_grad=True)
        >>> f = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean()
        >>> w = ig.implicit_solve(f, torch.zeros(5, dtype=X.dtype), lam,
        ...                       solver=ig.solvers.ProximalGradient(ig.prox.lasso))
        >>> w.sum().backward()
        >>> (w.detach() != 0).tolist(), lam.grad.item() < 0
        ([True, False, False, True, False], True)

    References:
        Beck and Teboulle, A Fast Iterative Shrinkage-Thresholding Algorithm for Linear
        Inverse Problems, 2009. O'Donoghue and Candès, Adaptive Restart for Accelerated
        Gradient Schemes, 2015. Blondel et al., Efficient and Modular Implicit
        Differentiation, 2022.
    """

    unrollable = True
    batchable = False
    _selector = "reg"  # the name of the argument that picks the prox's hyperparameters

    def __init__(
        self,
        prox: Callable[..., Any],
        stepsize: Optional[float] = None,
        acceleration: bool = True,
        maxiter: int = 1000,
        tol: Optional[float] = None,
        reg: ParamsSelector = 0,
    ) -> None:
        owner = type(self).__name__
        if not callable(prox):
            raise TypeError(f"{owner}: prox must be callable as prox(y, strength, scaling), got {prox!r}.")
        if stepsize is not None:
            check_positive("stepsize", owner, stepsize)
        check_positive("maxiter", owner, maxiter, integer=True)
        check_tol(owner, tol)
        _check_selector(owner, self._selector, reg)
        self.prox, self.stepsize, self.acceleration = prox, stepsize, bool(acceleration)
        self.maxiter, self.tol, self.reg = maxiter, tol, reg

    def __repr__(self) -> str:
        step = "backtracking" if self.stepsize is None else self.stepsize
        name = getattr(self.prox, "__name__", type(self.prox).__name__)
        return (f"{type(self).__name__}({name}, stepsize={step}, acceleration={self.acceleration}, "
                f"maxiter={self.maxiter}, tol={self.tol})")

    def optimality_mapping(self, objective: Callable[..., torch.Tensor]) -> CompositeMapping:
        """The fixed-point mapping ``T(x, *params)`` whose fixed points solve the problem."""
        return CompositeMapping(self, objective)

    def prox_step(self, y: Any, params: Tuple[Any, ...], eta: float) -> Any:
        """``prox(y, reg(*params), η)``."""
        return self.prox(y, _select(type(self).__name__, self._selector, self.reg, params), eta)

    def run(self, fn: Callable, x0: Any, *params: Any) -> Tuple[Any, SolverStats]:
        """Solve from ``x0``; ``fn`` is the smooth objective (or the mapping the core built)."""
        mapping = fn if isinstance(fn, CompositeMapping) else None
        objective = mapping.objective if mapping is not None else fn
        x, rebuild = flatten_x(x0)
        if not x:
            raise TypeError(f"{type(self).__name__}: x0 must be a Tensor or a pytree with a Tensor leaf.")
        record = torch.is_grad_enabled() and any(
            t.requires_grad for t in x + tree_flatten(params)[0] if isinstance(t, torch.Tensor)
        )
        tol = self.tol if self.tol is not None else default_tol(x[0].dtype)
        f_y, g_y = objective_grad(objective, x, rebuild, params, create_graph=record)
        eta = self.stepsize if self.stepsize is not None else self._initial_step(objective, x, rebuild, params, g_y)
        y, x_prev, t = x, x, 1.0
        threshold, residual, evaluations = None, float("nan"), 0
        k = 0
        for k in range(1, self.maxiter + 1):
            x_new, eta, spent = self._step(objective, rebuild, params, y, f_y, g_y, eta)
            evaluations += spent
            if tol > 0:
                residual = float(_norm(x_new, y))
                if threshold is None:
                    threshold = tol * max(1.0, residual)
                if residual <= threshold:
                    x_prev = x_new
                    break
            momentum = 0.0
            if self.acceleration:
                t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
                restart = k > 1 and float(dot([(a - b).detach() for a, b in zip(y, x_new)],
                                              [(a - b).detach() for a, b in zip(x_new, x_prev)], 0)) > 0
                t, momentum = (1.0, 0.0) if restart else (t_new, (t - 1.0) / t_new)
            y = [a + momentum * (a - b) for a, b in zip(x_new, x_prev)] if momentum else x_new
            x_prev = x_new
            f_y, g_y = objective_grad(objective, y, rebuild, params, create_graph=record)
        if mapping is not None and self.stepsize is None:
            mapping.stepsize = float(eta)
        if threshold is None:
            return rebuild(x_prev), SolverStats(k, float("nan"), None, "")
        converged = residual <= threshold
        message = "" if converged else (
            f"fixed-point residual ‖y − prox(y − η∇f(y))‖ = {residual:.3e} above {threshold:.3e} "
            f"after {k} iterations (step η = {eta:.3g}, {evaluations} extra objective evaluations)"
        )
        return rebuild(x_prev), SolverStats(k, residual, converged, message)

    def _step(self, objective, rebuild, params, y: List[torch.Tensor], f_y: torch.Tensor,
              g_y: List[torch.Tensor], eta: float) -> Tuple[List[torch.Tensor], float, int]:
        """One prox-gradient step from ``y``; halves ``η`` until sufficient decrease."""
        spent = 0
        while True:
            x_new = self._prox_leaves(rebuild, y, g_y, params, eta)
            if self.stepsize is not None:
                return x_new, eta, spent
            with torch.no_grad():
                f_new = objective(rebuild([t.detach() for t in x_new]), *params)
            spent += 1
            d = [(a - b).detach() for a, b in zip(x_new, y)]
            bound = float(f_y.detach()) + float(dot([g.detach() for g in g_y], d, 0)) + float(dot(d, d, 0)) / (2 * eta)
            slack = 1e2 * torch.finfo(y[0].dtype).eps * max(1.0, abs(float(f_y.detach())))
            if float(f_new) <= bound + slack:
                return x_new, eta, spent
            eta *= 0.5
            if eta < 1e-30:
                raise ValueError(
                    f"{type(self).__name__}: backtracking shrank the step to {eta:.1e} without "
                    f"sufficient decrease (objective {float(f_new)!r}); the objective may be "
                    "non-smooth or non-finite near x. Put the nonsmooth part in the prox."
                )

    def _prox_leaves(self, rebuild, y, g_y, params, eta: float) -> List[torch.Tensor]:
        z = self.prox_step(rebuild([a - eta * g for a, g in zip(y, g_y)]), params, eta)
        x_new, _ = flatten_x(z)
        if len(x_new) != len(y) or any(a.shape != b.shape for a, b in zip(x_new, y)):
            raise ValueError(
                f"{type(self).__name__}: the prox / projection returned a structure or shapes "
                "other than x's. It must map x to a point of the same structure."
            )
        return x_new

    def _initial_step(self, objective, x, rebuild, params, g) -> float:
        """``1 / L̂``, ``L̂`` the secant curvature along the gradient at ``x0`` (backtracking corrects it)."""
        g = [t.detach() for t in g]
        g_norm = float(_norm(g, [torch.zeros_like(t) for t in g]))
        x_norm = float(_norm(x, [torch.zeros_like(t) for t in x]))
        if not g_norm > 0 or not math.isfinite(g_norm):
            return 1.0
        h = 1e-4 * max(1.0, x_norm) / g_norm
        g_h = objective_grad(objective, [t.detach() - h * d for t, d in zip(x, g)], rebuild, params)[1]
        curvature = float(_norm(g_h, g)) / (h * g_norm)
        return 1.0 / curvature if curvature > 0 and math.isfinite(curvature) else 1.0


def _norm(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    d = [(u - v).detach() for u, v in zip(a, b)]
    return dot(d, d, 0).sqrt()


class ProjectedGradient(ProximalGradient):
    r"""Projected gradient (accelerated, with restart and backtracking) for
    :math:`\min_{x \in C} f(x, \theta)`.

    :class:`ProximalGradient` with the projection onto :math:`C` as its prox:
    :math:`x_{k+1} = P_C(y_k - \eta \nabla_x f(y_k, \theta))`. Differentiated through the
    fixed point :math:`x^\star = P_C(x^\star - \eta \nabla_x f(x^\star, \theta))`, in
    ``θ`` and in the set's parameters.

    Args:
        projection: ``projection(y, *args) -> z``, e.g. a function of
            :mod:`implicitgrad.projections`.
        args: where the projection's arguments are among the params: ``None`` (default:
            ``projection(y)``), an index (``projection(y, params[i])``), a tuple of
            indices, or a callable ``args(*params)`` returning one value or a tuple of
            them.
        stepsize, acceleration, maxiter, tol: as in :class:`ProximalGradient`.

    Example:
        >>> import torch, implicitgrad as ig
        >>> c = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> f = lambda x, c: 0.5 * ((x - c) ** 2).sum()
        >>> x = ig.implicit_solve(f, torch.full((3,), 1 / 3, dtype=torch.float64), c,
        ...                       solver=ig.solvers.ProjectedGradient(ig.projections.simplex))
        >>> x.detach()
        tensor([0.2500, 0.7500, 0.0000], dtype=torch.float64)
    """

    _selector = "args"

    def __init__(
        self,
        projection: Callable[..., Any],
        args: ParamsSelector = None,
        stepsize: Optional[float] = None,
        acceleration: bool = True,
        maxiter: int = 1000,
        tol: Optional[float] = None,
    ) -> None:
        super().__init__(projection, stepsize=stepsize, acceleration=acceleration, maxiter=maxiter,
                         tol=tol, reg=args)

    def prox_step(self, y: Any, params: Tuple[Any, ...], eta: float) -> Any:
        """``projection(y, *args(*params))``."""
        if self.reg is None:
            return self.prox(y)
        value = _select(type(self).__name__, self._selector, self.reg, params)
        return self.prox(y, *value) if isinstance(value, tuple) else self.prox(y, value)
