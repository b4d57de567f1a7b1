"""Running the inner solver and checking what it returns."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ._compat import host_readable
from ._defaults import forward_tol as default_forward_tol
from ._diagnostics import SolveInfo, report
from ._identity import ByIdentity
from ._linearize import AutogradLinearization
from ._problem import Condition
from ._tree import is_float_tensor
from .linalg._base import finite_given_sum, nonfinite_flags, nonfinite_systems


@dataclasses.dataclass(frozen=True)
class Options:
    """How one implicit solve is run: checked once at the API boundary, never changed."""

    solver: Any
    linear_solver: Any
    on_failure: str = "warn"
    forward_tol: Optional[float] = None
    warm_start: Any = None  # a WarmStart, or None



#: Tensors known to be finite: a data tensor passed to every call (a design matrix, a
#: dataset) is summed once per in-place version, not once per call.
FINITE: ByIdentity[bool] = ByIdentity(64)
#: Tensors of fewer entries are cheaper to sum than to look up or remember.
REMEMBERED = 4096


def unread_parameters(p: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The floating parameters whose finiteness is still to be read: those the host can
    read and that are not known finite (:data:`FINITE`)."""
    return [t for t in p if is_float_tensor(t) and host_readable(t) and (t.numel() < REMEMBERED or not FINITE.get([t]))]


def nonfinite_parameter(shape: Tuple[int, ...]) -> str:
    return (f"a parameter of shape {shape} contains NaN/Inf; the inner problem "
            "and its gradient are undefined. Check the hyperparameters and data.")


def settle_parameters(total: float, tensors: Sequence[torch.Tensor]) -> None:
    """Raise ``ValueError`` naming a parameter with NaN/Inf, given the sum of the entries
    of ``tensors`` read by the host; remember the large finite ones (:data:`FINITE`)."""
    if not finite_given_sum(total, tensors):
        bad = next(t for t in tensors if not bool(torch.isfinite(t).all()))
        raise ValueError(nonfinite_parameter(tuple(bad.shape)))
    for t in tensors:
        if t.numel() >= REMEMBERED:
            FINITE.put([t], True)


def defer_parameters(info: SolveInfo, tensors: Sequence[torch.Tensor]) -> None:
    """The parameters' finiteness, kept on the device for :meth:`SolveInfo.verify`
    (``on_failure="defer"``), which raises the ``ValueError`` of :func:`settle_parameters`."""
    flags = torch.stack([~torch.isfinite(t).all() for t in tensors]).double()

    def settle(values: List[float]) -> None:
        bad = next((t for t, flag in zip(tensors, values) if flag), None)
        if bad is not None:
            raise ValueError(nonfinite_parameter(tuple(bad.shape)))

    info.defer(flags, settle)


def call_solver(
    cond: Condition, solver: Any, x0: List[torch.Tensor], p: List[torch.Tensor]
) -> Tuple[List[torch.Tensor], Optional[int], str]:
    """``solver(fn, x0, *params)`` → (tensor leaves of x, iterations or None, message).

    A batched problem passes its vmapped function to solvers that declare
    ``batchable = True`` (the built-in ones: a sum of independent objectives is solved
    jointly); any other solver is called once per problem of the batch.
    """
    if cond.parent is not None and not getattr(solver, "batchable", False):
        outs, iters, messages = [], [], []
        for i in range(x0[0].shape[0] if x0 else 0):
            xi, it, msg = call_solver(cond.parent, solver, [t[i] for t in x0], [t[i] for t in p])
            outs.append(xi)
            iters.append(it)
            messages.append(msg)
        x = [torch.stack(ts) for ts in zip(*outs)]
        known = [i for i in iters if i is not None]
        return x, (max(known) if known else None), "; ".join(sorted({m for m in messages if m}))
    x_tree, params = cond.codec.x_tree(x0), cond.codec.params_tree(p)
    if hasattr(solver, "run"):
        extra = {"batch_ndim": cond.batch_ndim} if getattr(solver, "per_system", False) else {}
        out, stats = solver.run(cond.fn, x_tree, *params, **extra)
        iterations, message = getattr(stats, "iterations", None), getattr(stats, "message", "")
    else:
        out, iterations, message = solver(cond.fn, x_tree, *params), None, ""
    return cond.codec.x_leaves(out, "the solver's output"), iterations, message


def measure(cond: Condition, x: List[torch.Tensor], p: List[torch.Tensor], on_failure: str,
            p_needs: Optional[Sequence[bool]] = None) -> Tuple[torch.Tensor, Optional[AutogradLinearization]]:
    """``‖F(x, θ)‖`` per problem, and a warning about tensors the function captures.

    With ``p_needs`` (a backward pass may follow) ``F`` is built with its graph on ``x`` and
    the parameters in ``p_needs``, and that linearisation is returned for the backward
    pass to reuse; without, ``F`` is evaluated and its graph dropped.
    """
    if p_needs is not None:
        lin = AutogradLinearization(cond, x, p, list(p_needs))
        F, outputs, xs, ps = lin.F, lin.outputs, lin.x, lin.p
    else:
        lin = None
        F, outputs, xs, ps = cond.evaluate(x, p)
    cond.check_graph(outputs, xs, ps, on_failure)
    return cond.norms(F), lin


