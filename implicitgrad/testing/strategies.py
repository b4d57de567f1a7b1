"""Hypothesis strategies of well-posed bilevel problems.

Each strategy draws the few readable arguments of a builder in
:mod:`implicitgrad.testing.problems` — sizes first and small, then the condition
number, solver, hyperparameter values and a seed — and returns the built
:class:`~implicitgrad.testing.problems.BilevelProblem`. Every argument comes from
Hypothesis, so a failing example shrinks towards small sizes, condition number 1 and
seed 0, and is printed as the builder call that reproduces it, e.g.
``quadratic_problem(x_layout=(2,), params_layout=[(1,)], cond=1, seed=0, ...)``.

The solvers of every drawn problem converge to near machine precision in float64 (closed
forms, Newton's method, or gradient descent to a relative gradient norm of 1e-12), so
:func:`~implicitgrad.testing.check_hypergradient` passes on all of them at its default
tolerances.

Example:
    >>> from hypothesis import given, settings
    >>> from implicitgrad.testing import strategies
    >>> @settings(max_examples=5, deadline=None)
    ... @given(strategies.ridge_problems())
    ... def test_ridge(problem):
    ...     assert problem.check().ok, problem.check()
    >>> test_ridge()
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

try:
    from hypothesis import assume
    from hypothesis import strategies as st
except ModuleNotFoundError as error:
    if error.name != "hypothesis":
        raise
    raise ImportError(
        "implicitgrad.testing.strategies needs the Hypothesis package, which is not installed. "
        "Install it with: pip install 'implicitgrad[testing]'  (or: pip install hypothesis)."
    ) from error

from ._layouts import layout_size
from .problems import (
    BilevelProblem,
    logistic_problem,
    mlp_proximal_problem,
    quadratic_problem,
    ridge_problem,
)

__all__ = [
    "CONDITION_NUMBERS",
    "LEAF_SHAPES",
    "bilevel_problems",
    "closed_form_problems",
    "layouts",
    "logistic_problems",
    "mlp_proximal_problems",
    "pytree_problems",
    "quadratic_problems",
    "ridge_problems",
]

#: Condition numbers drawn for quadratic problems (shrinking towards 1).
CONDITION_NUMBERS = (1, 2, 5, 10, 30, 100, 300, 1000)
#: Leaf shapes drawn for pytree layouts.
LEAF_SHAPES = ((), (1,), (2,), (3,), (2, 2))
_SEEDS = st.integers(min_value=0, max_value=2**16 - 1)
_HALVES = st.integers(min_value=-4, max_value=4).map(lambda k: k / 2)


def quadratic_problems(
    *,
    max_size: int = 6,
    max_params: int = 3,
    max_cond: float = 1000,
    solvers: Sequence[str] = ("closed_form", "gradient_descent"),
    max_gd_cond: float = 10,
    outer_uses_params: Optional[bool] = None,
) -> st.SearchStrategy[BilevelProblem]:
    """Quadratics with a chosen condition number and a closed-form hypergradient.

    Args:
        max_size: largest dimension of ``x`` (a vector).
        max_params: largest dimension of ``θ`` (a vector).
        max_cond: largest condition number drawn from :data:`CONDITION_NUMBERS`.
        solvers: inner solvers to draw from (see
            :func:`~implicitgrad.testing.problems.quadratic_problem`).
        max_gd_cond: largest condition number for the gradient-descent solver (its
            iteration count grows linearly with it).
        outer_uses_params: fix whether the outer loss has a penalty on ``θ``; ``None``
            draws both.
    """
    return _quadratics(st.integers(1, max_size).map(lambda n: (n,)),
                       st.integers(1, max_params).map(lambda m: [(m,)]),
                       max_cond, solvers, max_gd_cond, outer_uses_params)


def layouts(max_size: int = 6) -> st.SearchStrategy:
    """Pytree layouts: a shape from :data:`LEAF_SHAPES`, or dicts and lists of layouts.

    Containers nest two deep at most, hold one to three items (dict keys ``"a"``,
    ``"b"``, ``"c"``) and ``max_size`` entries in all; every draw is valid, and draws
    shrink towards a scalar. See :mod:`implicitgrad.testing.problems` for the format.
    """
    if max_size < 1:
        raise ValueError(f"layouts: max_size must be at least 1, got {max_size!r}.")

    @st.composite
    def draw(draw):
        budget = [max_size]

        def node(depth: int):
            node_type = draw(st.sampled_from(("leaf", "list", "dict") if depth < 2 else ("leaf",)))
            if node_type == "leaf":
                shape = draw(st.sampled_from([s for s in LEAF_SHAPES if math.prod(s) <= budget[0]]))
                budget[0] -= math.prod(shape)
                return shape
            items = [node(depth + 1)]
            for _ in range(draw(st.integers(0, 2))):
                if budget[0] < 1:
                    break
                items.append(node(depth + 1))
            return items if node_type == "list" else dict(zip("abc", items))

        return node(0)

    return draw()


def pytree_problems(
    *,
    max_size: int = 6,
    max_cond: float = 100,
    solvers: Sequence[str] = ("closed_form", "gradient_descent"),
    max_gd_cond: float = 10,
    outer_uses_params: Optional[bool] = None,
) -> st.SearchStrategy[BilevelProblem]:
    """Quadratics whose ``x`` and params are pytrees: dicts, lists, scalars, matrices.

    One or two positional params, each drawn from :func:`layouts`; the Hessian couples
    every leaf with every other, so a solver that drops cross blocks fails.
    """
    params = st.lists(layouts(max_size=4), min_size=1, max_size=2)
    return _quadratics(layouts(max_size), params, max_cond, solvers, max_gd_cond, outer_uses_params)


def ridge_problems(*, max_samples: int = 8, max_features: int = 5) -> st.SearchStrategy[BilevelProblem]:
    """Ridge regressions with a scalar or per-feature log-penalty (closed form)."""

    @st.composite
    def draw(draw) -> BilevelProblem:
        n_features = draw(st.integers(1, max_features))
        n_samples = draw(st.integers(1, max_samples))
        return ridge_problem(n_samples=n_samples, n_features=n_features, log_lam=draw(_HALVES),
                             per_feature=draw(st.booleans()), seed=draw(_SEEDS))

    return draw()


def logistic_problems(*, max_samples: int = 8, max_features: int = 4) -> st.SearchStrategy[BilevelProblem]:
    """Logistic regressions with per-feature L2 penalties (Newton; no closed form)."""

    @st.composite
    def draw(draw) -> BilevelProblem:
        n_features = draw(st.integers(1, max_features))
        n_samples = draw(st.integers(1, max_samples))
        return logistic_problem(n_samples=n_samples, n_features=n_features, log_lam=draw(_HALVES),
                                seed=draw(_SEEDS))

    return draw()


def mlp_proximal_problems(*, max_support: int = 6, max_hidden: int = 3) -> st.SearchStrategy[BilevelProblem]:
    """iMAML-style proximal problems on a tiny tanh network, ``x`` and ``θ`` dicts.

    Draws whose Hessian at the solution is not clearly positive definite (smallest
    eigenvalue below ``λ/20``) are rejected: they are not well posed.
    """

    @st.composite
    def draw(draw) -> BilevelProblem:
        hidden = draw(st.integers(1, max_hidden))
        n_support = draw(st.integers(1, max_support))
        lam = draw(st.sampled_from((2.0, 1.0, 5.0, 10.0)))
        problem = mlp_proximal_problem(n_support=n_support, hidden=hidden, lam=lam, seed=draw(_SEEDS))
        assume(problem.spectrum[0] >= lam / 20)
        return problem

    return draw()


def closed_form_problems(max_cond: float = 1000) -> st.SearchStrategy[BilevelProblem]:
    """Every family whose ``exact_hypergradient`` is known: quadratic, pytree, ridge."""
    return st.one_of(quadratic_problems(max_cond=max_cond), pytree_problems(max_cond=min(max_cond, 100)),
                     ridge_problems())


def bilevel_problems(max_cond: float = 1000) -> st.SearchStrategy[BilevelProblem]:
    """Any of the families above."""
    return st.one_of(closed_form_problems(max_cond), logistic_problems(), mlp_proximal_problems())


def _quadratics(x_layouts, param_layouts, max_cond, solvers, max_gd_cond, outer_uses_params):
    if not solvers:
        raise ValueError("solvers must name at least one of 'closed_form', 'gradient_descent'.")

    @st.composite
    def draw(draw) -> BilevelProblem:
        x_layout = draw(x_layouts)
        params_layout = draw(param_layouts)
        solver = draw(st.sampled_from(tuple(solvers)))
        limit = min(max_cond, max_gd_cond) if solver == "gradient_descent" else max_cond
        conds = [c for c in CONDITION_NUMBERS if c <= limit]
        cond = 1 if layout_size(x_layout) == 1 else draw(st.sampled_from(conds))
        uses = draw(st.booleans()) if outer_uses_params is None else outer_uses_params
        return quadratic_problem(x_layout=x_layout, params_layout=params_layout, cond=cond, seed=draw(_SEEDS),
                                 solver=solver, outer_uses_params=uses)

    return draw()
