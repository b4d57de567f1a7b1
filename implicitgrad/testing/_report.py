"""The report of a hypergradient check: numbers, verdicts and probable causes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from .._diagnostics import LinearSolveInfo
from .._tree import tree_flatten

REFERENCES = ("exact", "finite_differences", "unrolled")
CONDITION = {"objective": "‖∇ₓf‖", "residual": "‖F‖", "mapping": "‖x − T(x)‖"}


class HypergradientCheckError(AssertionError):
    """Raised by :func:`assert_hypergradient`; ``.report`` holds the full report."""

    def __init__(self, report: HypergradientReport) -> None:
        super().__init__(str(report))
        self.report = report


@dataclasses.dataclass
class HypergradientReport:
    """Outcome of :func:`check_hypergradient`.

    Parameter leaves are named by their path in the params tuple: ``"params[0]"`` for the
    first positional parameter, ``"params[1]['w']"`` for key ``"w"`` of the second.

    Attributes:
        ok: the forward and backward solves report convergence, the gradient is finite,
            and every computed reference agrees within its tolerance, for every parameter
            leaf and for the whole gradient.
        gradient: the implicit hypergradient, name → tensor.
        references: reference name (``"exact"``, ``"finite_differences"``,
            ``"unrolled"``) → name → tensor. For finite differences along random
            directions (``fd_directions``) the tensor holds the directional derivatives.
        errors: reference → relative error of the whole gradient (see module docstring).
        parameter_errors: reference → name → relative error of that leaf.
        tolerances: reference → tolerance its errors are held to.
        skipped: reference → why it was not computed.
        forward_residual: norm of the optimality condition at the returned ``x*``
            (``‖∇ₓf‖``, ``‖F‖`` or ``‖x − T(x)‖``).
        initial_residual: the same norm at ``x0``.
        forward_status: the core's verdict on the forward solve (``"converged"``,
            ``"not_converged"``, ``"nonfinite"``).
        forward_iterations: iterations the solver reported, if any.
        backward: the backward linear solve's :class:`~implicitgrad.LinearSolveInfo`.
        causes: what is probably wrong, most likely first (empty when ``ok``).
        warnings: warnings raised while computing, prefixed by the stage that raised them.
        settings: the arguments the check ran with (kind, solvers, step, dtype, ...).
    """

    ok: bool
    gradient: Dict[str, torch.Tensor]
    references: Dict[str, Dict[str, torch.Tensor]]
    errors: Dict[str, float]
    parameter_errors: Dict[str, Dict[str, float]]
    tolerances: Dict[str, float]
    skipped: Dict[str, str]
    forward_residual: float
    initial_residual: float
    forward_status: str
    forward_iterations: Optional[int]
    backward: Optional[LinearSolveInfo]
    causes: List[str]
    warnings: List[str]
    settings: Dict[str, Any]

    def __str__(self) -> str:
        s = self.settings
        n = sum(t.numel() for t in self.gradient.values())
        leaves = f"{len(self.gradient)} parameter {'leaf' if len(self.gradient) == 1 else 'leaves'}"
        lines = [
            f"Hypergradient check {'passed' if self.ok else 'FAILED'}: {s['kind']} form, {leaves} "
            f"({n} entr{'y' if n == 1 else 'ies'}), {s['dtype']}, outer called as {s['outer_call']}.",
            f"  solver {s['solver']}, linear solver {s['linear_solver']}.",
        ]
        it = "" if self.forward_iterations is None else f", {self.forward_iterations} iterations"
        lines.append(
            f"  forward: {self.forward_status}, {CONDITION[s['kind']]} = {self.forward_residual:.2e} "
            f"at x* (initial {self.initial_residual:.2e}){it}."
        )
        backward = str(self.backward).rstrip(".") if self.backward is not None else "not run"
        lines.append(f"  backward: {backward}.")
        lines.append(f"  {'reference':<20}{'error':>10}{'tolerance':>11}")
        for ref in REFERENCES:
            if ref in self.errors:
                verdict = "ok" if passes(self, ref) else "FAIL"
                lines.append(f"  {ref:<20}{self.errors[ref]:>10.2e}{self.tolerances[ref]:>11.0e}  {verdict}")
            elif ref in self.skipped:
                lines.append(f"  {ref:<20}  skipped: {self.skipped[ref]}")
        if len(self.gradient) > 1 or not self.ok:
            refs = [r for r in REFERENCES if r in self.parameter_errors]
            width = max(len("per parameter"), *(len(n) for n in self.gradient)) + 2
            columns = {r: max(len(r), 9) + 3 for r in refs}
            lines.append(f"  {'per parameter':<{width}}{'‖g‖':>9}" + "".join(f"{r:>{columns[r]}} " for r in refs))
            for name, g in self.gradient.items():
                row = f"  {name:<{width}}{float(g.norm()):>9.2e}"
                for r in refs:
                    error = self.parameter_errors[r][name]
                    mark = " " if error <= self.tolerances[r] else "*"
                    row += f"{error:>{columns[r]}.2e}{mark}"
                lines.append(row)
            if not self.ok:
                lines.append("  (* above tolerance)")
        if self.causes:
            lines.append("Probable causes:")
            lines.extend(f"  - {c}" for c in self.causes)
        if self.warnings:
            lines.append("Warnings raised during the check:")
            lines.extend(f"  - {w}" for w in self.warnings)
        return "\n".join(lines)


def diagnose(
    report: HypergradientReport,
    names: Sequence[str],
    finite: bool,
    exact_info: Any,
    moved: Sequence[bool],
    direct: Sequence[torch.Tensor],
    projections: Sequence[Optional[torch.Tensor]],
) -> List[str]:
    """Probable causes of a failed check, most specific first.

    ``exact_info`` is the :class:`~implicitgrad.SolveInfo` of the Exact reference (or
    ``None``), ``moved[k]`` whether the solver's output changed at all under the
    finite-difference perturbations of leaf ``k``, ``direct[k]`` the outer loss's direct
    term ``∂L/∂θ_k`` at fixed ``x*`` (zero when ``outer`` ignores the params), and
    ``projections[k]`` the random directions of that leaf (``None``: coordinates).
    """
    causes = []
    cond = CONDITION[report.settings["kind"]]
    if not finite:
        causes.append("The implicit hypergradient contains NaN/Inf: check x* and the outer loss for "
                      "non-finite values, and that the objective is twice differentiable at x*.")
    if report.forward_status != "converged":
        causes.append(
            f"The inner solve did not converge: {cond} = {report.forward_residual:.2e} at the returned x* "
            f"(initial {report.initial_residual:.2e}). The implicit function theorem assumes x* solves the "
            "inner problem; the gradient's error grows linearly with this residual. Run the solver longer "
            "or to a tighter tolerance (a solver stopped early gives exactly this)."
        )
    back = report.backward
    if back is not None and not back.converged:
        causes.append(
            f"The backward linear solve did not converge: {str(back).rstrip('.')}. For small problems, "
            "ig.Exact() removes the question."
        )
    if exact_info is not None and exact_info.backward is not None and exact_info.backward.status == "singular":
        causes.append(
            "The dense matrix of the optimality condition is singular at x*: x* is not an isolated "
            "solution and the implicit gradient is not defined. Regularise the inner problem."
        )
    if "exact" in report.errors and not passes(report, "exact") and (back is None or back.converged):
        causes.append(
            f"The implicit gradient differs from the Exact dense solve (error {report.errors['exact']:.2e}) "
            "although the linear solver reports convergence: its tolerance is too loose for this "
            "system's condition number, or the system is not what the solver assumes (CG on an "
            "indefinite Hessian — x* may be a saddle point or a maximum)."
        )
    if "finite_differences" in report.errors:
        fd = report.parameter_errors["finite_differences"]
        tol = report.tolerances["finite_differences"]
        atol = report.settings["atol"]
        exact_ok = "exact" not in report.errors or passes(report, "exact")
        generic = []
        for k, name in enumerate(names):
            if fd[name] <= tol:
                continue
            g = report.gradient[name]
            through_solver = g - direct[k]
            size = float(through_solver.norm())
            fd_value = report.references["finite_differences"][name]
            p = projections[k]
            d = direct[k] if p is None else p @ direct[k].reshape(-1)
            fd_through = float((fd_value - d.reshape(fd_value.shape)).norm())
            if not moved[k] and size > atol * tol:
                causes.append(
                    f"The solver ignores {name}: its output did not change at all when {name} was "
                    f"perturbed, yet the {report.settings['kind']} depends on it (the part of the implicit "
                    f"gradient through x* has norm {size:.2e}). The solver probably reads a captured or "
                    "stale copy of this parameter instead of the argument it is passed."
                )
            elif size > atol and fd_through <= 1e-3 * size:
                causes.append(
                    f"Finite differences through the solver barely respond to {name} (‖·‖ = {fd_through:.2e} "
                    f"against {size:.2e} from the implicit function theorem): the solver's output hardly "
                    "depends on this parameter — it may use a stale copy of it, or stop before moving."
                )
            else:
                generic.append(name)
        if generic and report.forward_status == "converged" and exact_ok:
            causes.append(
                f"Finite differences through re-solving disagree for {', '.join(generic)} although the "
                f"implicit gradient matches the Exact solve and {cond} = {report.forward_residual:.2e}: "
                "the solver's output does not follow the stated optimality condition as the parameters "
                "change (it solves a different problem, lands on different local solutions, or is not "
                "deterministic), or the finite differences are inaccurate — the solver's tolerance is too "
                f"loose for the step eps={report.settings['eps']:g} (noise ~ solve error / eps, truncation "
                "~ eps⁴): try a tighter solver tolerance, or a larger eps if the problem is smooth."
            )
    if "unrolled" in report.errors and not passes(report, "unrolled"):
        fd_ok = "finite_differences" in report.errors and passes(report, "finite_differences")
        causes.append(
            f"Unrolled differentiation disagrees (error {report.errors['unrolled']:.2e})"
            + (" while finite differences agree: " if fd_ok else ": ")
            + "the derivative of the iterates converges more slowly than the iterates themselves; run "
            "the solver for more iterations or to a tighter tolerance."
        )
    if any("not among params" in w for w in report.warnings):
        causes.append(
            "The inner function uses tensors that require grad without receiving them as params; they "
            "get no gradient through the implicit solve. Pass them as params."
        )
    if not causes:
        causes.append("No specific cause identified; see the per-parameter errors above.")
    return causes


def passes(report: HypergradientReport, ref: str) -> bool:
    tol = report.tolerances[ref]
    return report.errors[ref] <= tol and all(e <= tol for e in report.parameter_errors[ref].values())


def relative_error(actual: Any, expected: Any, atol: float = 0.0) -> float:
    r"""The relative error of ``actual`` against ``expected``, over every leaf, in float64.

    .. math::

        e = \frac{\|a - r\|_2}{\max(\|r\|_2,\ \text{atol})}

    with the norms taken over all leaves together. ``atol`` is the norm of ``expected``
    below which the error is judged absolutely (``atol=0``: purely relative; then an
    ``expected`` of zero gives 0 if ``actual`` equals it, else ``inf``). The values are
    detached and compared in float64; leaves broadcast against each other as in
    ``a - r``. A NaN or Inf gives ``inf``, so ``relative_error(...) <= tol`` fails.

    Args:
        actual: a Tensor, a number, or a pytree (tuple / list / dict) of them.
        expected: the reference, with the same leaves as ``actual`` (``None`` leaves
            must sit at the same places in both and are skipped).
        atol: the floor of the denominator, ``≥ 0``.

    Raises:
        ValueError: the two have different numbers of leaves, or ``None`` leaves at
            different places, or ``atol`` is negative.

    Example:
        >>> import torch
        >>> from implicitgrad.testing import relative_error
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
        0.18569533817705186
        >>> relative_error({"w": torch.ones(2)}, {"w": torch.ones(2)})
        0.0
    """
    if not atol >= 0:
        raise ValueError(f"relative_error: atol must be non-negative, got {atol!r}.")
    a_leaves, e_leaves = tree_flatten(actual)[0], tree_flatten(expected)[0]
    if len(a_leaves) != len(e_leaves):
        raise ValueError(
            f"relative_error: actual has {len(a_leaves)} leaves but expected has {len(e_leaves)}; "
            "compare values of the same structure."
        )
    diff_sq = scale_sq = 0.0
    for a, e in zip(a_leaves, e_leaves):
        if a is None or e is None:
            if a is not e:
                raise ValueError("relative_error: a None leaf of one argument faces a value in the other.")
            continue
        a, e = _float64(a), _float64(e)
        diff_sq += float(((a - e) ** 2).sum())
        scale_sq += float((e ** 2).sum())
    diff, denominator = math.sqrt(diff_sq), max(math.sqrt(scale_sq), atol)
    if denominator == 0:
        return 0.0 if diff == 0 else math.inf
    error = diff / denominator
    return error if math.isfinite(error) else math.inf


def _float64(value: Any) -> torch.Tensor:
    return torch.as_tensor(value).detach().to(torch.float64)
