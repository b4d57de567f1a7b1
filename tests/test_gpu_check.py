"""The GPU check, tested on the CPU.

* the synchronisation count and its budget, with the host-read stand-in for torch's
  sync debug mode: it counts what it should, and a solver that reads its residual at
  every iteration breaks the budget (so the CUDA test cannot pass vacuously);
* the computations of tests/test_cuda.py, run here: their counts within the budget,
  their float32 results close enough to float64 for a 1e-5 comparison across devices;
* ``python -m implicitgrad.testing.gpu_check``: the "no CUDA device: skipped" report and
  exit status 0 on this machine, the installation decision, the report's contents.
"""

from __future__ import annotations

import json
import subprocess
import warnings

import device_cases as cases
import pytest
import torch

import implicitgrad as ig
from implicitgrad.testing import gpu_check
from implicitgrad.testing.syncs import (
    HOST_READS,
    SYNC_WARNING,
    assert_sync_budget,
    count_syncs,
    cuda_sync_debug_mode,
    host_reads,
    sync_budget,
)

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the path of a machine without CUDA")


# ------------------------------------------------------------------ counting
def test_sync_budget_is_one_per_check_plus_a_constant():
    assert sync_budget(200, 10, 16) == 36
    assert sync_budget(201, 10, 0) == 21
    assert sync_budget(7, 1, 2) == 9
    assert sync_budget(0, 10, 3) == 3


@pytest.mark.parametrize("args", [(-1, 10, 0), (10, 0, 0), (10, 1, -1)])
def test_sync_budget_rejects_bad_arguments(args):
    with pytest.raises(ValueError, match="must be"):
        sync_budget(*args)


def test_host_reads_counts_every_read_and_nothing_else():
    t = torch.arange(4.0)
    with count_syncs(host_reads) as quiet:
        u = (t * 2).exp().sum() + t.max()
    with count_syncs(host_reads) as loud:
        u.item()
        t.tolist()
        bool(u > 0)
        float(u)
        int(t[1])
        [0, 1, 2][t[2].long()]
        for _ in range(3):
            t[0].item()
    assert quiet.count == 0
    assert loud.count == 9
    assert all(site.startswith(__file__) for site in loud.sites)
    assert loud.summary().splitlines()[0].strip().startswith("3 × ")


def test_host_reads_restores_the_tensor_methods_even_after_an_error():
    before = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}
    with pytest.raises(RuntimeError, match="inside"):
        with count_syncs(host_reads):
            raise RuntimeError("inside")
    assert {name: torch.Tensor.__dict__.get(name) for name in HOST_READS} == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        float(torch.ones(()))  # no stray warning once the block is left


def test_other_warnings_pass_through_and_do_not_count():
    with pytest.warns(ig.ImplicitGradWarning, match="kept"), pytest.warns(UserWarning, match="another text"):
        with count_syncs(host_reads) as syncs:
            warnings.warn("kept", ig.ImplicitGradWarning, stacklevel=1)
            warnings.warn("another text", UserWarning, stacklevel=1)
    assert syncs.count == 0


def test_only_the_sync_text_counts():
    def source():
        return warnings.catch_warnings()  # a source that adds nothing

    with count_syncs(source) as syncs:
        warnings.warn(SYNC_WARNING, UserWarning, stacklevel=1)
        warnings.warn(SYNC_WARNING, UserWarning, stacklevel=1)
    assert syncs.count == 2