def run_forward(cond: Condition, options: Options, info: SolveInfo, x0: List[torch.Tensor],
                p: List[torch.Tensor], p_needs: Optional[Sequence[bool]] = None,
                unread: Sequence[torch.Tensor] = ()
                ) -> Tuple[List[torch.Tensor], Optional[AutogradLinearization], Optional[torch.Tensor]]:
    """Solve, then measure the forward residual into ``info`` and report it.

    Returns ``x``, the linearisation at ``x`` built by the measurement when ``p_needs`` is
    given (the backward pass reuses it instead of building ``F`` again), and the per-problem
    flags of a non-finite ``x`` (``None`` when ``x`` is finite). The residuals, the
    finiteness of ``x`` and that of the parameters ``unread`` (a ``ValueError`` naming the
    one with NaN/Inf, raised before anything else is reported) are read by the host once;
    the residual at ``x0``, the scale of the tolerance, is evaluated only when the residual
    at ``x`` exceeds ``forward_tol``. With ``on_failure="defer"`` nothing is read: the
    residuals and the flags stay on the device, kept in ``info`` for
    :meth:`SolveInfo.verify`, and the flags go to the backward pass.
    """
    x0 = [t.detach() for t in x0]
    p = [t.detach() for t in p]
    with torch.no_grad():
        x, iterations, message = call_solver(cond, options.solver, x0, p)
    x = [t.detach() for t in x]
    info.forward_iterations = iterations
    info.forward_message = message
    info._batched = bool(cond.batch_ndim)
    tol = options.forward_tol
    if tol is None:
        tol = default_forward_tol(x[0].dtype if x else torch.float32)

    def initial() -> List[float]:
        return cond.value_norms(x0, p).reshape(-1).tolist()

    residuals, lin = measure(cond, x, p, options.on_failure, p_needs)
    if options.on_failure == "defer":
        bad = nonfinite_flags([x], cond.batch_ndim)
        info.forward_status = "deferred"
        info.defer(torch.cat([residuals.reshape(-1), bad.any().to(residuals.dtype).reshape(1)]),
                   lambda values: judge_forward(info, values[:-1], not values[-1], initial, tol))
        return x, lin, bad
    # The residuals and the sum of the entries of each of x and the parameters, read
    # together: a finite total proves them all finite (only a non-finite one sends each
    # tensor to its own test).
    values = _read_with_sums(residuals, [*x, *unread])
    combined = sum(values[residuals.numel():])
    del values[residuals.numel():]
    if unread:
        settle_parameters(combined, unread)
    finite = finite_given_sum(combined, x)
    verdict = judge_forward(info, values, finite, initial, tol)
    if verdict is not None:
        report(verdict, options.on_failure)
    if not finite:
        return x, None, nonfinite_systems(None, x, None, cond.batch_ndim)
    return x, lin, None


def _read_with_sums(values: torch.Tensor, tensors: Sequence[torch.Tensor]) -> List[float]:
    """The entries of ``values`` followed by the sum of the entries of each of ``tensors``
    (those with entries), read by the host in one read."""
    dtype = values.dtype
    sums = [s if s.dtype == dtype else s.to(dtype) for s in (t.detach().sum() for t in tensors if t.numel())]
    if values.dim() == 0:  # one problem: one stack of numbers
        return torch.stack([values, *sums]).tolist()
    return (torch.cat([values.reshape(-1), torch.stack(sums)]) if sums else values.reshape(-1)).tolist()


def judge_forward(info: SolveInfo, values: List[float], finite: bool, initial: Callable[[], List[float]],
                  tol: float) -> Optional[str]:
    """Fill ``info``'s forward fields from the residuals at ``x`` (one per problem, read by
    the host) and say what to report: ``None`` when ``x`` is finite and stationary.

    Every problem of a batch meets its own tolerance, ``tol · max(1, its initial
    residual)``: a well-solved problem cannot hide an unsolved one in a batch norm. The
    initial residuals (``initial()``, one evaluation of the condition at ``x0``) are
    computed only when a residual exceeds ``tol``; otherwise on first access.
    """
    if not finite:
        info.forward_status = "nonfinite"
        info.forward_residual = float("nan")
        return ("The inner solver returned a solution with NaN/Inf entries; its gradient would "
                "be meaningless. Lower the inner step size, add regularisation, or check the "
                "objective for overflow.")
    residual = math.sqrt(sum(v * v for v in values))
    info.forward_residual = residual
    if info._batched:
        info.forward_residuals = list(values)
    if all(v <= tol for v in values):
        info._initial = initial
        info.forward_status = "converged"
        return None
    initials = initial()
    info._initial = initials
    thresholds = [tol * max(1.0, i) for i in initials]
    failed = [i for i, (v, t) in enumerate(zip(values, thresholds)) if not v <= t]
    if not failed:
        info.forward_status = "converged"
        return None
    info.forward_status = "not_converged"
    iterations, message = info.forward_iterations, info.forward_message
    it = "" if iterations is None else f" after {iterations} iterations"
    said = f" The solver said: {message}." if message else ""
    if info._batched:
        worst = max(failed, key=lambda i: values[i] / thresholds[i])
        where = (f" in {len(failed)} of {len(values)} problems of the batch (worst: "
                 f"{values[worst]:.3e}, initial {initials[worst]:.3e}, "
                 f"tolerance {thresholds[worst]:.3e})")
    else:
        where = f" (initial {initials[0]:.3e}, tolerance {thresholds[0]:.3e})"
    return (
        f"The inner solution is not stationary: ‖condition‖ = {residual:.3e}{it}{where}.{said} "
        "The implicit gradient assumes x* solves the inner problem; its error grows linearly "
        "with this residual. Run the inner solver longer or to a tighter tol, or pass a larger "
        "forward_tol if this accuracy is enough."
    )
