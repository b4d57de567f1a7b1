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
SECTIONS = ("backward", "memory", "accuracy", "batched", "krylov", "deq", "qp")


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
