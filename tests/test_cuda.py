"""What implicitgrad promises on a GPU, tested on one (every test skips without CUDA).

Run them all, with a report, by ``python -m implicitgrad.testing.gpu_check``.

* host synchronisations of the backward linear solves (CG, MINRES, GMRES) and of the
  forward solves with their checks, counted with ``torch.cuda.set_sync_debug_mode``:
  at most ``⌈iterations / check_every⌉`` plus a constant per call;
* a fixed-iteration hypergradient with deferred checks (``on_failure="defer"``) captured in
  a CUDA graph and replayed, equal to eager, its checks read after each replay;
* the iMAML meta-step, the DEQ layer and the QP layer: the same numbers on CUDA as on
  the CPU, to 1e-10 in float64 and 1e-5 in float32;
* ``torch.func.vmap`` over 1,024 small problems against a Python loop (equal results;
  both times recorded in the report);
* iMAML's peak memory flat in the number of inner steps (and MAML's not).

The computations live in ``device_cases.py``; ``test_gpu_check.py`` runs them on the CPU.
"""

from __future__ import annotations

import time

import device_cases as cases
import pytest
import torch

from implicitgrad.testing.syncs import count_syncs, cuda_sync_debug_mode

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


# ------------------------------------------------------------------ host synchronisations
def test_counter_sees_synchronisations_on_this_device():
    """The count is not vacuous here: a device-to-host read counts, device-only work does not."""
    x = torch.randn(1000, device=CUDA)
    torch.cuda.synchronize()
    with count_syncs() as quiet:
        y = (x * 2).sin().sum()
    with count_syncs() as loud:
        float(y)
        y.item()
    assert quiet.count == 0, quiet.summary()
    assert loud.count >= 2, loud.summary()


@pytest.mark.parametrize("every", cases.CHECK_INTERVALS)
@pytest.mark.parametrize("kind,name", cases.SYNC_CASES)
def test_synchronisations_bounded(kind, name, every, record_property):
    syncs, iterations, per_call = cases.counted(kind, name, every, CUDA, cuda_sync_debug_mode)
    record_property("syncs", syncs.count)
    record_property("iterations", iterations)
    cases.check_syncs(syncs, iterations, every, per_call, f"{name} {kind}")


# ------------------------------------------------------------------ CUDA graph
def test_fixed_iteration_hypergradient_in_cuda_graph():
    """20 gradient-descent steps forward and 10 CG iterations backward, its checks deferred
    (``on_failure="defer"``), captured once in a CUDA graph and replayed on new
    hyperparameters: the gradients equal eager ones, and ``info.verify()`` after each replay
    reads that replay's checks (the same numbers as the eager call's).

    A capture forbids host synchronisations, so the step is first counted eagerly: a
    failure then names each place that reads a value back to the host.
    """
    step, start = cases.fixed_iteration_problem(CUDA)
    step(start.clone().requires_grad_(True))  # warm-up: kernels, cuBLAS workspace
    torch.cuda.synchronize()
    with count_syncs() as syncs:
        step(start.clone().requires_grad_(True))
    if syncs.count:
        pytest.fail(f"the fixed-iteration hypergradient synchronises with the host {syncs.count} times, so it "
                    f"cannot be captured in a CUDA graph. Sites:\n{syncs.summary()}")
    static = start.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grad, static_info = step(static)
    for shift in (0.5, -0.3, 1.2):
        new = start + shift * torch.linspace(-1, 1, start.numel(), device=CUDA, dtype=start.dtype)
        with torch.no_grad():
            static.copy_(new)
        graph.replay()
        eager, eager_info = step(new.clone().requires_grad_(True))
        assert cases.rel_diff(static_grad, eager) <= 1e-12
        static_info.verify(on_failure="ignore")
        eager_info.verify(on_failure="ignore")
        assert static_info.forward_residual == pytest.approx(eager_info.forward_residual, rel=1e-10)
        assert static_info.backward.residual == pytest.approx(eager_info.backward.residual, rel=1e-6, abs=1e-300)


def test_compiled_backward_captured_as_a_cuda_graph():
    """``CG(compile={"mode": "reduce-overhead"})``: torch.compile captures the fixed-iteration
    backward in a CUDA graph; replayed on new hyperparameters it equals the eager backward."""
    step, start = cases.fixed_iteration_problem(CUDA)
    compiled_step, _ = cases.fixed_iteration_problem(CUDA, compile={"mode": "reduce-overhead"})
    for shift in (0.0, 0.5, -0.3, 1.2):
        new = start + shift * torch.linspace(-1, 1, start.numel(), device=CUDA, dtype=start.dtype)
        compiled, _ = compiled_step(new.clone().requires_grad_(True))
        eager, _ = step(new.clone().requires_grad_(True))
        assert cases.rel_diff(compiled, eager) <= 1e-10


# ------------------------------------------------------------------ CUDA against the CPU
@pytest.mark.parametrize("dtype", list(cases.DTYPES), ids=list(cases.DTYPES))
@pytest.mark.parametrize("case", list(cases.DEVICE_CASES))
def test_same_result_as_cpu(case, dtype, record_property):
    dt = cases.DTYPES[dtype]
    on_gpu = cases.DEVICE_CASES[case](CUDA, dt)
    on_cpu = cases.DEVICE_CASES[case]("cpu", dt)
    assert set(on_gpu) == set(on_cpu)
    diffs = {name: cases.rel_diff(on_gpu[name], on_cpu[name]) for name in on_cpu}
    record_property("max_rel_diff", max(diffs.values()))
    assert all(t.device.type == CUDA.type for t in on_gpu.values())
    bad = {name: d for name, d in diffs.items() if not d <= cases.DEVICE_RTOL[dt]}
    assert not bad, f"{case} in {dtype}: CUDA and CPU differ by more than {cases.DEVICE_RTOL[dt]:g}: {bad}"


# ------------------------------------------------------------------ many problems
def test_vmap_over_1024_problems_against_a_loop(record_property):
    """vmap and a loop of 1,024 calls give the same hypergradients. After that first call
    of each (the warm-up), one more of each is timed; the times go to the report, not into
    an assertion."""
    problems = cases.ManyProblems(1024, CUDA)
    assert cases.rel_diff(problems.vmapped(), problems.loop()) <= 1e-8
    seconds = {}
    for name, run in (("vmap", problems.vmapped), ("loop", problems.loop)):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        run()
        torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - begin
    record_property("vmap_s", seconds["vmap"])
    record_property("loop_s", seconds["loop"])
    record_property("loop_over_vmap", seconds["loop"] / seconds["vmap"])


# ------------------------------------------------------------------ memory
def _peak_mib(method: str, inner_steps: int) -> float:
    """Peak memory of one meta-step above what was allocated before it, after a warm-up."""
    learner, tasks = cases.meta_learner(method, inner_steps, CUDA)
    learner.meta_step(tasks)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    learner.meta_step(tasks)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def test_imaml_peak_memory_flat_in_inner_steps(record_property):
    """iMAML at 200 inner steps within 1.25 × its peak at 10; MAML, differentiated through
    its steps, at least doubles, which shows the measurement sees growth."""
    peaks = {(m, t): _peak_mib(m, t) for m in ("imaml", "maml") for t in (10, 200)}
    for (method, steps), mib in peaks.items():
        record_property(f"{method}_T{steps}_mib", mib)
    assert peaks["maml", 200] >= 2 * peaks["maml", 10], peaks
    assert peaks["imaml", 200] <= 1.25 * peaks["imaml", 10], peaks
