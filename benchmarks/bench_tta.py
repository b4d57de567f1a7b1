"""Time to accuracy of the hypergradient on the logistic problem, and JAXopt as a peer.

The problem is the logistic regression of :mod:`bench_backward` (n = 2000, d = 500, one L2
hyperparameter per feature, float32; ``--quick``: n = 500, d = 100). A short hyperparameter-optimisation trajectory is
run first in float64: ``θ_{s+1} = θ_s − STEP · sign(∇_θ L(θ_s))`` (the size of Adam's
first steps), each ``w*(θ_s)`` by Newton's method. At the last point ``θ_T`` every method
computes the whole hypergradient call (forward returning ``w*(θ_T)``, outer loss,
hypergradient) with ``K`` conjugate-gradient steps, for ``K`` in a grid:

* ``implicitgrad cold``: ``ig.CG(maxiter=K)``, started from 0;
* ``implicitgrad warm``: the same with ``warm_start=ig.WarmStart()`` carried along the
  trajectory with the same solver: at ``θ_T`` the backward solve starts from the solution
  the call at ``θ_{T−1}`` left;
* ``implicitgrad compiled``: ``ig.CG(maxiter=K, compile=True)``, where that option exists;
* ``TorchOpt``: ``custom_root`` with ``solve_cg(maxiter=K, rtol=0, atol=0)``;
* ``JAXopt``: ``custom_root`` with ``solve_cg(maxiter=K, tol=0)``, jit-compiled (where
  ``jax`` and ``jaxopt`` are installed);
* ``floor``: the hand-written autograd loop of :func:`_problems.floor_hypergradient`.

The error is ``‖g − g_ref‖ / ‖g_ref‖`` against the float64 closed form
``g_ref = −e^θ ⊙ w* ⊙ H⁻¹∇_w L`` (``H`` the dense Hessian, one
``torch.linalg.solve``). Products counted: implicitgrad's own count
(``info.backward.iterations``) plus one for the initial residual of a warm start;
TorchOpt and JAXopt compute ``b − A x₀`` before their loop, so ``K + 1``; the floor ``K``.

Everything runs in one worker process (``python benchmarks/bench_tta.py --worker``), so
that XLA's flags can be set before ``jax`` is imported: one torch thread, XLA asked for one
(``XLA_FLAGS``, :data:`XLA_ONE_THREAD`), and the process pinned to one CPU, because those
flags do not stop every thread XLA starts; competitors are timed interleaved there, and the
CPU time each call used is reported next to its wall time.
Before timing, JAXopt's hypergradient is compared with implicitgrad's in float64.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy
import torch
from _timing import Impl, agreement, interleaved, machine_info, summarize
from bench_backward import TINY_TOL, LogisticCase, _given, _logistic64
from bench_warm import warm_start_supported

import implicitgrad as ig
from implicitgrad.testing.problems import logistic_solution

HERE = Path(__file__).resolve().parent
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

GRID = (1, 2, 4, 8, 16, 32, 64)
QUICK_GRID = (2, 8)
STEPS, QUICK_STEPS = 5, 2
STEP = 0.05
JAX_K = 20  # the K of the JAXopt comparison (as in the backward rows)
AGREEMENT_TOL = 1e-8
SIZES, QUICK_SIZES = (2000, 500), (500, 100)  # (n, d)


# ---------------------------------------------------------------------------- parent side


def run(device, quick: bool, reps: int, warmup: int, progress: Optional[Callable] = None,
        threads: Optional[int] = None) -> Dict[str, Any]:
    """Run the worker in a fresh process with one XLA thread and return its results.

    ``device`` must be the CPU: the comparison with JAXopt is a CPU comparison. ``threads``:
    torch threads in the worker (default: this process's).
    """
    threads = threads or torch.get_num_threads()
    if str(device) != "cpu":
        return {"skipped": f"time to accuracy runs on the CPU only (JAXopt's peer comparison); got {device}"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tta.json"
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_ONE_THREAD).strip()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--json", str(path), "--reps", str(reps),
               "--warmup", str(warmup), "--threads", str(threads)] + (["--quick"] if quick else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=pin_to_one_cpu)
        tail: List[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            if progress and line.startswith("tta: "):
                progress(line[5:].rstrip())
        if proc.wait() != 0:
            raise RuntimeError("the time-to-accuracy worker failed:\n" + "".join(tail))
        return json.loads(path.read_text())


def pin_to_one_cpu() -> None:
    """Confine the calling process (and every thread it will start) to one CPU.

    XLA's flags do not stop every thread it starts (its runtime keeps pools of its own), so
    matching "one thread" for torch and XLA is done by the operating system: the worker and
    all its threads share one core. Without ``sched_setaffinity`` (not Linux) nothing changes.
    """
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


# ---------------------------------------------------------------------------- problem


def reference_hypergradient(theta, w, X, y, X_val, y_val):
    """``−e^θ ⊙ w ⊙ H⁻¹ ∇_w L`` with the dense Hessian of the logistic objective (float64).

    ``∇_w f = −Xᵀ(y ⊙ σ(−y ⊙ Xw))/n + e^θ ⊙ w``, so ``∂_θ ∇_w f = diag(e^θ ⊙ w)`` and
    ``H = Xᵀ diag(s(1 − s)) X / n + diag(e^θ)`` with ``s = σ(−y ⊙ Xw)``.
    """

    n = len(y)
    s = torch.sigmoid(-y * (X @ w))
    hess = (X.T * (s * (1 - s))) @ X / n + torch.diag(theta.exp())
    s_val = torch.sigmoid(-y_val * (X_val @ w))
    v = -(X_val.T @ (y_val * s_val)) / len(y_val)
    return -theta.exp() * w * torch.linalg.solve(hess, v)


def trajectory(steps: int, device, n: int, d: int) -> List[Dict[str, Any]]:
    """Points ``θ_0 … θ_steps`` of sign-gradient steps, each with ``w*`` and ``g_ref`` (float64)."""
    prob = _logistic64(n, d, 0, str(device))
    data = (prob.X, prob.y, prob.X_val, prob.y_val)
    theta, w = prob.theta, prob.w_star
    points = []
    for s in range(steps + 1):
        if s:
            theta = theta - STEP * torch.sign(points[-1]["reference"])
            w = logistic_solution(theta, prob.X, prob.y)
        points.append({"theta": theta, "w": w, "reference": reference_hypergradient(theta, w, *data)})
    return points


def rel_error(grad, reference) -> float:
    g = grad.detach().double()
    return float((g - reference).norm() / reference.norm())


# ---------------------------------------------------------------------------- JAXopt


def jax_available() -> Optional[str]:
    """``None`` when jax and jaxopt import, else the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import jax  # noqa: F401
            import jaxopt  # noqa: F401
    except ImportError as exc:
        return f"jax / jaxopt not installed ({exc}); pip install 'jax[cpu]' jaxopt"
    return None


@functools.cache
def jaxopt_functions(K: int):
    """JAXopt's implicit hypergradient of the logistic problem with ``K`` CG steps, jit-compiled.

    Returns ``(call, backward, products)``: ``call(θ, w*, X, y, X_val, y_val)`` is the whole
    hypergradient (a "solver" returning ``w*``, the outer loss, its gradient in ``θ``);
    ``backward(θ, w*, X, y, v)`` the VJP of the solution map applied to ``v = ∂L/∂w*``;
    ``products(θ, w*, X, y, p)`` ``K`` normalised Hessian-vector products alone, made as
    JAXopt makes them (the VJP of ``∇_w f`` at ``w*``), in one compiled loop.
    """
    import jax
    import jax.numpy as jnp
    from jaxopt.implicit_diff import custom_root
    from jaxopt.linear_solve import solve_cg

    def inner(w, theta, X, y):
        return jnp.mean(jax.nn.softplus(-y * (X @ w))) + 0.5 * jnp.sum(jnp.exp(theta) * w * w)

    @custom_root(jax.grad(inner), solve=functools.partial(solve_cg, maxiter=K, tol=0.0))
    def given(w_star, theta, X, y):
        return w_star

    def outer(w, X_val, y_val):
        return jnp.mean(jax.nn.softplus(-y_val * (X_val @ w)))

    def call(theta, w_star, X, y, X_val, y_val):
        return jax.grad(lambda t: outer(given(w_star, t, X, y), X_val, y_val))(theta)

    def backward(theta, w_star, X, y, v):
        return jax.vjp(lambda t: given(w_star, t, X, y), theta)[1](v)[0]

    def products(theta, w_star, X, y, p):
        hvp = jax.vjp(lambda w: jax.grad(inner)(w, theta, X, y), w_star)[1]

        def body(_, q):
            hq = hvp(q)[0]
            return hq / jnp.linalg.norm(hq)

        return jax.lax.fori_loop(0, K, body, p)

    return jax.jit(call), jax.jit(backward), jax.jit(products)


def jax_arrays(case):
    """``(θ, w*, X, y, X_val, y_val)`` of a logistic case as jax arrays of its dtype."""
    import jax.numpy as jnp

    tensors = [case.theta[0], case.x_star[0], case.X, case.y, case.X_val, case.y_val]
    return tuple(jnp.asarray(t.detach().cpu().numpy()) for t in tensors)


def jax_impls(case, K: int) -> List[Impl]:
    """JAXopt's call, backward (given ``v = ∂L/∂w*``, computed untimed) and bare products at ``K``."""
    import jax
    import jax.numpy as jnp

    call, backward, products = jaxopt_functions(K)
    args = jax_arrays(case)
    p = args[1] / numpy.linalg.norm(numpy.asarray(args[1]))
    v = jax.grad(lambda w: jnp.mean(jax.nn.softplus(-args[5] * (args[4] @ w))))(args[1])
    return [Impl("JAXopt call", lambda: args, lambda a: call(*a).block_until_ready()),
            Impl("JAXopt backward", lambda: (args[:4], v), lambda s: backward(*s[0], s[1]).block_until_ready()),
            Impl("JAXopt products", lambda: (args[:4], p), lambda s: products(*s[0], s[1]).block_until_ready())]


def torch_products_impl(case, K: int) -> Impl:
    """``K`` normalised Hessian-vector products on the graph of ``∇_w f`` (built untimed), as the floor makes them."""

    def setup():
        w = case.x_star[0].detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(case.objective(w, case.theta[0], *case.data), w, create_graph=True)
        return w, g

    def run(state):
        w, g = state
        q = w.detach() / w.detach().norm()
        for _ in range(K):
            (hq,) = torch.autograd.grad(g, w, q, retain_graph=True)
            q = hq / hq.norm()
        return q

    return Impl("floor products", setup, run)


# ---------------------------------------------------------------------------- implicitgrad variants


def compile_supported() -> bool:
    return "compile" in inspect.signature(ig.CG).parameters


def compiled_linear(K: int):
    return ig.CG(maxiter=K, tol=TINY_TOL, compile=True)


def warm_state(cases: Sequence[Any]):
    """The ``WarmStart`` after the calls at every case but the last (the previous outer steps)."""
    ws = ig.WarmStart()
    for case in cases[:-1]:
        case.run_ig_call(case.setup_params(), warm_start=ws)
    return ws


def backward_iterations(case, **options) -> int:
    """Products implicitgrad's backward spent in one call (``info.backward.iterations``)."""
    theta = case.setup_params()
    x, info = ig.implicit_solve(
        case.objective, case.to_x(case.x0()), case.to_theta(theta), *case.data, solver=_given(case.to_x(case.x_star)),
        linear_solver=case.ig_linear, on_failure="ignore", return_info=True, **options,
    )
    torch.autograd.grad(case.outer(x), theta)
    return int(info.backward.iterations)


def method_impls(cases: Sequence[Any], K: int, jax_ok: bool, compiled: bool) -> Dict[str, Any]:
    """Every method at ``K`` at the last point: ``{name: (Impl, error, products)}``."""
    last = cases[-1]
    out: Dict[str, Any] = {}
    grad = last.run_ig_call(last.setup_params())[0]
    out["implicitgrad cold"] = (Impl("implicitgrad cold", last.setup_params, last.run_ig_call), grad,
                                backward_iterations(last))
    if warm_start_supported():
        ws = warm_state(cases)
        grad = last.run_ig_call(last.setup_params(), warm_start=copy.deepcopy(ws))[0]
        products = backward_iterations(last, warm_start=copy.deepcopy(ws)) + 1  # + the initial residual

        def setup_warm(ws=ws):
            return last.setup_params(), copy.deepcopy(ws)

        def run_warm(state):
            return last.run_ig_call(state[0], warm_start=state[1])

        out["implicitgrad warm"] = (Impl("implicitgrad warm", setup_warm, run_warm), grad, products)
    if compiled:
        case = last.variant(linear=compiled_linear(K))
        grad = case.run_ig_call(case.setup_params())[0]  # compiles
        out["implicitgrad compiled"] = (Impl("implicitgrad compiled", case.setup_params, case.run_ig_call), grad, K)
    if last.torchopt_solver is not None:
        grad = last.run_torchopt_call(last.setup_params())[0]
        out["TorchOpt"] = (Impl("TorchOpt", last.setup_params, last.run_torchopt_call), grad, K + 1)
    grad = last.run_floor_call(last.setup_params())[0]
    out["floor"] = (Impl("floor", last.setup_params, last.run_floor_call), grad, K)
    if jax_ok:

        impl = jax_impls(last, K)[0]
        grad = torch.from_numpy(numpy.array(jaxopt_functions(K)[0](*impl.setup())))
        out["JAXopt"] = (Impl("JAXopt", impl.setup, impl.run), grad, K + 1)
    return out


# ---------------------------------------------------------------------------- measurements


def cpu_per_wall(impl, calls: int = 5) -> float:
    """CPU time of the process over wall time across ``calls`` calls: the cores a call keeps busy."""
    states = [impl.setup() for _ in range(calls)]
    wall, cpu = time.perf_counter(), time.process_time()
    for state in states:
        impl.run(state)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def timed(impls: Sequence[Impl], reps: int, warmup: int) -> Dict[str, List[float]]:
    """:func:`_timing.interleaved` on the CPU, after freezing every object alive so far.

    jax's tracing and torch's compiler leave ~10^6 long-lived objects; the timing loop's
    ``gc.collect()`` would walk them every round (0.1–0.3 s each) unless they are frozen.
    """
    gc.freeze()
    return interleaved(impls, reps=reps, warmup=warmup, device=torch.device("cpu"))


def time_to_accuracy(points, grid, sizes, reps: int, warmup: int, jax_ok: bool, compiled: bool,
                     say: Callable) -> Dict[str, Any]:
    base = LogisticCase(n=sizes[0], d=sizes[1], K=grid[0], device=torch.device("cpu"), dtype=torch.float32)
    f32 = [[p[k].float() for p in points] for k in ("theta", "w")]
    reference = points[-1]["reference"]
    table: Dict[str, Dict[str, List[float]]] = {}
    for K in grid:
        say(f"K = {K}")
        cases = [base.variant(K=K, theta=[t], x_star=[w]) for t, w in zip(*f32)]
        methods = method_impls(cases, K, jax_ok, compiled)
        times = timed([m[0] for m in methods.values()], reps, warmup)
        for name, (_, grad, products) in methods.items():
            row = table.setdefault(name, {"K": [], "products": [], "rel_error": [], "median_s": []})
            row["K"].append(K)
            row["products"].append(products)
            row["rel_error"].append(rel_error(grad, reference))
            row["median_s"].append(sorted(times[name])[len(times[name]) // 2])
    return table


def jaxopt_comparison(sizes, reps: int, warmup: int, jax_ok: bool, say: Callable) -> Dict[str, Any]:
    """Whole call and backward of JAXopt (jitted) against implicitgrad, compiled, TorchOpt and the floor at K."""
    cpu = torch.device("cpu")
    case = LogisticCase(n=sizes[0], d=sizes[1], K=JAX_K, device=cpu, dtype=torch.float32)
    out: Dict[str, Any] = {"K": JAX_K, "description": case.description}
    case64 = LogisticCase(n=sizes[0], d=sizes[1], K=JAX_K, device=cpu, dtype=torch.float64)
    grads = {"implicitgrad": [case64.run_ig_call(case64.setup_params())[0].detach()]}
    if jax_ok:
        say("JAXopt float64 check")
        grads["JAXopt"] = [torch.from_numpy(numpy.array(jaxopt_functions(JAX_K)[0](*jax_arrays(case64))))]
    out["check"] = agreement(grads, AGREEMENT_TOL)
    if jax_ok:
        # The bare products of both frameworks compute the same thing: K normalised products.
        torch_products = torch_products_impl(case64, JAX_K)
        jax_products = jax_impls(case64, JAX_K)[2]
        out["products_check"] = agreement(
            {"floor products": [torch_products.run(torch_products.setup()).detach()],
             "JAXopt products": [torch.from_numpy(numpy.array(jax_products.run(jax_products.setup())))]},
            AGREEMENT_TOL)
    call, floor = case.call_impls()
    backward = {impl.name: impl for impl in case.impls()}
    impls = [Impl("implicitgrad call", call.setup, call.run),
             Impl("implicitgrad backward", backward["implicitgrad"].setup, backward["implicitgrad"].run),
             Impl("floor call", floor.setup, floor.run),
             Impl("floor backward", backward["floor"].setup, backward["floor"].run),
             torch_products_impl(case, JAX_K)]
    if compile_supported():
        compiled = case.variant(linear=compiled_linear(JAX_K))
        impls.append(Impl("implicitgrad compiled call", compiled.setup_params, compiled.run_ig_call))
    if jax_ok:
        impls += jax_impls(case, JAX_K)
    for impl in impls:  # compiles (jit, torch.compile) before any round, whatever ``warmup`` is
        impl.run(impl.setup())
    say("JAXopt comparison: timing")
    times = timed(impls, reps, warmup)
    names = [impl.name for impl in impls]
    pairs = [(a, b) for a in names for b in ("JAXopt call", "JAXopt backward", "JAXopt products", "floor call",
                                             "floor backward", "floor products")
             if a != b and a.split()[-1] == b.split()[-1]]
    out.update(summarize(times, pairs))
    out["times_s"] = times
    out["cpu_per_wall"] = {impl.name: cpu_per_wall(impl) for impl in impls}
    out["profile"] = profile([impl for impl in impls if "JAXopt" not in impl.name and "backward" not in impl.name])
    return out


def profile(impls: Sequence[Impl], runs: int = 5, top: int = 12) -> Dict[str, str]:
    """Where the time of each torch call goes: operators by self CPU time over ``runs`` calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    texts = {}
    for impl in impls:
        states = [impl.setup() for _ in range(runs)]
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for state in states:
                impl.run(state)
        texts[f"{impl.name}: torch operators ({runs} calls)"] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=top)
    return texts


def cost_model(curves: Dict[str, Dict[str, List[float]]]) -> Dict[str, Dict[str, float]]:
    """Least-squares ``time = fixed + per_product · products`` of each method over the grid.

    Splits a gap between two methods into a per-call part (forward, checks, dispatch) and a
    per-product part (the Hessian-vector product and the CG update around it).
    """
    out = {}
    for name, row in curves.items():
        p = torch.tensor(row["products"], dtype=torch.float64)
        t = torch.tensor(row["median_s"], dtype=torch.float64)
        if len(p) < 2:
            continue
        design = torch.stack([torch.ones_like(p), p], dim=1)
        fixed, per_product = torch.linalg.lstsq(design, t.unsqueeze(1)).solution.squeeze(1).tolist()
        out[name] = {"fixed_s": fixed, "per_product_s": per_product}
    return out


def worker(args) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)

    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"tta: {message} [{time.perf_counter() - start:.1f}s]", flush=True)

    reason = jax_available()
    jax_ok = reason is None
    if jax_ok:
        import jax

        # float64 for the agreement check; the timed arrays are float32 and stay float32.
        jax.config.update("jax_enable_x64", True)
    notes = [] if jax_ok else [f"JAXopt skipped: {reason}."]
    if not compile_supported():
        notes.append("implicitgrad compiled skipped: ig.CG has no compile option in this version.")
    if not warm_start_supported():
        notes.append("implicitgrad warm skipped: ig.WarmStart / implicit_solve(warm_start=...) absent in this version.")
    for note in notes:
        say(note)
    steps = QUICK_STEPS if args.quick else STEPS
    sizes = QUICK_SIZES if args.quick else SIZES
    say(f"float64 trajectory of {steps} outer steps")
    points = trajectory(steps, torch.device("cpu"), *sizes)
    results: Dict[str, Any] = {
        "machine": machine_info(torch.device("cpu")),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": None, "notes": notes,
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "problem": f"logistic regression, {sizes[1]} per-feature L2 hyperparameters, n = {sizes[0]}, float32",
        "trajectory": {"steps": steps, "step": STEP, "measured_at": steps},
    }
    if jax_ok:
        from importlib.metadata import version

        results["jax"] = {"jax": version("jax"), "jaxopt": version("jaxopt")}
    results["jaxopt"] = jaxopt_comparison(sizes, args.reps, args.warmup, jax_ok, say)
    grid = QUICK_GRID if args.quick else GRID
    results["grid"] = list(grid)
    # torch.compile compiles once per K (seconds to a minute each): --quick times the compiled
    # path in the JAXopt comparison only.
    compiled = compile_supported() and not args.quick
    if compile_supported() and args.quick:
        notes.append("--quick: the compiled path is timed at K = 20 only (it compiles once per K).")
    results["curves"] = time_to_accuracy(points, grid, sizes, args.reps, args.warmup, jax_ok, compiled, say)
    results["cost_model"] = cost_model(results["curves"])
    return results


# ---------------------------------------------------------------------------- plot


def plot(results: Dict[str, Any], path: Path) -> str:
    """Two panels: relative error against wall time and against Hessian-vector products."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, row) in enumerate(results["curves"].items()):
        style = {"marker": "os^vDx"[i % 6], "markersize": 4, "label": name}
        axes[0].loglog([1e3 * t for t in row["median_s"]], row["rel_error"], "-", **style)
        axes[1].loglog(row["products"], row["rel_error"], "-", **style)
    axes[0].set_xlabel("whole call, wall time (ms, median)")
    axes[1].set_xlabel("Hessian-vector products")
    for ax in axes:
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("relative error of the hypergradient (float64 reference)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['problem']}: time to accuracy (K = {', '.join(map(str, results['grid']))})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run the measurements in this process")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="runs/benchmarks/tta.json")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    if args.worker:
        results = worker(args)
    else:

        results = run(torch.device("cpu"), args.quick, args.reps, args.warmup, print, args.threads)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