def _reading_cg(matvec, b, iterations=cases.ITERATIONS):
    """CG that reads its residual norm to the host at every iteration (and never stops)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for _ in range(iterations):
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        if float(r.norm()) < 0:  # the per-iteration host read under test
            break
        rr, rr_old = r @ r, rr
        p = r + (rr / rr_old) * p
    return x


def test_budget_catches_a_solver_that_reads_every_iteration():
    d = cases.system("cpu")
    A = d["A"]
    t = d["b"].clone().requires_grad_(True)
    x = ig.implicit_solve(lambda x, t: 0.5 * x @ (A @ x) - t @ x, torch.zeros_like(t), t,
                          solver=lambda f, x0, t: torch.linalg.solve(A, t), linear_solver=_reading_cg,
                          on_failure="ignore")
    with count_syncs(host_reads) as syncs:
        x.square().sum().backward()
    assert syncs.count >= cases.ITERATIONS
    with pytest.raises(AssertionError, match=r"budget is ⌈200/10⌉ \+ 16 = 36(.|\n)*test_gpu_check.py"):
        assert_sync_budget(syncs, iterations=cases.ITERATIONS, check_every=10, per_call=cases.PER_CALL,
                           what="a reading CG")


@NO_CUDA
def test_cuda_sync_debug_mode_needs_a_device():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        with count_syncs(cuda_sync_debug_mode):
            pass


# ------------------------------------------------------------------ test_cuda.py's computations, here
@pytest.mark.parametrize("every", cases.CHECK_INTERVALS)
@pytest.mark.parametrize("kind,name", cases.SYNC_CASES)
def test_host_reads_bounded(kind, name, every):
    syncs, iterations, per_call = cases.counted(kind, name, every, "cpu", host_reads)
    assert iterations >= cases.ITERATIONS
    cases.check_syncs(syncs, iterations, every, per_call, f"{name} {kind}")


@pytest.mark.parametrize("compile", [False, {"backend": "aot_eager"}], ids=["eager", "compiled"])
def test_the_captured_step_reads_nothing_and_verifies_like_eager(compile):
    """The step test_cuda.py captures in a CUDA graph: no host read on the CPU stand-in (each
    would be a synchronisation that breaks the capture), and its deferred checks, read by
    verify(), equal the eager call's reports."""
    step, start = cases.fixed_iteration_problem("cpu", compile=compile)
    step(start.clone().requires_grad_(True))
    with count_syncs(host_reads) as syncs:
        grad, info = step(start.clone().requires_grad_(True))
    assert syncs.count == 0, syncs.summary()
    assert torch.isfinite(grad).all()
    info.verify(on_failure="ignore")
    assert info.forward_status == "not_converged"  # 20 steps, by design
    assert info.backward.iterations == 10 and info.backward.status == "max_iterations"  # tol=1e-30


@pytest.mark.parametrize("case", list(cases.DEVICE_CASES))
def test_device_cases_allow_a_float32_comparison(case):
    """float32 agrees with float64 within the cross-device tolerance of float32: a larger
    difference between CUDA and the CPU would come from the device, not the problem."""
    low, high = (cases.DEVICE_CASES[case]("cpu", dt) for dt in (torch.float32, torch.float64))
    assert set(low) == set(high)
    for name in high:
        assert torch.isfinite(high[name]).all()
        assert cases.rel_diff(low[name], high[name]) <= cases.DEVICE_RTOL[torch.float32], name


def test_many_problems_vmap_equals_the_loop():
    problems = cases.ManyProblems(16, "cpu")
    assert cases.rel_diff(problems.vmapped(), problems.loop()) <= 1e-10


@pytest.mark.parametrize("method", ["imaml", "maml"])
def test_meta_learners_of_the_memory_test_run(method):
    learner, tasks = cases.meta_learner(method, 3, "cpu")
    loss = learner.meta_step(tasks)
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learner.model.parameters())


# ------------------------------------------------------------------ the command
@NO_CUDA
def test_without_cuda_the_command_reports_skipped_and_exits_0(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)], gpus=[]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["summary"] == gpu_check.SKIPPED == "no CUDA device: skipped"
    assert report["tests"] is None and report["benchmarks"] is None
    assert report["environment"]["torch"] == torch.__version__
    assert "**no CUDA device: skipped**" in (tmp_path / "gpu_check.md").read_text()
    assert "no CUDA device: skipped" in capsys.readouterr().out


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only build of torch")
def test_a_gpu_with_cpu_only_torch_is_reported_not_run(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--no-install"], gpus=["GPU 0: a GPU"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["summary"] == "not run: torch is a CPU-only build"
    assert f"pip install --force-reinstall torch=={torch.__version__.split('+')[0]}" in report["reason"]


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only build of torch")
@pytest.mark.parametrize("pip_status", [0, 1])
def test_a_gpu_with_cpu_only_torch_gets_the_cuda_build_then_a_fresh_run(tmp_path, monkeypatch, pip_status):
    calls = []

    def pip(command, *args, **kwargs):
        calls.append(command)
        return pip_status, 1.0

    def fresh_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 7)

    monkeypatch.setattr(gpu_check, "_run_logged", pip)
    monkeypatch.setattr(gpu_check.subprocess, "run", fresh_run)
    monkeypatch.delenv("TORCH_INDEX_URL", raising=False)
    status = gpu_check.main(["--out", str(tmp_path)], gpus=["GPU 0: a GPU"])
    assert calls[0] == gpu_check.install_command(torch.__version__)
    if pip_status == 0:
        assert status == 7  # the fresh run's status
        assert calls[1][1:] == ["-m", "implicitgrad.testing.gpu_check", "--out", str(tmp_path), "--no-install"]
    else:
        assert status == 1 and len(calls) == 1
        report = json.loads((tmp_path / "gpu_check.json").read_text())
        assert report["summary"] == "not run: installing the CUDA build of torch failed"


