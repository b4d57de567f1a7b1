"""The constrained / nonsmooth examples: their quick modes run and show what they claim.

``ImplicitGradWarning`` is an error under pytest, so these runs also check that every inner
problem and every backward solve converges.
"""

from test_examples_hpo import examples_path, run_quick  # noqa: F401 - the shared fixtures


def test_hpo_lasso(run_quick):  # noqa: F811 - the imported fixture
    m = run_quick("hpo_lasso")
    assert m["path_max_gap_to_sklearn"] < 1e-8
    assert m["hypergradient_rel_error_lasso"] < 1e-7
    assert m["hypergradient_rel_error_elastic_net"] < 1e-7
    assert m["val_loss_after_lasso"] < m["val_loss_before"]
    assert m["val_loss_after_elastic_net"] < m["val_loss_before"]
    solvers = m["solvers"]
    assert all(r["relative_difference"] < 1e-8 for r in solvers.values())
    assert solvers["ProximalGradient (FISTA)"]["iterations"] < solvers["ProximalGradient (ISTA)"]["iterations"]
    assert solvers["AndersonAcceleration"]["iterations"] < solvers["FixedPointIteration"]["iterations"]


def test_hpo_svm(run_quick):  # noqa: F811 - the imported fixture
    m = run_quick("hpo_svm")
    assert m["hypergradient_rel_error"] < 1e-7
    assert m["val_loss_after"] < m["val_loss_before"]
    assert m["test_accuracy_after"] > m["test_accuracy_before"]
    assert 1 <= m["mean_support_per_sample"] < 10  # the simplex constraints bind
    solvers = m["solvers"]
    assert all(r["relative_difference"] < 1e-8 for r in solvers.values())
    assert solvers["ProjectedGradient (FISTA)"]["iterations"] < solvers["FixedPointIteration"]["iterations"]
    assert solvers["AndersonAcceleration"]["iterations"] < solvers["FixedPointIteration"]["iterations"]
