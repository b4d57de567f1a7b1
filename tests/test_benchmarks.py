"""The benchmark suite runs end to end and its gradient-agreement checks pass.

Timings are not asserted (the machine is shared); what must hold is that every pair of
implementations compared computes the same gradient, and that the JSON, markdown, reST
tables and plots are written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
SECTIONS = ("backward", "memory", "accuracy", "batched", "krylov", "deq", "qp", "call", "tta", "warm")


def _run(args, tmp_path: Path, env=None):
    proc = subprocess.run(
        [sys.executable, str(RUN), *args], cwd=ROOT, capture_output=True, text=True,
        env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path = out / "results" / "bench.json"
    proc = _run(["--quick", "--out", str(out), "--json", str(json_path)], out)
    return out, json.loads(json_path.read_text()), proc.stdout


def test_quick_run_writes_every_output(quick_run):
    out, results, stdout = quick_run
    for name in ("benchmarks.md", "tables.rst", "backward.png", "memory.png", "accuracy.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{name} missing"
    assert (out / "backward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(SECTIONS) <= set(results)
    machine = results["machine"]
    for key in ("cpu", "cpu_count", "torch_threads", "torch", "device"):
        assert machine[key] not in (None, ""), key
    assert "| problem |" in stdout and "Gradient-agreement checks: all passed" in stdout
    assert ".. list-table::" in (out / "tables.rst").read_text()


def test_quick_run_gradient_checks_pass(quick_run):
    _, results, _ = quick_run
    assert results["checks_ok"]
    expected = {"backward/logistic", "backward/imaml_mlp", "batched"}
    assert expected <= set(results["checks"])
    for name, check in results["checks"].items():
        assert check["ok"], f"{name}: {check}"
        assert check["max_rel_diff"] <= check["tol"]
        assert check["pairs"], f"{name} compared nothing"
    for case in results["backward"]["cases"].values():
        assert case["check"]["implicitgrad_backward_iterations"] == case["K"]


def test_quick_run_timings_are_medians_of_interleaved_rounds(quick_run):
    _, results, _ = quick_run
    reps = results["settings"]["reps"]
    assert reps >= 7
    for case in results["backward"]["cases"].values():
        for name, times in case["times_s"].items():
            assert len(times) == reps
            assert case["median_s"][name] == pytest.approx(sorted(times)[reps // 2])
    mem = results["memory"]
    for method in mem["methods"]:
        peaks = [mem["peak_mib"][method][str(T)] for T in mem["steps"]]
        assert all(p >= 0 for p in peaks), (method, peaks)


def test_accuracy_curves_reach_the_reference(quick_run):
    _, results, _ = quick_run
    acc = results["accuracy"]
    # Well conditioned: CG and GMRES reach rounding level within the quick iteration counts.
    for method in ("CG", "GMRES"):
        assert acc["logistic_well"]["rel_error"][method][-1] < 1e-10
    assert acc["imaml_synthetic"]["rel_error"]["iMAML (CG steps)"][-1] < 1e-10


def test_krylov_rows_count_products_and_time_them_against_the_matvec(quick_run):
    _, results, stdout = quick_run
    cases = results["krylov"]["cases"]
    assert set(cases) == {"symmetric", "deq", "deq_batched", "root"}
    assert set(cases["symmetric"]["iterations"]) == {"CG", "MINRES"}
    for key in ("deq", "deq_batched", "root"):
        assert set(cases[key]["iterations"]) == {"GMRES", "BiCGStab"}
    for case in cases.values():
        assert all(status == "converged" for status in case["check"]["statuses"].values())
        for name, iterations in case["iterations"].items():
            assert iterations > 1
            assert case["per_iteration_s"][name] > 0 and case["per_matvec_s"][name] > 0
            assert case["overhead"][name] > 0
    assert "Krylov solvers: time per iteration against the bare matvec" in stdout


def test_runs_without_torchopt_and_higher(tmp_path):
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    for name in ("torchopt", "higher"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} hidden for this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    json_path = tmp_path / "r.json"
    proc = _run(["--quick", "--only", "backward", "--out", str(tmp_path), "--json", str(json_path)], tmp_path, env)
    assert "torchopt is not installed" in proc.stdout
    results = json.loads(json_path.read_text())
    assert results["peers"] == {"torchopt": None, "higher": None}
    for case in results["backward"]["cases"].values():
        assert set(case["median_s"]) == {"implicitgrad", "floor"}
    assert "not installed" in (tmp_path / "benchmarks.md").read_text()


def test_imaml_damping_moves_the_meta_gradient_towards_first_order():
    """The damping study runs; larger damping shrinks the meta-gradient and turns it first order."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import imaml_damping

    rows = imaml_damping.main(["--quick"])
    damping = sorted(rows)
    assert rows[0.0]["cos_undamped"] == pytest.approx(1.0, abs=1e-6)
    norms = [rows[d]["norm_ratio"] for d in damping]
    assert all(a > b for a, b in zip(norms, norms[1:]))
    assert rows[damping[-1]]["cos_first_order"] > rows[0.0]["cos_first_order"]
    assert rows[damping[-1]]["cos_first_order"] > 0.999


