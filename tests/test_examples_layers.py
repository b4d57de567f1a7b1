"""The layer examples: their quick modes run and show what they claim.

``ImplicitGradWarning`` is an error under pytest, so these runs also check that every
forward solve (each DEQ sample, each QP of every batch) and every backward solve converges.
"""

import pytest
from test_examples_hpo import examples_path, run_quick  # noqa: F401 - the shared fixtures


def test_deq_digits(run_quick):  # noqa: F811 - the imported fixture
    m = run_quick("deq_digits")
    for mode in ("implicit", "phantom", "unrolled"):
        assert m[f"{mode}_test_accuracy"] > 0.9, mode
    # The approximations are measurably not the gradient of the layer, Jacobian-free the furthest.
    assert 1e-4 < m["phantom_gradient_rel_error"] < m["jacobian_free_gradient_rel_error"] < 1
    assert m["phantom_gradient_cosine"] > m["jacobian_free_gradient_cosine"] > 0.5
    assert m["implicit_mean_forward_iterations"] < 30  # Anderson against the 30 unrolled steps


def test_qp_layer(run_quick):  # noqa: F811 - the imported fixture
    m = run_quick("qp_layer")
    assert m["test_mse"] < 0.1 * m["initial_test_mse"]
    assert m["max_qp_iterations"] <= 30
    if "qpth_gradient_rel_diff" not in m:
        pytest.skip("qpth is not installed: the agreement with qpth was not measured")
    assert m["qpth_solution_max_diff"] < 1e-6
    assert m["qpth_gradient_rel_diff"] < 1e-5
