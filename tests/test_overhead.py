"""What the whole call does once: the condition's graph built by the forward check serves
the backward pass, the residual at x0 is measured only when needed, data tensors are
checked for NaN/Inf once per version. Each test also checks the result against a closed form.
"""

import pytest
import torch

import implicitgrad as ig

DT = torch.float64


def _ridge(n=50, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    return X, y


def _counted(X, y):
    calls = {"n": 0}

    def objective(w, lam, X, y):
        calls["n"] += 1
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()

    def solver(f, w0, lam, X, y):
        return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=DT), X.T @ y)

    return objective, solver, calls


def _closed_form_grad(X, y, lam, w):
    a = X.T @ X + lam * torch.eye(X.shape[1], dtype=DT)
    return -(torch.linalg.solve(a, w) * w).sum()  # d/dλ of ‖w*‖²/2 is −w*ᵀA⁻¹w*


def test_one_evaluation_of_the_objective_serves_forward_and_backward():
    X, y = _ridge()
    objective, solver, calls = _counted(X, y)
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    w = ig.implicit_solve(objective, torch.zeros(5, dtype=DT), lam, X, y, solver=solver)
    assert calls["n"] == 1
    (0.5 * (w**2).sum()).backward()
    assert calls["n"] == 1  # the backward pass reused the forward check's graph
    torch.testing.assert_close(lam.grad, _closed_form_grad(X, y, lam.detach(), w.detach()))


def test_a_second_backward_builds_the_graph_again():
    X, y = _ridge()
    objective, solver, calls = _counted(X, y)
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    w = ig.implicit_solve(objective, torch.zeros(5, dtype=DT), lam, X, y, solver=solver)
    loss = 0.5 * (w**2).sum()
    (g1,) = torch.autograd.grad(loss, lam, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, lam)
    assert calls["n"] == 2
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(g1, _closed_form_grad(X, y, lam.detach(), w.detach()))


def test_without_grad_no_graph_is_kept_and_the_result_is_the_same():
    X, y = _ridge()
    objective, solver, calls = _counted(X, y)
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    with torch.no_grad():
        w = ig.implicit_solve(objective, torch.zeros(5, dtype=DT), lam, X, y, solver=solver)
    assert calls["n"] == 1 and not w.requires_grad
    torch.testing.assert_close(w, solver(None, None, lam.detach(), X, y))


def test_initial_residual_is_measured_on_first_access():
    X, y = _ridge()
    objective, solver, calls = _counted(X, y)
    lam = torch.tensor(0.3, dtype=DT)
    w0 = torch.ones(5, dtype=DT)
    _, info = ig.implicit_solve(objective, w0, lam, X, y, solver=solver, return_info=True)
    assert calls["n"] == 1 and info.forward_status == "converged"
    expected = float((X.T @ (X @ w0 - y) + lam * w0).norm())
    assert info.initial_residual == pytest.approx(expected, rel=1e-12)
    assert calls["n"] == 2
    assert info.initial_residual == pytest.approx(expected, rel=1e-12)
    assert calls["n"] == 2  # measured once
    assert info.initial_residuals is None


def test_unconverged_forward_measures_the_initial_residual_for_its_tolerance():
    X, y = _ridge()
    objective, _, calls = _counted(X, y)
    lam = torch.tensor(0.3, dtype=DT)
    w0 = torch.zeros(5, dtype=DT)
    with pytest.warns(ig.ImplicitGradWarning, match="not stationary"):
        _, info = ig.implicit_solve(objective, w0, lam, X, y, solver=lambda f, w, *a: w + 0.01,
                                    return_info=True)
    assert info.forward_status == "not_converged"
    assert info.initial_residual == pytest.approx(float((X.T @ y).norm()), rel=1e-12)


def test_nan_written_in_place_into_checked_data_is_caught():
    X, y = _ridge(n=1000, d=8)  # large enough for its check to be remembered
    objective, solver, _ = _counted(X, y)
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    for _ in range(2):
        ig.implicit_solve(objective, torch.zeros(8, dtype=DT), lam, X, y, solver=solver)
    X[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        ig.implicit_solve(objective, torch.zeros(8, dtype=DT), lam, X, y, solver=solver)


def test_captured_tensor_is_still_reported_with_the_graph_reused():
    X, y = _ridge()
    scale = torch.tensor(2.0, dtype=DT, requires_grad=True)

    def objective(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * scale * (w**2).sum()

    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    with pytest.warns(ig.ImplicitGradWarning, match="not among params"):
        ig.implicit_solve(objective, torch.zeros(5, dtype=DT), lam,
                          solver=lambda f, w, lam: torch.linalg.solve(
                              X.T @ X + 2 * lam * torch.eye(5, dtype=DT), X.T @ y))


def test_by_identity_finds_only_the_same_unmodified_tensors():
    from implicitgrad._identity import ByIdentity

    cache: ByIdentity[str] = ByIdentity(2)
    a, b, c = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    cache.put([a], "a")
    assert cache.get([a]) == "a" and cache.get([b]) is None
    assert cache.get([a.clone()]) is None  # equal values, another tensor
    a.add_(1.0)  # modified in place: its version moved on
    assert cache.get([a]) is None
    cache.put([a], "a2")
    cache.put([b], "b")
    cache.put([c], "c")  # beyond size 2: the least recently used (a) is dropped
    assert cache.get([a]) is None and cache.get([b]) == "b" and cache.get([c]) == "c"
    cache.put([b, c], "bc")
    assert cache.get([b, c]) == "bc" and cache.get([c, b]) is None