def test_whole_call_rows_cover_both_problems_at_both_K(quick_run):
    _, results, stdout = quick_run
    call = results["call"]
    assert {(case["problem"], case["K"]) for case in call["cases"].values()} == {
        (problem, K) for problem in ("logistic", "imaml_mlp") for K in (5, 20)}
    for case in call["cases"].values():
        assert case["check"]["ok"] and case["check"]["pairs"]
        assert set(case["median_s"]) == {"implicitgrad", "floor"}
        assert case["ratios"]["implicitgrad/floor"] > 0
    assert "Whole call (forward + outer loss + hypergradient)" in stdout
    for case in call["cases"].values():  # the lean reference: agreed in float64, timed with the two
        assert len(case["check"]["pairs"]) == 3 and case["lean"]["ratio_to_floor"] > 0
    assert "lean call (floor + the same checks) / floor" in stdout


def test_time_to_accuracy_curves_and_plot(quick_run):
    out, results, stdout = quick_run
    tta = results["tta"]
    curves = tta["curves"]
    assert {"implicitgrad cold", "floor"} <= set(curves)
    cold, floor = curves["implicitgrad cold"], curves["floor"]
    assert cold["K"] == floor["K"] == tta["grid"]
    # Same K steps of CG from zero: implicitgrad and the floor compute the same hypergradient.
    for a, b in zip(cold["rel_error"], floor["rel_error"]):
        assert a == pytest.approx(b, rel=1e-2)
    assert cold["rel_error"][-1] < cold["rel_error"][0] < 1
    assert floor["products"] == tta["grid"]
    if "TorchOpt" in curves:
        assert curves["TorchOpt"]["products"] == [k + 1 for k in tta["grid"]]
    if tta["jax"] is not None:
        assert results["checks"]["tta/jaxopt"]["ok"]
        assert "JAXopt" in curves and "JAXopt call" in tta["jaxopt"]["median_s"]
        assert "--xla_cpu_multi_thread_eigen=false" in tta["xla_flags"]
    else:
        assert any("JAXopt skipped" in note for note in tta["notes"])
    if hasattr(os, "sched_setaffinity"):
        assert len(tta["cpus"]) == 1  # torch and XLA share one core: threads matched by the OS
    png = out / "time_to_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Time to accuracy (logistic)" in stdout


def test_warm_start_counts_add_up(quick_run):
    _, results, stdout = quick_run
    warm = results["warm"]
    for key in ("hpo", "hpo_small_steps", "meta"):
        run = warm[key]
        assert run["cold_total"] == sum(run["cold"]) and run["warm_total"] == sum(run["warm"])
        assert len(run["cold"]) == len(run["warm"]) == run["steps"]
        # The first outer step has nothing to start from: warm and cold are the same solve.
        assert run["warm"][0] == run["cold"][0] > 0
        assert run["ratio"] == pytest.approx(run["cold_total"] / run["warm_total"])
        if run["recycle"] is not None:
            assert run["recycled_total"] == sum(run["recycled"])
            # First step, nothing stored: the library's count of the same cold CG matches the matvec count.
            assert run["recycled"][0] == run["cold"][0]
        library = run["library"]
        if library is not None:
            # Warm-started or not, a solve to the same tolerance gives the same hypergradient.
            assert library["max_error_cold"] < 1e-6 and library["max_error_warm"] < 1e-6
            assert library["cold_total"] > 0 and library["warm_total"] > 0
    assert "Warm starts: products to a 1e-6 hypergradient" in stdout
    imaml = warm["imaml"]  # IMAML itself, one learner per warm_start setting on the same model
    template = f"ig.WarmStart(recycle={warm['hpo']['recycle']}, extrapolate=True)"
    assert set(imaml["products"]) == {"False", "True", template}
    assert all(n > 0 for n in imaml["products"].values())
    assert max(imaml["max_difference"].values()) < 1e-6
    assert "Warm starts in ig.meta.IMAML (task pool)" in stdout


def _bench_module(name):
    sys.path[:0] = [str(ROOT / "benchmarks")]
    try:
        return __import__(name)
    finally:
        del sys.path[0]


def test_products_to_tolerance_is_the_smallest_budget_found():
    """The search returns a budget that meets the tolerance while one product fewer does not,
    and a warm start at the solution costs only its initial residual."""
    import torch

    bench_warm = _bench_module("bench_warm")
    gen = torch.Generator().manual_seed(0)
    n = 40
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    a = q @ torch.diag(torch.logspace(0, 3, n, dtype=torch.float64)) @ q.T
    c = torch.randn(n, dtype=torch.float64, generator=gen)
    d = torch.randn(n, dtype=torch.float64, generator=gen)

    def objective(x, theta):
        return 0.5 * x @ a @ x - (theta * x).sum()

    system = bench_warm.System(objective, lambda x: (c * x).sum() + 0.5 * (x * x).sum(), d,
                               torch.zeros(n, dtype=torch.float64))
    # ∇ₓf = A x − θ, so the hypergradient is A⁻¹ ∇ₓL, by a dense solve independent of the search.
    expected = torch.linalg.solve(a, c + d)
    assert torch.allclose(system.reference, expected, rtol=1e-10, atol=0)
    products, u = system.products_to(1e-6, None)
    assert system.error(u) <= 1e-6
    assert system.attempt(products - 1, None)[0] > 1e-6
    exact_products, _ = system.products_to(1e-6, expected)
    assert exact_products == 1


def test_tta_notes_jax_absent(monkeypatch):
    bench_tta = _bench_module("bench_tta")
    monkeypatch.setitem(sys.modules, "jaxopt", None)
    reason = bench_tta.jax_available()
    assert reason is not None and "pip install" in reason