def test_install_only_when_a_gpu_meets_a_cpu_only_torch():
    assert gpu_check.needs_cuda_build({"torch_cuda": None, "gpus_seen_by_driver": ["GPU 0: A100"]})
    assert not gpu_check.needs_cuda_build({"torch_cuda": "12.6", "gpus_seen_by_driver": ["GPU 0: A100"]})
    assert not gpu_check.needs_cuda_build({"torch_cuda": None, "gpus_seen_by_driver": []})
    command = gpu_check.install_command("2.13.0+cpu")
    assert command[-2:] == ["--force-reinstall", "torch==2.13.0"]
    assert gpu_check.install_command("2.13.0", "https://x/cu126")[-2:] == ["--index-url", "https://x/cu126"]


BENCHMARK_RESULTS = {
    "backward": {"cases": {"logistic": {"ratios": {"implicitgrad/torchopt": 0.9}, "median_s": {"floor": 0.01},
                                        "best_ratios": {"implicitgrad/torchopt": 1.1}}}},
    "memory": {"peak_mib": {"imaml": {"10": 5.0, "20": 4.9}}, "imaml_flatness": 0.98,
               "ratios": {"10": {"imaml/maml": 1.9}}},
    "batched": {"speedup": 12.0, "check": {"ok": True, "max_rel_diff": 1e-16}},
    "krylov": {"cases": {"root": {"overhead": {"GMRES": 2.6}, "iterations": {"GMRES": 18}}}},
    "checks": {"batched": {"ratios": {"x": 3.0}}},
    "checks_ok": True,
}


def test_benchmark_ratios_are_all_found_and_nothing_else():
    assert gpu_check.benchmark_ratios(BENCHMARK_RESULTS) == {
        "backward/cases/logistic/ratios/implicitgrad/torchopt": 0.9,
        "backward/cases/logistic/best_ratios/implicitgrad/torchopt": 1.1,
        "memory/imaml_flatness": 0.98,
        "memory/ratios/10/imaml/maml": 1.9,
        "batched/speedup": 12.0,
        "krylov/cases/root/overhead/GMRES": 2.6,
    }
    assert gpu_check.benchmark_peaks(BENCHMARK_RESULTS) == {"imaml T=10": 5.0, "imaml T=20": 4.9}


def test_report_shows_tests_ratios_and_memory(tmp_path):
    record = {"test": "tests/test_cuda.py::test_x", "outcome": "failed", "duration_s": 1.5, "detail": "boom",
              "properties": {"syncs": 40}, "peak_memory_mib": 12.25}
    report = {
        "date": "today", "summary": "FAILED", "reason": "", "elapsed_s": 100.0,
        "environment": {**gpu_check.probe(gpus=[]), "devices": [{"name": "GPU-X", "memory_gib": 16.0,
                                                                 "capability": "8.0"}]},
        "tests": {"command": "pytest tests -m cuda", "counts": {"passed": 3, "failed": 1, "skipped": 0},
                  "seconds": 50.0, "timed_out": False, "records": [record], "peak_memory_mib": 12.25},
        "benchmarks": {"command": "python benchmarks/run.py --device cuda --quick", "exit_status": 0,
                       "timed_out": False, "seconds": 90.0, "checks_ok": True,
                       "ratios": gpu_check.benchmark_ratios(BENCHMARK_RESULTS),
                       "peak_memory_mib": gpu_check.benchmark_peaks(BENCHMARK_RESULTS)},
    }
    _, md_path = gpu_check.write_report(report, tmp_path)
    text = md_path.read_text()
    for expected in ("GPU-X (16.0 GiB, compute capability 8.0)", "3 passed, 1 failed, 0 skipped",
                     "| `tests/test_cuda.py::test_x` | failed | 1.50 s | 12.2 MiB | syncs = 40 |", "boom",
                     "| batched/speedup | 12 |", "| memory/imaml_flatness | 0.98 |", "| imaml T=20 | 4.9 |",
                     "gradient-agreement checks: all agree"):
        assert expected in text, expected
    assert json.loads((tmp_path / "gpu_check.json").read_text())["tests"]["records"] == [record]


def test_run_tests_records_each_outcome(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(record_property):\n    record_property('ratio', 2.5)\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no reason to run')\ndef test_skipped():\n    pass\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    result = gpu_check.run_tests(tmp_path, out, timeout=120, selection=["test_sample.py"])
    assert result["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert not result["ok"] and result["exit_status"] == 1 and not result["timed_out"]
    by_name = {r["test"].split("::")[-1]: r for r in result["records"]}
    assert by_name["test_ok"]["properties"] == {"ratio": 2.5}
    assert "one is not two" in by_name["test_bad"]["detail"]
    assert by_name["test_skipped"]["detail"] == "no reason to run"
    assert (out / "tests.log").read_text().startswith("$ ")
