"""Run the implicitgrad benchmarks: print a markdown table, write JSON, PNG plots and tables.

Sections (``--only`` selects some):

* ``backward`` — hypergradient (backward-only) time against TorchOpt's implicit
  differentiation and against the same math hand-written with ``torch.autograd``
  (logistic regression with 500 hyperparameters; iMAML proximal task on an 84k-parameter
  MLP), after a float64 gradient-agreement check (:mod:`bench_backward`);
* ``memory`` — iMAML against MAML (unrolled, ours and ``higher``): peak memory and time
  against the number of inner steps (:mod:`bench_memory`);
* ``accuracy`` — hypergradient error against linear-solver iterations (CG, Neumann,
  GMRES vs Exact) and the iMAML meta-gradient error against CG steps
  (:mod:`bench_accuracy`);
* ``batched`` — ``torch.func.vmap`` over 32 problems against a Python loop
  (:mod:`bench_batched`);
* ``krylov`` — each Krylov solver's time per iteration against its bare matrix-vector
  product, and its products to a relative residual of 1e-8: CG and MINRES on a Hessian,
  GMRES and BiCGStab on a deep-equilibrium backward (one system, and one per sample) and
  on a 2,000-unknown root problem (:mod:`bench_krylov`);
* ``deq`` — ``ig.nn.DEQ`` against torchdeq on one fixed-point layer: forward iterations and
  time to a relative residual of 1e-6, backward time, gradients against a dense reference
  (:mod:`bench_deq`);
* ``qp`` — ``ig.qp_solve`` against qpth and cvxpylayers on 64 QPs: forward and backward time,
  gradients against each other and central differences (:mod:`bench_qp`);
* ``call`` — the whole call (forward returning a solution computed beforehand, outer loss,
  hypergradient) of implicitgrad against the floor's, both problems of ``backward`` at
  K = 5 and K = 20 CG steps (:func:`bench_backward.run_call`);
* ``tta`` — time to accuracy on the logistic problem: hypergradient error against wall
  time and against Hessian-vector products for implicitgrad cold, warm and compiled,
  TorchOpt, JAXopt (jit-compiled, optional: ``pip install 'jax[cpu]' jaxopt``) and the
  floor, and JAXopt's whole call and backward against implicitgrad's and the floor's with
  one thread each, in a worker process (:mod:`bench_tta`);
* ``warm`` — Hessian-vector products to a 1e-6 hypergradient error per outer step, cold
  against warm-started CG, over an HPO run and an iMAML meta-training run (:mod:`bench_warm`).

Usage (from the repository root)::

    python benchmarks/run.py                  # full run, outputs in runs/benchmarks/
    python benchmarks/run.py --quick          # small run (CI)
    python benchmarks/run.py --device cuda --out runs/benchmarks-gpu

The exit status is 1 when a gradient-agreement check fails (the timings would compare
different computations), 0 otherwise; performance targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Run from a source checkout without installing: the package lives one level up.
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402
from _timing import machine_info, machine_line  # noqa: E402

import implicitgrad as ig  # noqa: E402

SECTIONS = ("backward", "memory", "accuracy", "batched", "krylov", "deq", "qp", "call", "tta", "warm")
# The whole-call, time-to-accuracy and warm-start sections: section -> (module, function).
PERFORMANCE_RUNNERS = {"call": ("bench_backward", "run_call"), "tta": ("bench_tta", "run"),
                       "warm": ("bench_warm", "run")}
METHOD_LABELS = {
    "imaml": "iMAML (implicitgrad)",
    "maml": "MAML (implicitgrad unrolled)",
    "maml_higher": "MAML (higher)",
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py", description=__doc__.splitlines()[0],
    )
    parser.add_argument("--quick", action="store_true", help="small run (fewer rounds and inner-step counts)")
    parser.add_argument("--json", metavar="PATH", default=None, help="results JSON (default: OUT/benchmarks.json)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--out", metavar="DIR", default="runs/benchmarks",
                        help="directory for PNG plots and tables (default: runs/benchmarks)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per comparison (default 7 quick, 21 full)")
    parser.add_argument("--warmup", type=int, default=None, help="discarded rounds (default 1 quick, 3 full)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: stable timings on a shared machine; 0: torch's default)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.reps is None:
        args.reps = 7 if args.quick else 21
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.reps < 7:
        parser.error("--reps must be at least 7")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available; use --device cpu")
    return args


def _progress(start: float):
    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    return say


# ---------------------------------------------------------------------------- tables


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms"


def _verdict(value: Optional[float], target: float, lower_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    met = value <= target if lower_is_better else value >= target
    return f"{value:.2f} ({'met' if met else 'missed'})"


def table_rows(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The tables as ``{title: {"header": [...], "rows": [[...]], "notes": [...]}}``."""
    from bench_backward import TARGET_VS_FLOOR, TARGET_VS_TORCHOPT
    from bench_batched import TARGET_SPEEDUP
    from bench_krylov import TARGET_GMRES
    from bench_memory import TARGET_FLAT, TARGET_VS_MAML

    tables: Dict[str, Dict[str, Any]] = {}
    if "backward" in results:
        back = results["backward"]
        rows = []
        for case in back["cases"].values():
            med, ratios, best = case["median_s"], case["ratios"], case["best_ratios"]
            rows.append([
                case["description"], _ms(med["implicitgrad"]),
                _ms(med["torchopt"]) if "torchopt" in med else "not installed", _ms(med["floor"]),
                _verdict(ratios.get("implicitgrad/torchopt"), TARGET_VS_TORCHOPT),
                _verdict(ratios.get("implicitgrad/floor"), TARGET_VS_FLOOR),
                " / ".join(f"{best[k]:.2f}" for k in ("implicitgrad/torchopt", "implicitgrad/floor") if k in best),
                f"{case['check']['max_rel_diff']:.1e}",
            ])
        tables["Backward pass (hypergradient only)"] = {
            "header": ["problem", "implicitgrad", "TorchOpt", "floor (hand-written)",
                       f"implicitgrad / TorchOpt (target ≤ {TARGET_VS_TORCHOPT})",
                       f"implicitgrad / floor (target ≤ {TARGET_VS_FLOOR})", "best-of-rounds ratios",
                       "max rel. diff (float64)"],
            "rows": rows,
            "notes": [f"{back['dtype']}, median of {results['settings']['reps']} interleaved rounds; ratios are "
                      "medians of per-round paired ratios (the targets apply to them); best-of-rounds ratios "
                      "divide the fastest rounds (vs TorchOpt / vs floor); every implementation runs exactly K CG "
                      "iterations."],
        }
    if "memory" in results:
        mem = results["memory"]
        names = METHOD_LABELS
        header = ["T"] + [f"{names[m]} peak" for m in mem["methods"]] + [f"{names[m]} time" for m in mem["methods"]]
        rows = [[str(T)] + [f"{mem['peak_mib'][m][T]:.1f} MiB" for m in mem["methods"]]
                + [_ms(mem["median_s"][m][T]) for m in mem["methods"]] for T in mem["steps"]]
        top = mem["max_T"]
        # The targets are stated at T = 200; a --quick run stops earlier and only reports the ratios.
        judged = top >= 200
        notes = [f"Peak memory increase of one meta-gradient, each configuration in a fresh process "
                 f"({mem['memory_measure']}; median of {mem['memory_repeats']} processes); time of the full "
                 "meta-gradient (forward + backward), interleaved."]
        flat = mem["imaml_flatness"]
        notes.append(f"iMAML peak at T = {top} over T = 10: "
                     + (_verdict(flat, TARGET_FLAT) if judged else f"{flat:.2f}")
                     + f" (target at T = 200: ≤ {TARGET_FLAT}).")
        vs_maml = mem["imaml_vs_maml_at_max_T"]
        notes.append(f"iMAML peak over MAML's (implicitgrad unrolled) at T = {top}: "
                     + (_verdict(vs_maml, TARGET_VS_MAML) if judged else f"{vs_maml:.2f}")
                     + f" (target at T = 200: ≤ {TARGET_VS_MAML}).")
        if mem["check"] is not None:
            notes.append(f"MAML gradient, implicitgrad unrolled vs higher (float64, T = 5): max rel. diff "
                         f"{mem['check']['max_rel_diff']:.1e}.")
        tables["Meta-gradient memory and time vs inner steps"] = {"header": header, "rows": rows, "notes": notes}
    if "accuracy" in results:
        from bench_accuracy import errors_at

        acc = results["accuracy"]
        ks = [k for k in (5, 10, 20, 50) if k in acc["logistic_well"]["iterations"]]
        rows = []
        problems = (("logistic_well", "logistic, well conditioned"), ("logistic_ill", "logistic, ill conditioned"),
                    ("imaml_synthetic", "iMAML linear regression"))
        for key, label in problems:
            curves = acc[key]
            for method in curves["rel_error"]:
                rows.append([f"{label} (κ = {curves['condition']:.3g})", method]
                            + [f"{errors_at(curves, k)[method]:.1e}" for k in ks])
        tables["Relative hypergradient error vs iterations"] = {
            "header": ["problem", "method"] + [f"k = {k}" for k in ks], "rows": rows,
            "notes": ["float64, exact inner solution; reference: ig.Exact (logistic) or the closed form (iMAML). "
                      "A curve that reached 1e-12 earlier shows its last value."],
        }
    if "batched" in results:
        b = results["batched"]
        tables["Batched problems"] = {
            "header": ["problem", "Python loop", "torch.func.vmap", f"speedup (target ≥ {TARGET_SPEEDUP})",
                       "max rel. diff (float64)"],
            "rows": [[b["description"], _ms(b["median_s"]["loop"]), _ms(b["median_s"]["vmap"]),
                      _verdict(b["speedup"], TARGET_SPEEDUP, lower_is_better=False),
                      f"{b['check']['max_rel_diff']:.1e}"]],
            "notes": [],
        }
    if "krylov" in results:
        kry = results["krylov"]
        rows = []
        for case in kry["cases"].values():
            for name, iterations in case["iterations"].items():
                overhead = case["overhead"][name]
                rows.append([case["description"], name, str(iterations),
                             f"{1e6 * case['per_iteration_s'][name]:.0f} µs",
                             f"{1e6 * case['per_matvec_s'][name]:.0f} µs",
                             _verdict(overhead, TARGET_GMRES) if name == "GMRES" else f"{overhead:.2f}",
                             f"{case['check']['max_rel_diff']:.1e}"])
        tables["Krylov solvers: time per iteration against the bare matvec"] = {
            "header": ["problem", "solver", f"products to {kry['tol']:g}", "time per product (solve)",
                       "bare matvec", f"solve / its matvecs (GMRES target ≤ {TARGET_GMRES})",
                       "max rel. diff between solvers"],
            "rows": rows,
            "notes": [f"{kry['dtype']}, median of {results['settings']['reps']} interleaved rounds of the solve and "
                      "of a loop of the same number of bare matvec calls on distinct inputs; products include "
                      "GMRES's restart residuals and every solver's final measured residual."],
        }
    tables.update(layer_tables(results))
    tables.update(performance_tables(results))
    return tables


