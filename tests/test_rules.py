"""The differentiation rules are pure functions of (condition, x, θ, cotangent / tangent, solve),
checked here without any autograd Function, against dense closed forms."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import implicitgrad as ig
from implicitgrad._linearize import linearize
from implicitgrad._problem import BUILDERS, Codec
from implicitgrad._rules import linear_solve_jvp, linear_solve_vjp, root_jvp, root_vjp
from implicitgrad._tree import tree_flatten

DT = torch.float64
G = torch.Generator().manual_seed(5)
M = torch.randn(4, 4, generator=G, dtype=DT)
S = M @ M.T + 4 * torch.eye(4, dtype=DT)      # symmetric positive definite
N = 0.3 * torch.randn(4, 4, generator=G, dtype=DT)  # a contraction's Jacobian
C = torch.randn(4, 3, generator=G, dtype=DT)

# (form, function, A = ∂ₓF, B = ∂_θF) with F linear in x and θ: F = A x − B' θ style.
FORMS = {
    "objective": (lambda x, t: 0.5 * x @ S @ x - (C @ t) @ x, S, -C),
    "residual": (lambda x, t: (S + N) @ x - C @ t, S + N, -C),
    "mapping": (lambda x, t: N @ x + C @ t, torch.eye(4, dtype=DT) - N, -C),
}


def _condition(form):
    fn = FORMS[form][0]
    x0, theta = torch.zeros(4, dtype=DT), torch.ones(3, dtype=DT)
    (xl, xs), (pl, ps) = tree_flatten(x0), tree_flatten((theta,))
    return BUILDERS[form](fn, Codec(xs, tuple(xl), ps, tuple(pl)))


def _dense_solve(lin, transpose, b):
    """Form A column by column from the linearisation's products and solve densely."""
    op = lin.rmatvec if transpose else lin.matvec
    cols = torch.stack([op([e])[0] for e in torch.eye(b[0].numel(), dtype=DT)], -1)
    return [torch.linalg.solve(cols, b[0])]


@pytest.mark.parametrize("form", FORMS)
def test_symmetric_flag_only_for_the_objective(form):
    assert _condition(form).symmetric is (form == "objective")


@pytest.mark.parametrize("differentiable", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_root_vjp_and_jvp_against_closed_forms(form, differentiable):
    _, A, B = FORMS[form]
    cond = _condition(form)
    x, theta = [torch.randn(4, generator=G, dtype=DT)], [torch.randn(3, generator=G, dtype=DT)]
    v = [torch.randn(4, generator=G, dtype=DT)]
    (grad,) = root_vjp(cond, x, theta, v, [True], _dense_solve, differentiable)
    torch.testing.assert_close(grad, -B.T @ torch.linalg.solve(A.T, v[0]))
    t_dot = [torch.randn(3, generator=G, dtype=DT)]
    (x_dot,) = root_jvp(cond, x, theta, t_dot, _dense_solve, differentiable)
    torch.testing.assert_close(x_dot, -torch.linalg.solve(A, B @ t_dot[0]))


def test_linear_solve_rules_for_a_nonlinear_condition():
    """F = x³ + θ x − 1 elementwise: A = diag(3x² + θ); d(A⁻¹b)/dθ and −∂⟨w, A z⟩ checked by hand."""
    fn = lambda x, t: x ** 3 + t * x - 1  # noqa: E731
    x0, theta = torch.zeros(3, dtype=DT), torch.tensor([2.0, 3.0, 4.0], dtype=DT)
    (xl, xs), (pl, ps) = tree_flatten(x0), tree_flatten((theta,))
    cond = BUILDERS["residual"](fn, Codec(xs, tuple(xl), ps, tuple(pl)))
    x = torch.tensor([0.5, 0.25, 0.2], dtype=DT)
    a = 3 * x ** 2 + theta
    b = torch.tensor([1.0, -1.0, 2.0], dtype=DT)
    z = b / a
    w = torch.tensor([0.3, 0.1, -0.2], dtype=DT)
    gx, gp = linear_solve_vjp(cond, [x], [theta], [z], [w], False, [True], [True])
    torch.testing.assert_close(gx[0], -w * 6 * x * z)
    torch.testing.assert_close(gp[0], -w * z)
    t_dot = torch.tensor([1.0, 0.0, -1.0], dtype=DT)
    (rhs,) = linear_solve_jvp(cond, [x], [theta], [z], False, [None], [t_dot], [None])
    torch.testing.assert_close(rhs, -t_dot * z)
    lin = linearize(cond, [x], [theta], [False], differentiable=False)
    torch.testing.assert_close(lin.matvec([z])[0], b)


CORE = ["_api.py", "_functions.py", "_forward.py", "_linear.py", "_linearize.py", "_rules.py"]


@pytest.mark.parametrize("name", CORE)
def test_no_switch_on_the_kind_of_condition_outside_the_builders(name):
    source = (pathlib.Path(ig.__file__).parent / name).read_text()
    assert not re.search(r"kind\s*[!=]=|\.kind\b", source)
