"""What the leaner whole call relies on, checked directly.

* CG ends with status ``"nonfinite"`` (or a non-finite residual) whenever its right-hand
  side holds NaN/Inf, in each of its bookkeepings, so a finite outcome needs no second
  look at ``b`` (``LinearSolver._flags_nonfinite_rhs``); the affected systems still get NaN.
* The library's pytree flattening gives torch's leaves and specs and leaves no reference
  cycle behind.
* The forward residual taken in the problem's own dtype matches a float64 reference, and
  the graph walk still finds captured tensors and a condition that ignores ``x``.
"""

import collections
import gc
import math
import re
import warnings

import pytest
import torch
from torch.utils import _pytree as torch_pytree

import implicitgrad as ig
from implicitgrad._tree import tree_flatten, unflattener

DT = torch.float64


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=DT)
    return m @ m.T / n + torch.eye(n, dtype=DT)


BOOKKEEPINGS = {
    "scalar": {},
    "one_read": {"SCALAR_BOOKKEEPING": False},
    "device": {"HOST_SYSTEMS": 0},
}


@pytest.mark.parametrize("bookkeeping", sorted(BOOKKEEPINGS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("start", ["zero", "init", "preconditioned"])
def test_cg_flags_a_nonfinite_right_hand_side(monkeypatch, bookkeeping, bad, start):
    for name, value in BOOKKEEPINGS[bookkeeping].items():
        monkeypatch.setattr(ig.CG, name, value)
    a = _spd(12, 0)
    b = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=DT)
    b[4] = bad
    kwargs = {"preconditioner": lambda r: r / a.diagonal()} if start == "preconditioned" else {}
    solver = ig.CG(maxiter=30, tol=1e-10, check_every=1, **kwargs)
    init = torch.ones(12, dtype=DT) if start == "init" else None
    x, info = solver(lambda v: a @ v, b, init=init)
    assert info.status == "nonfinite" or not math.isfinite(info.residual)
    assert torch.isnan(x).all()


@pytest.mark.parametrize("bookkeeping", sorted(BOOKKEEPINGS))
def test_cg_poisons_only_the_system_with_a_nonfinite_right_hand_side(monkeypatch, bookkeeping):
    for name, value in BOOKKEEPINGS[bookkeeping].items():
        monkeypatch.setattr(ig.CG, name, value)
    a = torch.stack([_spd(6, 0), _spd(6, 1)])
    b = torch.randn(2, 6, generator=torch.Generator().manual_seed(2), dtype=DT)
    b[1, 2] = math.nan
    x, info = ig.CG(maxiter=50, tol=1e-12, check_every=1)(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b,
                                                           batch_ndim=1)
    assert info.status == "nonfinite"
    assert torch.isnan(x[1]).all() and torch.isfinite(x[0]).all()
    if bookkeeping != "device":  # the device bookkeeping stops the whole batch at the NaN
        torch.testing.assert_close(x[0], torch.linalg.solve(a[0], b[0]))


def test_cg_with_a_finite_right_hand_side_returns_the_solution():
    a = _spd(10, 3)
    b = torch.randn(10, generator=torch.Generator().manual_seed(4), dtype=DT)
    x, info = ig.CG(maxiter=100, tol=1e-12)(lambda v: a @ v, b)
    assert info.converged
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def test_implicit_solve_reports_a_nonfinite_incoming_gradient_and_returns_nan():
    a = _spd(5, 5)
    b = torch.randn(5, generator=torch.Generator().manual_seed(6), dtype=DT, requires_grad=True)

    def objective(x, b):
        return 0.5 * x @ a @ x - b @ x

    x = ig.implicit_solve(objective, torch.zeros(5, dtype=DT), b,
                          solver=lambda f, x0, b: torch.linalg.solve(a, b))
    with pytest.warns(ig.ImplicitGradWarning) as record:
        (grad,) = torch.autograd.grad((x * torch.tensor([1.0, math.inf, 0, 0, 0], dtype=DT)).sum(), b)
    messages = [str(w.message) for w in record]
    assert any("incoming gradient" in m for m in messages)
    assert any("CG: nonfinite" in m for m in messages)
    assert torch.isnan(grad).all()


NT = collections.namedtuple("NT", "a b")
TREES = [
    torch.zeros(2),
    (torch.zeros(1), 3, None),
    {"b": torch.ones(2), "a": [torch.zeros(1), (1.0, "x")]},
    NT(torch.zeros(1), [torch.ones(1)]),
    collections.OrderedDict(z=torch.zeros(1), a=1),
    collections.defaultdict(list, {"k": torch.zeros(1)}),
    [],
    (),
    {},
    None,
    5,
]


@pytest.mark.parametrize("tree", TREES, ids=range(len(TREES)))
def test_tree_flatten_is_torchs(tree):
    leaves, spec = tree_flatten(tree)
    want_leaves, want_spec = torch_pytree.tree_flatten(tree)
    assert spec == want_spec
    assert len(leaves) == len(want_leaves) and all(a is b for a, b in zip(leaves, want_leaves))
    rebuilt = torch_pytree.tree_unflatten(leaves, spec)
    assert torch_pytree.tree_flatten(rebuilt)[1] == want_spec


@pytest.mark.parametrize("tree", TREES, ids=range(len(TREES)))
def test_unflattener_rebuilds_as_torch_does(tree):
    leaves, spec = torch_pytree.tree_flatten(tree)
    fresh = [torch.full((1,), float(i)) for i in range(len(leaves))]
    got, want = unflattener(spec)(fresh), torch_pytree.tree_unflatten(fresh, spec)
    assert type(got) is type(want)
    got_leaves, got_spec = torch_pytree.tree_flatten(got)
    assert got_spec == spec and all(a is b for a, b in zip(got_leaves, fresh))


def test_tree_flatten_leaves_no_garbage_cycle():
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for tree in TREES:
            tree_flatten(tree)
        gc.collect()
        assert gc.garbage == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_residual_in_the_problems_dtype_matches_float64(dtype):
    g = torch.Generator().manual_seed(7)
    X = torch.randn(30, 4, generator=g, dtype=dtype)
    y = torch.randn(30, generator=g, dtype=dtype)
    lam = torch.tensor(0.5, dtype=dtype, requires_grad=True)

    def objective(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()

    w_off = torch.full((4,), 0.3, dtype=dtype)  # not the minimiser: a residual to measure
    _, info = ig.implicit_solve(objective, torch.zeros(4, dtype=dtype), lam, solver=lambda f, w0, lam: w_off,
                                on_failure="ignore", return_info=True)
    Xd, yd, wd = X.double(), y.double(), w_off.double()
    want = torch.linalg.vector_norm(Xd.T @ (Xd @ wd - yd) + 0.5 * wd).item()
    assert math.isclose(info.forward_residual, want, rel_tol=1e-5 if dtype == torch.float32 else 1e-12)


def test_graph_walk_still_finds_a_captured_tensor_and_a_condition_without_x():
    scale = torch.tensor(2.0, dtype=DT, requires_grad=True)
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    with pytest.warns(ig.ImplicitGradWarning, match="not among params"):
        ig.implicit_solve(lambda w, lam: 0.5 * scale * lam * (w**2).sum(), torch.zeros(3, dtype=DT), lam,
                          solver=lambda f, w0, lam: torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="does not depend on x"):
        ig.root_solve(lambda x, lam: lam * torch.ones(3, dtype=DT), torch.zeros(3, dtype=DT), lam,
                      solver=lambda f, x0, lam: x0)


@pytest.mark.parametrize("mode", ["implicit", "unrolled"])
@pytest.mark.parametrize("where", ["hyperparameter", "data"])
def test_a_nonfinite_parameter_is_named_in_both_modes(mode, where):
    g = torch.Generator().manual_seed(8)
    X, y = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    if where == "hyperparameter":
        lam = torch.tensor(math.nan, dtype=DT, requires_grad=True)
    else:
        X[2, 1] = math.inf

    def objective(w, lam, X, y):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()

    shape = "()" if where == "hyperparameter" else "(20, 3)"
    with pytest.raises(ValueError, match=rf"shape {re.escape(shape)} contains NaN/Inf"):
        ig.implicit_solve(objective, torch.zeros(3, dtype=DT), lam, X, y, mode=mode,
                          solver=ig.solvers.GradientDescent(lr=0.01, maxiter=3))


def test_one_tensor_layout_still_checks_the_solvers_output():
    def objective(w, lam):
        return 0.5 * lam * (w**2).sum()

    lam = torch.tensor(2.0, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="structure"):
        ig.implicit_solve(objective, torch.zeros(3, dtype=DT), lam, solver=lambda f, w, lam: (w,))
    with pytest.raises(ValueError, match="has shape"):
        ig.implicit_solve(objective, torch.zeros(3, dtype=DT), lam, solver=lambda f, w, lam: torch.zeros(4, dtype=DT))
    w = ig.implicit_solve(objective, torch.zeros(3, dtype=DT), lam, solver=lambda f, w, lam: torch.zeros(3))
    assert w.dtype == DT  # a float32 output is cast to x0's dtype
    # A tuple x0 and params given as a tuple: the structure comes back as it went in.
    out = ig.implicit_solve(lambda x, lam: 0.5 * lam * ((x[0] - 1) ** 2 + (x[1] + 1) ** 2).sum(),
                            (torch.zeros(2, dtype=DT), torch.zeros(2, dtype=DT)), lam,
                            solver=lambda f, x, lam: (torch.ones(2, dtype=DT), -torch.ones(2, dtype=DT)))
    assert isinstance(out, tuple) and len(out) == 2
    (g,) = torch.autograd.grad(out[0].sum() + out[1].sum(), lam)
    torch.testing.assert_close(g, torch.zeros((), dtype=DT))  # x* = (1, −1) does not depend on λ


def test_opposite_infinities_in_the_solution_are_reported():
    def objective(w, lam):
        return 0.5 * lam * (w**2).sum()

    lam = torch.tensor(2.0, dtype=DT, requires_grad=True)
    with pytest.raises(ig.ConvergenceError, match="NaN/Inf"):
        ig.implicit_solve(objective, torch.zeros(2, dtype=DT), lam, on_failure="raise",
                          solver=lambda f, w, lam: torch.tensor([math.inf, -math.inf], dtype=DT))


def _ones(f, w0, lam):
    return torch.ones(3, dtype=DT)


def test_a_function_that_captures_a_tensor_is_reported_at_every_call():
    scale = torch.tensor(2.0, dtype=DT, requires_grad=True)
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)

    def objective(w, lam):
        return 0.5 * scale * lam * ((w - 1) ** 2).sum()

    for _ in range(3):
        with pytest.warns(ig.ImplicitGradWarning, match="not among params"):
            ig.implicit_solve(objective, torch.zeros(3, dtype=DT), lam, solver=_ones)


def test_a_function_that_captures_later_is_reported_when_it_does():
    """Clean at first (a frozen module), capturing later (unfrozen): the walk runs at every
    call, so the call after the change is reported; another instance of a method too."""

    class Problem:
        def __init__(self, captured):
            self.captured = captured

        def objective(self, w, lam):
            return 0.5 * lam * self.captured * ((w - 1) ** 2).sum()

    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    problem = Problem(torch.tensor(2.0, dtype=DT))
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ig.ImplicitGradWarning)
            w = ig.implicit_solve(problem.objective, torch.zeros(3, dtype=DT), lam, solver=_ones)
        (g,) = torch.autograd.grad(w.sum(), lam)
        torch.testing.assert_close(g, torch.zeros((), dtype=DT))  # x* = 1 whatever λ
    problem.captured.requires_grad_(True)
    with pytest.warns(ig.ImplicitGradWarning, match="not among params"):
        ig.implicit_solve(problem.objective, torch.zeros(3, dtype=DT), lam, solver=_ones)
    leaky = Problem(torch.tensor(2.0, dtype=DT, requires_grad=True))
    with pytest.warns(ig.ImplicitGradWarning, match="not among params"):  # same function, other instance
        ig.implicit_solve(leaky.objective, torch.zeros(3, dtype=DT), lam, solver=_ones)


def test_a_condition_without_x_is_refused_at_every_call():
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)

    def residual(x, lam):
        return lam * torch.ones(3, dtype=DT)

    for _ in range(2):
        with pytest.raises(ValueError, match="does not depend on x"):
            ig.root_solve(residual, torch.zeros(3, dtype=DT), lam, solver=lambda f, x0, lam: x0)