def _ratio(summary: Dict[str, Any], key: str) -> str:
    value = summary["ratios"].get(key)
    return "n/a (peer not installed)" if value is None else f"{value:.2f}"


def layer_tables(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The DEQ and QP layer tables (sections ``deq`` and ``qp``)."""
    tables: Dict[str, Dict[str, Any]] = {}
    if "deq" in results:
        deq = results["deq"]
        rows = []
        for name in deq["iterations"]:
            rows.append([name, str(deq["iterations"][name]), f"{deq['relative_residuals'][name]:.1e}",
                         _ms(deq["median_s"][f"{name} forward"]), _ms(deq["median_s"][f"{name} backward"]),
                         f"{deq['gradient_errors'][name]:.1e}"])
        notes = [f"{deq['description']}; median of {results['settings']['reps']} interleaved rounds. "
                 f"implicitgrad / torchdeq: forward {_ratio(deq, 'implicitgrad forward/torchdeq forward')}, "
                 f"backward {_ratio(deq, 'implicitgrad backward/torchdeq backward')}.",
                 "Approximate backward modes of ig.nn.DEQ, relative error of the gradient against the dense "
                 "reference: " + ", ".join(f"{k.split()[-1]} {v:.1e}" for k, v in deq["gradient_errors"].items()
                                           if " " in k) + "."]
        tables["Deep equilibrium layer (vs torchdeq)"] = {
            "header": ["library", "forward iterations", "max relative residual", "forward", "backward",
                       "gradient rel. error vs dense"], "rows": rows, "notes": notes}
    if "qp" in results:
        qp = results["qp"]
        names = ["implicitgrad"] + qp["peers"]
        rows = [[name, _ms(qp["median_s"][f"{name} forward"]), _ms(qp["median_s"][f"{name} backward"]),
                 "1" if name == "implicitgrad" else _ratio(qp, f"implicitgrad forward/{name} forward"),
                 "1" if name == "implicitgrad" else _ratio(qp, f"implicitgrad backward/{name} backward")]
                for name in names]
        pairs = "; ".join(f"{pair} {value:.1e} ({'met' if value <= 1e-6 else 'missed'})"
                          for pair, value in qp["check"]["pairs"].items() if "central" not in pair)
        fd = qp["check"]["pairs"]["implicitgrad vs central differences"]
        notes = [f"{qp['description']}; median of {results['settings']['reps']} interleaved rounds; "
                 f"{qp['iterations']} interior-point iterations.",
                 f"Gradients (p, G, h), max relative difference (target ≤ 1e-6): {pairs}. Central differences "
                 f"along 3 random directions: {fd:.1e}. "
                 f"Solutions: max difference {qp['check']['solution_max_diff']:.1e}."]
        tables["Batched QP layer (vs qpth, cvxpylayers)"] = {
            "header": ["library", "forward", "backward", "implicitgrad / it, forward", "implicitgrad / it, backward"],
            "rows": rows, "notes": notes}
    return tables


def performance_tables(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The whole-call, JAXopt, time-to-accuracy and warm-start tables (sections ``call``, ``tta``, ``warm``)."""
    tables: Dict[str, Dict[str, Any]] = {}
    reps = results["settings"]["reps"]
    if "call" in results:
        call = results["call"]
        rows = []
        for case in call["cases"].values():
            med = case["median_s"]
            lean = case.get("lean", {}).get("ratio_to_floor")
            rows.append([case["description"], _ms(med["implicitgrad"]), _ms(med["floor"]),
                         _verdict(case["ratios"]["implicitgrad/floor"], call["target"]),
                         f"{case['best_ratios']['implicitgrad/floor']:.2f}",
                         "n/a" if lean is None else f"{lean:.2f}", f"{case['check']['max_rel_diff']:.1e}"])
        tables["Whole call (forward + outer loss + hypergradient)"] = {
            "header": ["problem", "implicitgrad", "floor (hand-written)",
                       f"implicitgrad / floor (target ≤ {call['target']})", "best-of-rounds ratio",
                       "lean call (floor + the same checks) / floor", "max rel. diff (float64)"],
            "rows": rows,
            "notes": [f"{call['dtype']}, median of {reps} interleaved rounds; implicitgrad's forward solver returns "
                      "the solution computed beforehand, the floor starts from the same solution. The lean call "
                      "(benchmarks/_problems.py: lean_implicit_call) is the floor with the checks implicitgrad "
                      "keeps (residual and finiteness read once, the captured-tensor walk, the incoming "
                      "gradient's finiteness) in one autograd Function, CG step sizes as Python numbers: the "
                      "least those checks cost in Python. Max rel. diff: over the three gradients."]}
    tta = results.get("tta", {})
    if "skipped" in tta:
        tables["Time to accuracy and JAXopt"] = {"header": ["section"], "rows": [["tta"]], "notes": [tta["skipped"]]}
    elif tta:
        tables.update(_tta_tables(tta, reps))
    if "warm" in results:
        tables["Warm starts: products to a 1e-6 hypergradient"] = _warm_table(results["warm"])
        if results["warm"].get("imaml"):
            tables["Warm starts in ig.meta.IMAML (task pool)"] = _imaml_warm_table(results["warm"]["imaml"])
    return tables


def _imaml_warm_table(run: Dict[str, Any]) -> Dict[str, Any]:
    rows = [[f"IMAML(warm_start={name})", str(run["products"][name]), f"{run['ratio'][name]:.2f}",
             f"{run['max_difference'][name]:.1e}"] for name in run["products"]]
    return {
        "header": ["learner", "backward products over the run", "warm_start=False / it",
                   "largest relative difference from the cold meta-gradient"],
        "rows": rows,
        "notes": [f"float64; ig.meta.IMAML on the MLP and the pool of {run['tasks']} tasks of the meta-training row "
                  f"above (all in every meta-batch, batched=False), {run['steps']} meta-steps, "
                  f"ig.CG(tol={run['tol']:g}), L-BFGS inside; one learner per warm_start setting, all on the same "
                  "model, which Adam (step 0.01) moves by the cold meta-gradient; products as each learner counts "
                  "them (info.backward.iterations)."]}


def _warm_table(warm: Dict[str, Any]) -> Dict[str, Any]:
    target = warm["target_ratio"]
    rows = []
    for key, label in (("hpo", "HPO"), ("hpo_small_steps", "HPO, smaller steps"), ("meta", "meta-training")):
        run = warm[key]

        def ratio(value, run=run, key=key):
            return _verdict(value, target, lower_is_better=False) if key == "hpo" else f"{value:.2f}"

        distance, lib, recycle = run["median_start_distance"], run.get("library"), run.get("recycle")
        line = run.get("median_extrapolated_distance")
        rows.append([f"{label}: {run['description']}", str(run["steps"]), str(run["cold_total"]),
                     str(run["warm_total"]), ratio(run["ratio"]),
                     f"{run['extrapolated_total']} ({ratio(run['extrapolated_ratio'])}; median distance "
                     f"{'n/a' if line is None else format(line, '.1e')})",
                     "ig.WarmStart absent" if recycle is None else
                     f"{run['recycled_total']} ({ratio(run['recycled_ratio'])})",
                     _sweep_cell(run.get("sweep")),
                     "n/a" if distance is None else f"{distance:.1e}",
                     "ig.WarmStart absent" if lib is None else
                     f"{lib['cold_total']} / {lib['warm_total']} = {lib['ratio']:.2f} (max error "
                     f"{lib['max_error_cold']:.0e} / {lib['max_error_warm']:.0e})"])
    recycle = warm["hpo"].get("recycle")
    return {
        "header": ["run", "outer steps", "products, cold (from 0)", "products, warm (previous solution)",
                   f"cold / warm (HPO target ≥ {target})",
                   "products, start 2u_k − u_(k−1) as WarmStart(extrapolate=True) (cold / it)",
                   f"products, ig.WarmStart(recycle={recycle}, extrapolate=True) (cold / it)",
                   "the same with recycle = k: products (cold / it)",
                   "median ‖u₀ − u‖/‖u‖ of the warm start",
                   f"implicit_solve, CG tol 1e-8: products cold / WarmStart(recycle={recycle}, extrapolate=True)"],
        "rows": rows,
        "notes": [f"float64; per outer step the fewest Hessian-vector products of ig.CG whose hypergradient is "
                  f"within {warm['target_error']:g} relative error of the reference (doubling, then bisection on "
                  "maxiter), counted at the matvec, a warm start paying its initial residual; totals over the run. "
                  "'warm' starts CG from the solution the previous step kept (the same task's, for the task pool); "
                  "the extrapolated start is the line through the last two kept solutions; "
                  f"'WarmStart(recycle={recycle}, extrapolate=True)' runs the same search through "
                  "ig.implicit_solve(warm_start=...): the extrapolated start, and the last "
                  f"{recycle} CG directions as a preconditioner (each solve's directions update the preconditioner "
                  "of the solves before it); the next column varies how many directions are kept. CG's error "
                  "falls by a roughly constant factor per product, so a start at relative distance δ alone saves "
                  f"about a fraction log δ / log {warm['target_error']:g} of the products: halving them takes "
                  f"δ ≲ {warm['target_error'] ** 0.5:g}. Last column: the same steps with ig.CG(tol=1e-8), the "
                  "library's product count plus the warm start's initial residual, and the largest "
                  "hypergradient error of each."]}


def _sweep_cell(sweep: Optional[Dict[str, Any]]) -> str:
    """``k = 10: 675 (1.63); k = 20: ...`` for the memories measured, ``n/a`` without."""
    if not sweep or len(sweep) < 2:
        return "n/a"
    ordered = sorted(sweep.items(), key=lambda kv: int(kv[0]))
    return "; ".join(f"k = {k}: {v['total']} ({v['ratio']:.2f})" for k, v in ordered)


def _tta_tables(tta: Dict[str, Any], reps: int) -> Dict[str, Dict[str, Any]]:
    tables: Dict[str, Dict[str, Any]] = {}
    jax_cmp = tta["jaxopt"]
    med, cores, ratios = jax_cmp["median_s"], jax_cmp["cpu_per_wall"], jax_cmp["ratios"]
    rows = []
    for name in med:
        kind = name.split()[-1]
        rows.append([name, _ms(med[name]), f"{cores[name]:.2f}",
                     f"{ratios[f'{name}/JAXopt {kind}']:.2f}" if f"{name}/JAXopt {kind}" in ratios else "—",
                     f"{ratios[f'{name}/floor {kind}']:.2f}" if f"{name}/floor {kind}" in ratios else "—"])
    peer = (f"jax {tta['jax']['jax']}, jaxopt {tta['jax']['jaxopt']}" if tta["jax"]
            else "JAXopt not installed")
    check = jax_cmp["check"]
    notes = [f"{jax_cmp['description']}, float32, median of {reps} interleaved rounds in one worker process: "
             f"torch threads 1, XLA_FLAGS='{tta['xla_flags']}' ({peer}), the process pinned to CPU(s) "
             f"{tta.get('cpus')}. 'call' = forward returning the given "
             "solution + outer loss + hypergradient; 'backward' = the hypergradient alone (JAXopt: the jitted VJP "
             "of its solution map applied to ∂L/∂w*). CPU/wall: process CPU time over wall time of 5 calls (below 1 "
             "when other jobs share the cores).",
             "float64 agreement before timing: " + (", ".join(f"{k} {v:.1e}" for k, v in check["pairs"].items())
                                                    or "nothing to compare (JAXopt absent)") + ".",
             f"'products' = {jax_cmp['K']} normalised Hessian-vector products alone, the floor's on the graph of "
             "∇_w f built beforehand, JAXopt's as the VJP of ∇_w f in one jitted loop"
             + (f" (float64 agreement {jax_cmp['products_check']['max_rel_diff']:.1e})"
                if "products_check" in jax_cmp else "") + ": the share of the gap the products carry."]
    notes += tta["notes"]
    tables[f"JAXopt (jit) against implicitgrad and the floor, K = {jax_cmp['K']}"] = {
        "header": ["implementation", "median", "CPU / wall", "÷ JAXopt (same kind)", "÷ floor (same kind)"],
        "rows": rows, "notes": notes}
    rows = []
    for name, row in tta["curves"].items():
        rows.append([name] + [f"{e:.1e} · {1e3 * t:.1f} ms · {p}" for e, t, p in
                              zip(row["rel_error"], row["median_s"], row["products"])])
    tables["Time to accuracy (logistic)"] = {
        "header": ["method"] + [f"K = {k}" for k in tta["grid"]], "rows": rows,
        "notes": [f"{tta['problem']}; each cell: relative error of the hypergradient against the float64 dense "
                  "solve · median whole-call time · Hessian-vector products. Measured at the last point of "
                  f"{tta['trajectory']['steps']} sign-gradient outer steps of {tta['trajectory']['step']} on θ; the "
                  "warm start carries the solution of the previous step (same K). Plot: time_to_accuracy.png.",
                  "Least-squares cost model over the grid, time = fixed + per product × products: "
                  + "; ".join(f"{name} {1e3 * m['fixed_s']:.2f} ms + {1e3 * m['per_product_s']:.3f} ms"
                              for name, m in tta.get("cost_model", {}).items()) + "."]}
    return tables


def markdown(results: Dict[str, Any]) -> str:
    lines = ["# implicitgrad benchmarks", "", f"Machine: {results['machine_line']}", "",
             f"Command: `{results['command']}`", ""]
    for title, table in table_rows(results).items():
        lines += [f"## {title}", "", "| " + " | ".join(table["header"]) + " |",
                  "|" + "|".join("---" for _ in table["header"]) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
        lines += [""] + [f"{note}" for note in table["notes"]] + [""]
    lines += [f"Gradient-agreement checks: {'all passed' if results['checks_ok'] else 'FAILED'}.", ""]
    return "\n".join(lines)


def rst(results: Dict[str, Any]) -> str:
    """The same tables as reStructuredText ``list-table`` blocks (pasted into the docs)."""
    lines = []
    for title, table in table_rows(results).items():
        lines += [f".. list-table:: {title}", "   :header-rows: 1", ""]
        for row in [table["header"]] + table["rows"]:
            lines.append("   * - " + row[0])
            lines += [f"     - {cell}" for cell in row[1:]]
        lines += [""] + [f"{note}" for note in table["notes"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def plots(results: Dict[str, Any], out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    if "backward" in results or "batched" in results:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
        if "backward" in results:
            cases = results["backward"]["cases"]
            impls = ["implicitgrad", "torchopt", "floor"]
            width = 0.25
            for j, impl in enumerate(impls):
                xs, hs, errs = [], [], []
                for i, case in enumerate(cases.values()):
                    if impl in case["median_s"]:
                        med = case["median_s"][impl]
                        xs.append(i + (j - 1) * width)
                        hs.append(1e3 * med)
                        errs.append([1e3 * (med - case["q1_s"][impl]), 1e3 * (case["q3_s"][impl] - med)])
                if xs:
                    axes[0].bar(xs, hs, width, yerr=list(zip(*errs)), capsize=3, label=impl)
            axes[0].set_xticks(range(len(cases)))
            axes[0].set_xticklabels([f"{name}\nK = {case['K']} CG steps" for name, case in cases.items()])
            axes[0].set_ylabel("backward time (ms, median, IQR)")
            axes[0].set_title("Hypergradient backward pass")
            axes[0].legend()
        if "batched" in results:
            b = results["batched"]
            axes[1].bar(["loop of 32", "vmap"], [1e3 * b["median_s"]["loop"], 1e3 * b["median_s"]["vmap"]],
                        color=["tab:gray", "tab:blue"])
            axes[1].set_ylabel("forward + backward (ms)")
            axes[1].set_title(f"32 problems: {b['speedup']:.1f}x with vmap")
        fig.tight_layout()
        written.append(_save(fig, out / "backward.png"))
        plt.close(fig)
    if "memory" in results:
        mem = results["memory"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        labels = METHOD_LABELS
        for m in mem["methods"]:
            axes[0].plot(mem["steps"], [mem["peak_mib"][m][T] for T in mem["steps"]], "o-", label=labels[m])
            axes[1].plot(mem["steps"], [1e3 * mem["median_s"][m][T] for T in mem["steps"]], "o-", label=labels[m])
        axes[0].set_ylabel("peak memory increase (MiB)")
        axes[1].set_ylabel("meta-gradient time (ms)")
        for ax in axes:
            ax.set_xlabel("inner gradient steps T")
            ax.set_xscale("log")
            ax.set_xticks(mem["steps"])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.legend()
        axes[0].set_title("Memory vs inner steps")
        axes[1].set_title("Time vs inner steps")
        fig.tight_layout()
        written.append(_save(fig, out / "memory.png"))
        plt.close(fig)
    if "accuracy" in results:
        acc = results["accuracy"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        titles = {"logistic_well": "well-conditioned logistic", "logistic_ill": "ill-conditioned logistic",
                  "imaml_synthetic": "iMAML meta-gradient (linear regression)"}
        for ax, (key, title) in zip(axes, titles.items()):
            curves = acc[key]
            for method, errs in curves["rel_error"].items():
                ax.loglog(curves["iterations"][: len(errs)], errs, "o-", label=method, markersize=3)
            ax.set_title(f"{title}, κ = {curves['condition']:.3g}")
            ax.set_xlabel("iterations (matrix-vector products / inner steps)")
            ax.set_ylabel("relative error")
            ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "accuracy.png"))
        plt.close(fig)
    if "curves" in results.get("tta", {}):
        import bench_tta

        written.append(bench_tta.plot(results["tta"], out / "time_to_accuracy.png"))
    return written


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    return str(path)


# ---------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    say = _progress(start)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "benchmarks.json"
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt's functorch deprecation notices

    machine = machine_info(device)
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: Dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "implicitgrad": ig.__version__,
        "machine": machine, "machine_line": machine_line(machine), "command": command.strip(),
        "settings": {"quick": args.quick, "reps": args.reps, "warmup": args.warmup, "threads": torch.get_num_threads(),
                     "sections": args.only},
        "peers": _peers(),
        "layer_peers": _peers(("torchdeq", "qpth", "cvxpylayers")),
    }
    say(results["machine_line"])
    if "backward" in args.only:
        import bench_backward

        results["backward"] = bench_backward.run(device, args.quick, args.reps, args.warmup, progress=say)
    if "memory" in args.only:
        import bench_memory

        results["memory"] = bench_memory.run(device, args.quick, args.reps, args.warmup,
                                             threads=torch.get_num_threads(), progress=say)
    if "accuracy" in args.only:
        import bench_accuracy

        results["accuracy"] = bench_accuracy.run(args.quick, progress=say)
    if "batched" in args.only:
        import bench_batched

        results["batched"] = bench_batched.run(device, args.quick, args.reps, args.warmup, progress=say)
    if "krylov" in args.only:
        import bench_krylov

        results["krylov"] = bench_krylov.run(device, args.quick, args.reps, args.warmup, progress=say)
    for section in ("deq", "qp"):
        if section in args.only:
            module = __import__(f"bench_{section}")
            results[section] = module.run(device, args.quick, args.reps, args.warmup, progress=say)
    for section, (module_name, function) in PERFORMANCE_RUNNERS.items():
        if section in args.only:
            runner = getattr(__import__(module_name), function)
            results[section] = runner(device, args.quick, args.reps, args.warmup, progress=say)

    results["checks"] = _checks(results)
    results["checks_ok"] = all(c["ok"] for c in results["checks"].values())
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["elapsed_s"] = time.perf_counter() - start

    text = markdown(results)
    print(text)
    (out / "benchmarks.md").write_text(text)
    (out / "tables.rst").write_text(rst(results))
    results["plots"] = plots(results, out)
    for case in results.get("backward", {}).get("cases", {}).values():
        for title, profile_text in case.get("profile", {}).items():
            print(f"--- profile: {case['description']}: {title}\n{profile_text}")
    for title, profile_text in results.get("tta", {}).get("jaxopt", {}).get("profile", {}).items():
        print(f"--- profile (JAXopt comparison): {title}\n{profile_text}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, default=str))
    say(f"wrote {json_path}, {out / 'benchmarks.md'}, {out / 'tables.rst'}, " + ", ".join(results["plots"]))
    if not results["checks_ok"]:
        failed = [name for name, c in results["checks"].items() if not c["ok"]]
        print(f"gradient-agreement check failed: {failed}", file=sys.stderr)
        return 1
    return 0


def _peers(names=("torchopt", "higher")) -> Dict[str, Optional[str]]:
    peers = {}
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = __import__(name)
            peers[name] = getattr(module, "__version__", "installed")
        except ImportError:
            peers[name] = None
    return peers


def _checks(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    checks = {}
    for name, case in results.get("backward", {}).get("cases", {}).items():
        checks[f"backward/{name}"] = case["check"]
    if results.get("memory", {}).get("check") is not None:
        checks["memory/maml"] = results["memory"]["check"]
    if "batched" in results:
        checks["batched"] = results["batched"]["check"]
    for name, case in results.get("krylov", {}).get("cases", {}).items():
        checks[f"krylov/{name}"] = case["check"]
    for section in ("deq", "qp"):
        if section in results:
            checks[section] = results[section]["check"]
    for name, case in results.get("call", {}).get("cases", {}).items():
        checks[f"call/{name}"] = case["check"]
    jax_cmp = results.get("tta", {}).get("jaxopt", {})
    if jax_cmp.get("check", {}).get("pairs"):
        checks["tta/jaxopt"] = jax_cmp["check"]
    if "products_check" in jax_cmp:
        checks["tta/products"] = jax_cmp["products_check"]
    return checks


if __name__ == "__main__":
    sys.exit(main())
