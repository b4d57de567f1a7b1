"""Defaults and validation each have one home: implicitgrad._defaults and _validation.

Changing a row of the table changes what the linear solvers, the inner solvers, the
forward check and check_hypergradient do; bad settings get the same error everywhere."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import implicitgrad as ig
from implicitgrad import _defaults
from implicitgrad._validation import SettingError

DT = torch.float64


@pytest.fixture
def table(monkeypatch):
    def set_row(**changes):
        row = dataclasses.replace(_defaults.TABLE[DT], **changes)
        monkeypatch.setitem(_defaults.TABLE, DT, row)
    return set_row


def _quadratic(x, t):
    return 0.5 * (torch.arange(1.0, 7.0, dtype=DT) * x ** 2).sum() - (t * x).sum()


def test_every_row_is_ordered_from_fine_to_coarse():
    rows = [_defaults.tolerances(d) for d in (torch.float64, torch.float32, torch.float16)]
    for field in ("linear", "inner", "forward"):
        values = [getattr(r, field) for r in rows]
        assert values == sorted(values) and all(0 < v < 1 for v in values)
    assert _defaults.tolerances(torch.int64) is _defaults.OTHER


def test_linear_solvers_read_the_table(table):
    A = torch.diag(torch.logspace(0, 3, 30, dtype=DT))
    b = torch.ones(30, dtype=DT)
    _, fine = ig.CG()(lambda v: A @ v, b)
    table(linear=1e-2)
    _, coarse = ig.CG()(lambda v: A @ v, b)
    assert fine.residual <= 1e-10 < 1e-4 < coarse.residual <= 1e-2
    assert coarse.iterations < fine.iterations


def test_inner_solvers_read_the_table(table):
    t = torch.ones(6, dtype=DT)
    solver = ig.solvers.GradientDescent(lr=0.1, maxiter=5000)
    _, fine = solver.run(_quadratic, torch.zeros(6, dtype=DT), t)
    table(inner=1e-2)
    _, coarse = solver.run(_quadratic, torch.zeros(6, dtype=DT), t)
    assert coarse.iterations < fine.iterations


def test_the_forward_check_reads_the_table(table):
    t = torch.ones(6, dtype=DT, requires_grad=True)
    approximate = lambda f, x0, t: t / torch.arange(1.0, 7.0, dtype=DT) + 1e-5  # noqa: E731
    with pytest.warns(ig.ImplicitGradWarning, match="not stationary"):
        ig.implicit_solve(_quadratic, torch.zeros(6, dtype=DT), t, solver=approximate)
    table(forward=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ig.ImplicitGradWarning)
        ig.implicit_solve(_quadratic, torch.zeros(6, dtype=DT), t, solver=approximate)


def test_check_hypergradient_reads_the_table(table):
    table(check=dict(_defaults.TABLE[DT].check, eps=0.25))
    t = torch.ones(6, dtype=DT, requires_grad=True)
    report = ig.testing.check_hypergradient(
        _quadratic, torch.zeros(6, dtype=DT), t, solver=lambda f, x0, t: t / torch.arange(1.0, 7.0, dtype=DT),
        outer=lambda x: (x ** 2).sum(), references=("finite_differences",))
    assert report.settings["eps"] == 0.25


@pytest.mark.parametrize("make", [
    lambda on_failure, tol: ig.implicit_solve(_quadratic, torch.zeros(6, dtype=DT), torch.ones(6, dtype=DT),
                                              solver=lambda f, x, t: x, on_failure=on_failure, forward_tol=tol),
    lambda on_failure, tol: _Layer(solver=lambda f, x, *a: x, on_failure=on_failure, forward_tol=tol),
])
def test_on_failure_and_forward_tol_are_checked_alike(make):
    with pytest.raises(SettingError, match="on_failure must be one of"):
        make("sometimes", None)
    with pytest.raises(SettingError, match="forward_tol must be a positive number"):
        make("warn", -1.0)


class _Layer(ig.nn.ImplicitLayer):
    def objective(self, x, inputs, params):
        return (x ** 2).sum()
