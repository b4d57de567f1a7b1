r"""Well-posed bilevel test problems, built deterministically from a few readable arguments.

Every builder returns a :class:`BilevelProblem`: an inner objective
:math:`f(x, \theta)` whose minimiser :math:`x^\star(\theta)` is unique and strictly
stable (positive definite Hessian), a solver that finds it to near machine precision in
float64, an outer loss :math:`L` and, where a closed form exists, the exact
hypergradient :math:`\mathrm{d}L(x^\star(\theta), \theta) / \mathrm{d}\theta`.

The ``repr`` of a problem is the call that rebuilds it (all randomness comes from
``seed``), so a failing example printed by Hypothesis can be pasted into a shell.

The pieces the builders are made of are public too, with the data as arguments so a
test can differentiate with respect to it or a benchmark can size it:
:func:`ridge_objective`, :func:`ridge_solution`, :func:`squared_loss`,
:func:`logistic_objective`, :func:`logistic_solution` and :func:`logistic_loss`.

Layouts describe pytrees of tensors: a tuple of ints is a tensor shape (``()`` a scalar,
``(3,)`` a vector), a ``dict`` maps names to layouts, a ``list`` holds layouts. For
example ``{"w": (2,), "b": ()}`` is a dict of a 2-vector and a scalar.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._api import implicit_solve
from .._tree import tree_flatten, tree_unflatten
from ..solvers import GradientDescent
from ._layouts import flatten, flatten_params, layout_size, split_params, unflatten
from ._newton import Newton, detached, flat_variable, gradient_and_hessian
from .check import HypergradientReport, check_hypergradient, outer_takes_params

__all__ = [
    "BilevelProblem",
    "Newton",
    "logistic_loss",
    "logistic_objective",
    "logistic_problem",
    "logistic_solution",
    "mlp_proximal_problem",
    "quadratic_problem",
    "ridge_objective",
    "ridge_problem",
    "ridge_solution",
    "squared_loss",
]

DTYPE = torch.float64


@dataclasses.dataclass(repr=False, eq=False)
class BilevelProblem:
    """A bilevel problem ``min_θ L(x*(θ), θ)`` with ``x*(θ) = argmin_x f(x, θ)``.

    Built by the functions below; ``repr`` gives the call that rebuilds it.

    Attributes:
        objective: ``objective(x, *params) -> scalar``, the inner objective ``f``.
        x0: starting point of the inner solve (a pytree of float64 tensors).
        params: tuple of positional parameters (pytrees); every floating leaf requires
            grad and is a hyperparameter to differentiate.
        solver: ``solver(objective, x0, *params) -> x*``, converging to near machine
            precision.
        outer: the outer loss, ``outer(x)`` or, when ``outer_uses_params``,
            ``outer(x, *params)``.
        exact_hypergradient: closed-form ``dL/dθ`` as a tuple structured like
            ``params``, or ``None`` when no closed form is known.
        spectrum: ``(λ_min, λ_max)`` of the inner Hessian at ``x*`` — exact for the
            quadratic family, computed by a dense eigen-decomposition otherwise.
        recipe: the builder call that reproduces the problem (its ``repr``).
    """

    objective: Callable
    x0: Any
    params: Tuple[Any, ...]
    solver: Callable
    outer: Callable
    exact_hypergradient: Optional[Tuple[Any, ...]]
    spectrum: Tuple[float, float]
    recipe: str

    def __repr__(self) -> str:
        return self.recipe

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        # Hypothesis prints dataclasses field by field unless they say how to print them.
        printer.text(self.recipe)

    @property
    def condition_number(self) -> float:
        """``λ_max / λ_min`` of the inner Hessian at the solution."""
        return self.spectrum[1] / self.spectrum[0]

    @property
    def outer_uses_params(self) -> bool:
        """Whether ``outer`` is called as ``outer(x, *params)`` (see :func:`outer_takes_params`)."""
        return outer_takes_params(self.outer, len(self.params))

    def fresh_params(self) -> Tuple[Any, ...]:
        """Detached copies of ``params`` whose floating leaves require grad."""
        leaves, spec = tree_flatten(self.params)
        copies = [
            t.detach().clone().requires_grad_(True) if _is_float(t) else t for t in leaves
        ]
        return tree_unflatten(copies, spec)

    def outer_value(self, x: Any, params: Sequence[Any]) -> torch.Tensor:
        """``L(x, θ)``, calling ``outer`` with or without the params as it expects."""
        return self.outer(x, *params) if self.outer_uses_params else self.outer(x)

    def hypergradient(self, linear_solver=None, mode: str = "implicit", **kwargs: Any) -> Tuple[Any, ...]:
        """``dL/dθ`` through :func:`implicitgrad.implicit_solve`, structured like ``params``.

        Args:
            linear_solver: the backward linear solver (``None``: ``implicit_solve``'s default).
            mode: ``"implicit"`` or ``"unrolled"``.
            **kwargs: passed to ``implicit_solve`` (for example ``on_failure``).
        """
        params = self.fresh_params()
        x = implicit_solve(
            self.objective, self.x0, *params, solver=self.solver, linear_solver=linear_solver,
            mode=mode, **kwargs,
        )
        leaves, spec = tree_flatten(params)
        wrt = [t for t in leaves if _is_float(t)]
        grads = iter(torch.autograd.grad(self.outer_value(x, params), wrt, allow_unused=True,
                                         materialize_grads=True))
        return tree_unflatten([next(grads) if _is_float(t) else None for t in leaves], spec)

    def check(self, **kwargs: Any) -> HypergradientReport:
        """:func:`implicitgrad.testing.check_hypergradient` on this problem (``kwargs`` go to it)."""
        return check_hypergradient(
            self.objective, self.x0, *self.params, solver=self.solver, outer=self.outer, **kwargs
        )


# ----------------------------------------------------------------------------- pieces


def ridge_objective(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Ridge regression with a (per-feature) log penalty.

    .. math::

        f(w, \rho) = \tfrac12 \|Xw - y\|^2 + \tfrac12 \sum_j e^{\rho_j} w_j^2 ,

    ``ρ = log_lam`` a scalar or one entry per feature. Its minimiser is
    :func:`ridge_solution`. Scale ``X`` and ``y`` by :math:`1/\sqrt{N}` for the mean
    squared error instead of the sum.
    """
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (torch.exp(log_lam) * w ** 2).sum()


def ridge_solution(log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The minimiser of :func:`ridge_objective`:
    :math:`w^\star = (X^\top X + \mathrm{diag}(e^{\rho}))^{-1} X^\top y`, by a dense solve
    (differentiable in ``log_lam``, ``X`` and ``y``).

    Example:
        >>> import torch
        >>> from implicitgrad.testing.problems import ridge_objective, ridge_solution
        >>> X, y = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        >>> w = ridge_solution(torch.tensor(0.0, dtype=torch.float64), X, y)   # (I + I) w = 1
        >>> w.tolist(), torch.func.grad(ridge_objective)(w, torch.tensor(0.0), X, y).abs().max().item()
        ([0.5, 0.5, 0.5], 0.0)
    """
    lam = torch.exp(log_lam) * torch.ones(X.shape[1], dtype=X.dtype, device=X.device)
    return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)


def squared_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The mean squared error :math:`\frac{1}{2N}\|Xw - y\|^2` (a validation loss)."""
    return 0.5 * ((X @ w - y) ** 2).mean()


def logistic_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The mean logistic loss :math:`\frac1N \sum_i \log(1 + e^{-y_i x_i^\top w})`,
    labels ``y`` in ``{-1, +1}`` (a validation loss)."""
    return F.softplus(-y * (X @ w)).mean()


def logistic_objective(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":func:`logistic_loss` plus a (per-feature) log penalty:

    .. math::

        f(w, \rho) = \frac1N \sum_i \log\bigl(1 + e^{-y_i x_i^\top w}\bigr)
        + \tfrac12 \sum_j e^{\rho_j} w_j^2 ,

    strongly convex with modulus :math:`\min_j e^{\rho_j}`; its minimiser is
    :func:`logistic_solution`.
    """
    return logistic_loss(w, X, y) + 0.5 * (torch.exp(log_lam) * w * w).sum()


def logistic_solution(
    log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor, maxiter: int = 50, tol: float = 1e-12,
) -> torch.Tensor:
    r"""The minimiser of :func:`logistic_objective` by Newton's method with its closed-form
    Hessian.

    From :math:`w = 0`, :math:`w \leftarrow w - H^{-1} g` with, for :math:`s_i =
    \sigma(-y_i x_i^\top w)`, :math:`g = -X^\top (y \odot s) / N + e^{\rho} \odot w` and
    :math:`H = X^\top \mathrm{diag}(s(1 - s)) X / N + \mathrm{diag}(e^{\rho})`; stops when
    :math:`\|g\| \le` ``tol`` or after ``maxiter`` steps. The objective is strongly
    convex and its Hessian Lipschitz, so convergence is quadratic near :math:`w^\star`:
    about ten steps reach float64 round-off. One dense ``d × d`` solve per step — cheaper
    than :class:`Newton`, which builds the Hessian by autodiff.

    Example:
        >>> import torch
        >>> from implicitgrad.testing.problems import logistic_objective, logistic_solution
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y, log_lam = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        >>> w = logistic_solution(log_lam, X, y)
        >>> torch.func.grad(logistic_objective)(w, log_lam, X, y).norm().item() < 1e-12
        True
    """
    n, d = X.shape
    w = torch.zeros(d, dtype=X.dtype, device=X.device)
    lam = torch.exp(log_lam) * torch.ones(d, dtype=X.dtype, device=X.device)
    for _ in range(maxiter):
        s = torch.sigmoid(-y * (X @ w))
        grad = -(X.T @ (y * s)) / n + lam * w
        if float(grad.norm()) <= tol:
            break
        hess = (X.T * (s * (1 - s))) @ X / n + torch.diag(lam)
        w = w - torch.linalg.solve(hess, grad)
    return w


# ----------------------------------------------------------------------------- builders


def quadratic_problem(
    x_layout: Any = (3,),
    params_layout: Sequence[Any] = ((2,),),
    cond: float = 10.0,
    seed: int = 0,
    solver: str = "closed_form",
    outer_uses_params: bool = False,
) -> BilevelProblem:
    r"""A strongly convex quadratic with linearly coupled parameters.

    .. math::

        f(x, \theta) = \tfrac12 x^\top H x - x^\top (B\theta + c), \qquad
        H = Q \Lambda Q^\top, \qquad
        L(x, \theta) = \tfrac12 \|x - t\|^2 \;[+\; \tfrac{\rho}{2} \|\theta\|^2],

    with ``Q`` a random orthogonal matrix and ``Λ`` eigenvalues in ``[1, cond]``
    (both ends included, so ``cond`` is exactly the condition number). Then
    :math:`x^\star = H^{-1}(B\theta + c)` and
    :math:`\mathrm{d}L/\mathrm{d}\theta = B^\top H^{-1}(x^\star - t) [+ \rho\theta]`,
    both evaluated through the eigen-decomposition (independent of any linear solver).
    ``x`` and ``θ`` are flattened from their layouts, so ``H`` couples every leaf with
    every other (cross blocks included).

    Args:
        x_layout: layout of the variable ``x`` (see module docstring).
        params_layout: one layout per positional parameter.
        cond: condition number of ``H`` (must be 1 when ``x`` has a single entry).
        seed: seed of every random draw.
        solver: ``"closed_form"`` (the formula above) or ``"gradient_descent"``
            (:class:`~implicitgrad.solvers.GradientDescent` with step
            ``2 / (1 + cond)``, run to relative gradient norm ``1e-12``; unrollable).
        outer_uses_params: add ``ρ/2 ‖θ‖²`` (``ρ = 0.5``) to the outer loss, which is
            then called as ``outer(x, *params)``.

    Raises:
        ValueError: ``cond < 1``, ``cond != 1`` for a one-entry ``x``, an unknown
            ``solver``, or an empty layout.
        TypeError: a malformed layout.

    Example:
        >>> from implicitgrad.testing.problems import quadratic_problem
        >>> problem = quadratic_problem(x_layout={"w": (2,), "b": ()}, params_layout=[(2,)], cond=10, seed=1)
        >>> problem.condition_number, sorted(problem.x0)
        (10.0, ['b', 'w'])
        >>> g = problem.hypergradient()
        >>> bool(((g[0] - problem.exact_hypergradient[0]).abs() < 1e-12).all())
        True
    """
    params_layout = list(params_layout)
    n, m = layout_size(x_layout), sum(layout_size(p) for p in params_layout)
    if n < 1 or m < 1:
        raise ValueError("quadratic_problem: x_layout and params_layout must hold at least one entry each.")
    if not cond >= 1:
        raise ValueError(f"quadratic_problem: cond must be >= 1, got {cond!r}.")
    if n == 1 and cond != 1:
        raise ValueError("quadratic_problem: a 1-dimensional x has condition number 1; pass cond=1.")
    if solver not in ("closed_form", "gradient_descent"):
        raise ValueError(f"quadratic_problem: solver must be 'closed_form' or 'gradient_descent', got {solver!r}.")
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(_randn(gen, n, n))[0]
    interior = torch.rand(max(n - 2, 0), generator=gen, dtype=DTYPE) * math.log(cond)
    eig = torch.cat([torch.tensor([1.0, float(cond)][: min(n, 2)], dtype=DTYPE), interior.exp()])
    h = (q * eig) @ q.T
    h = 0.5 * (h + h.T)
    b = _randn(gen, n, m) / math.sqrt(m)
    c, t = _randn(gen, n), _randn(gen, n)
    theta = _randn(gen, m)
    rho = 0.5 if outer_uses_params else 0.0

    def h_inverse(r: torch.Tensor) -> torch.Tensor:
        return q @ ((q.T @ r) / eig)

    def objective(x, *params):
        v, phi = flatten(x_layout, x), flatten_params(params_layout, params)
        return 0.5 * v @ (h @ v) - v @ (b @ phi + c)

    def closed_form(objective, x0, *params):
        return unflatten(x_layout, h_inverse(b @ flatten_params(params_layout, params) + c))

    def outer(x):
        return 0.5 * ((flatten(x_layout, x) - t) ** 2).sum()

    def regularised_outer(x, *params):
        return outer(x) + 0.5 * rho * (flatten_params(params_layout, params) ** 2).sum()

    x_star = h_inverse(b @ theta + c)
    grad = b.T @ h_inverse(x_star - t) + rho * theta
    inner_solver: Callable[..., Any]
    if solver == "closed_form":
        inner_solver = _Named(closed_form, "closed_form")
    else:
        rate = (cond - 1) / (cond + 1)
        steps = 50 if rate == 0 else int(math.ceil(math.log(1e-13) / math.log(rate))) + 50
        inner_solver = GradientDescent(lr=2.0 / (1.0 + cond), maxiter=steps, tol=1e-12)
    return BilevelProblem(
        objective=objective,
        x0=unflatten(x_layout, torch.zeros(n, dtype=DTYPE)),
        params=split_params(params_layout, theta),
        solver=inner_solver,
        outer=regularised_outer if outer_uses_params else outer,
        exact_hypergradient=split_params(params_layout, grad, requires_grad=False),
        spectrum=(1.0, float(cond)),
        recipe=_recipe("quadratic_problem", x_layout=x_layout, params_layout=params_layout, cond=cond,
                       seed=seed, solver=solver, outer_uses_params=outer_uses_params),
    )


def ridge_problem(
    n_samples: int = 6,
    n_features: int = 3,
    log_lam: float = 0.0,
    per_feature: bool = False,
    seed: int = 0,
) -> BilevelProblem:
    r"""Ridge regression with a learned (log) regularisation strength.

    .. math::

        f(w, \rho) = \frac{1}{2N}\|Xw - y\|^2 + \frac12 \sum_j e^{\rho_j} w_j^2, \qquad
        L(w) = \frac{1}{2N_v}\|X_v w - y_v\|^2 .

    With :math:`H = X^\top X / N + \mathrm{diag}(e^\rho)` the solution is
    :math:`w^\star = H^{-1} X^\top y / N` and, with
    :math:`u = H^{-1} X_v^\top (X_v w^\star - y_v) / N_v`,
    :math:`\partial L / \partial \rho_j = -e^{\rho_j} w^\star_j u_j` (summed over ``j``
    for a scalar ``ρ``). Solved in closed form.

    Args:
        n_samples: training (and validation) sample count ``N``; may be below
            ``n_features`` (the penalty keeps ``H`` positive definite).
        n_features: dimension of ``w``.
        log_lam: ``ρ`` (scalar), or the centre of the per-feature ``ρ_j``.
        per_feature: one ``ρ_j`` per feature (``log_lam`` plus seeded noise of scale 0.5)
            instead of one scalar.
        seed: seed of the data and of ``ρ``.

    Example:
        >>> from implicitgrad.testing.problems import ridge_problem
        >>> problem = ridge_problem(n_samples=4, n_features=6, per_feature=True)
        >>> problem.params[0].shape, problem.check().ok
        (torch.Size([6]), True)
    """
    _check_sizes("ridge_problem", n_samples=n_samples, n_features=n_features)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train, x_val, y_val = _regression_data(gen, n_samples, n_features)
    rho = log_lam + (0.5 * _randn(gen, n_features) if per_feature else torch.zeros((), dtype=DTYPE))
    gram, moment = x_train.T @ x_train / n_samples, x_train.T @ y_train / n_samples
    eye = torch.eye(n_features, dtype=DTYPE)
    # The sums of ridge_objective over data scaled by 1/√N are the means above.
    x_scaled, y_scaled = x_train / math.sqrt(n_samples), y_train / math.sqrt(n_samples)

    def objective(w, rho):
        return ridge_objective(w, rho, x_scaled, y_scaled)

    def closed_form(objective, w0, rho):
        return ridge_solution(rho, x_scaled, y_scaled)

    def outer(w):
        return squared_loss(w, x_val, y_val)

    h = gram + rho.exp() * eye
    w_star = torch.linalg.solve(h, moment)
    u = torch.linalg.solve(h, x_val.T @ (x_val @ w_star - y_val) / n_samples)
    grad = -rho.exp() * w_star * u
    eig = torch.linalg.eigvalsh(h)
    return BilevelProblem(
        objective=objective,
        x0=torch.zeros(n_features, dtype=DTYPE),
        params=(rho.clone().requires_grad_(True),),
        solver=_Named(closed_form, "closed_form"),
        outer=outer,
        exact_hypergradient=(grad if per_feature else grad.sum(),),
        spectrum=(float(eig[0]), float(eig[-1])),
        recipe=_recipe("ridge_problem", n_samples=n_samples, n_features=n_features, log_lam=log_lam,
                       per_feature=per_feature, seed=seed),
    )


def logistic_problem(
    n_samples: int = 8,
    n_features: int = 3,
    log_lam: float = 0.0,
    seed: int = 0,
) -> BilevelProblem:
    r"""L2-regularised logistic regression with one learned penalty per feature.

    .. math::

        f(w, \rho) = \frac1N \sum_i \log\bigl(1 + e^{-y_i x_i^\top w}\bigr)
        + \frac12 \sum_j e^{\rho_j} w_j^2, \qquad
        L(w) = \frac1{N} \sum_i \log\bigl(1 + e^{-y^v_i (x^v_i)^\top w}\bigr),

    labels in ``{-1, +1}``. Strongly convex (modulus :math:`\min_j e^{\rho_j}`); solved
    by :class:`Newton` to round-off. No closed-form hypergradient.

    Args:
        n_samples: training (and validation) sample count.
        n_features: dimension of ``w``.
        log_lam: centre of the ``ρ_j`` (seeded noise of scale 0.5 around it).
        seed: seed of the data and of ``ρ``.

    Example:
        >>> from implicitgrad.testing.problems import logistic_problem
        >>> problem = logistic_problem(n_features=2)
        >>> problem.exact_hypergradient is None, problem.spectrum[0] > 0
        (True, True)
    """
    _check_sizes("logistic_problem", n_samples=n_samples, n_features=n_features)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train, x_val, y_val = _regression_data(gen, n_samples, n_features)
    y_train, y_val = _signs(y_train), _signs(y_val)
    rho = log_lam + 0.5 * _randn(gen, n_features)

    def objective(w, rho):
        return logistic_objective(w, rho, x_train, y_train)

    def outer(w):
        return logistic_loss(w, x_val, y_val)

    return _numerical_problem(
        objective=objective,
        x0=torch.zeros(n_features, dtype=DTYPE),
        params=(rho.requires_grad_(True),),
        outer=outer,
        recipe=_recipe("logistic_problem", n_samples=n_samples, n_features=n_features, log_lam=log_lam,
                       seed=seed),
    )


def mlp_proximal_problem(
    n_support: int = 5,
    hidden: int = 3,
    lam: float = 2.0,
    seed: int = 0,
) -> BilevelProblem:
    r"""iMAML's inner problem on a one-hidden-layer tanh network.

    .. math::

        f(\phi, \theta) = \frac1K \sum_{k} \bigl(g_\phi(a_k) - b_k\bigr)^2
        + \frac{\lambda}{2} \|\phi - \theta\|^2 , \qquad
        L(\phi) = \frac1K \sum_k \bigl(g_\phi(a^q_k) - b^q_k\bigr)^2 ,

    with :math:`g_\phi(a) = w_2 \tanh(w_1 a + b_1) + b_2` on scalar inputs, ``φ`` and
    ``θ`` dicts ``{"w1", "b1", "w2", "b2"}``, support and query points of a seeded
    sinusoid, and ``x0 = θ`` (adaptation starts at the meta-parameters). The network
    term is non-convex; ``λ`` makes the Hessian at ``x*`` positive definite in practice
    — ``spectrum`` reports how much. Solved by :class:`Newton`. No closed form.

    Args:
        n_support: support (and query) points ``K``.
        hidden: hidden units.
        lam: proximal strength ``λ > 0``.
        seed: seed of the data and of ``θ``.

    Example:
        >>> from implicitgrad.testing.problems import mlp_proximal_problem
        >>> problem = mlp_proximal_problem(hidden=2)
        >>> sorted(problem.params[0]), problem.spectrum[0] > 0
        (['b1', 'b2', 'w1', 'w2'], True)

    References:
        Rajeswaran et al., Meta-Learning with Implicit Gradients, 2019.
    """
    _check_sizes("mlp_proximal_problem", n_support=n_support, hidden=hidden)
    if not lam > 0:
        raise ValueError(f"mlp_proximal_problem: lam must be positive, got {lam!r}.")
    gen = torch.Generator().manual_seed(seed)
    amplitude = 0.5 + torch.rand((), generator=gen, dtype=DTYPE)
    phase = math.pi * torch.rand((), generator=gen, dtype=DTYPE)
    a_support, a_query = [4 * torch.rand(n_support, 1, generator=gen, dtype=DTYPE) - 2 for _ in range(2)]
    b_support, b_query = (amplitude * torch.sin(a + phase) for a in (a_support, a_query))
    theta = {
        "w1": _randn(gen, hidden, 1), "b1": 0.5 * _randn(gen, hidden),
        "w2": _randn(gen, 1, hidden) / math.sqrt(hidden), "b2": torch.zeros(1, dtype=DTYPE),
    }

    def network(phi, a):
        return torch.tanh(a @ phi["w1"].T + phi["b1"]) @ phi["w2"].T + phi["b2"]

    def objective(phi, theta):
        fit = ((network(phi, a_support) - b_support) ** 2).mean()
        return fit + 0.5 * lam * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)

    def outer(phi):
        return ((network(phi, a_query) - b_query) ** 2).mean()

    return _numerical_problem(
        objective=objective,
        x0={k: v.clone() for k, v in theta.items()},
        params=({k: v.requires_grad_(True) for k, v in theta.items()},),
        outer=outer,
        recipe=_recipe("mlp_proximal_problem", n_support=n_support, hidden=hidden, lam=lam, seed=seed),
    )


# ----------------------------------------------------------------------------- helpers


class _Named:
    """A solver function with a readable repr (shown in reports and counterexamples)."""

    unrollable = False

    def __init__(self, fn: Callable, name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, objective, x0, *params):
        return self.fn(objective, x0, *params)

    def __repr__(self) -> str:
        return self.name


def _numerical_problem(objective, x0, params, outer, recipe) -> BilevelProblem:
    """A problem without closed form: solve once to measure the Hessian's spectrum."""
    solver = Newton()
    fixed = detached(params)
    x_star = solver(objective, x0, *fixed)
    v, rebuild = flat_variable(x_star)
    with torch.enable_grad():
        _, h = gradient_and_hessian(lambda w: objective(rebuild(w), *fixed), v)
    eig = torch.linalg.eigvalsh(h)
    return BilevelProblem(
        objective=objective, x0=x0, params=params, solver=solver, outer=outer,
        exact_hypergradient=None, spectrum=(float(eig[0]), float(eig[-1])), recipe=recipe,
    )


def _recipe(name: str, **kwargs) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def _check_sizes(owner: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}.")


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def _regression_data(gen, n_samples, n_features):
    w_true = _randn(gen, n_features)
    x_train, x_val = _randn(gen, n_samples, n_features), _randn(gen, n_samples, n_features)
    y_train = x_train @ w_true + 0.5 * _randn(gen, n_samples)
    y_val = x_val @ w_true + 0.5 * _randn(gen, n_samples)
    return x_train, y_train, x_val, y_val


def _signs(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y >= 0, torch.ones_like(y), -torch.ones_like(y))


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()
