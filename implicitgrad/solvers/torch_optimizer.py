"""Any ``torch.optim`` optimizer as an inner solver."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple, Type

import torch

from ..linalg._base import check_interval
from ._base import (
    InnerSolver,
    SolverStats,
    check_float_leaves,
    check_positive,
    check_tol,
    default_tol,
    flatten_x,
    leaves_norm,
    objective_grad,
    relative_threshold,
)

_DEFAULT_MAXITER = 1000
_DEFAULT_LBFGS_MAXITER = 50


class TorchOptimizer(InnerSolver):
    r"""Minimise the inner objective with a ``torch.optim`` optimizer.

    The optimizer runs on detached copies of the tensor leaves of ``x0`` (leaf tensors that
    require grad), with gradients :math:`\nabla_x f(x, \theta)` computed under
    ``torch.enable_grad()``, so it works inside the ``torch.no_grad()`` forward of
    :func:`~implicitgrad.implicit_solve`. ``x0`` may be any pytree; every tensor leaf is one
    parameter of the optimizer. It stops when

    .. math::

        \|\nabla_x f(x_k, \theta)\| \le \text{tol} \cdot \max(1, \|\nabla_x f(x_0, \theta)\|)

    (norm over all leaves) or after ``maxiter`` calls of ``optimizer.step``. The reported
    residual is the gradient norm at the returned point.

    **L-BFGS.** ``torch.optim.LBFGS`` (and subclasses) is driven through its closure; one
    ``step`` runs up to its own ``max_iter`` iterations (torch's default 20) and at most
    ``max_eval`` evaluations, and ``maxiter`` counts ``step`` calls; ``iterations`` in the
    statistics is the total number of L-BFGS iterations. Unless given, the adapter sets

    * ``line_search_fn="strong_wolfe"`` (torch's default takes fixed steps of size ``lr``
      from the start, which can diverge far from the minimiser). The line search compares
      objective values and stalls once their differences reach rounding level — in float64
      typically around a gradient norm of 1e-8, in float32 far earlier. When a step leaves
      ``x`` unchanged, the adapter switches the line search off and continues with unit
      quasi-Newton steps, which the local quadratic model justifies near the minimiser;
      the point with the smallest gradient norm seen is returned. Passing
      ``line_search_fn`` explicitly disables this switch, and a stall then ends the run;
    * ``tolerance_grad`` to the adapter's threshold divided by :math:`\sqrt{n}` (``n``
      entries in total): L-BFGS ends a step when :math:`\max_i |g_i|` is below it, which
      implies the adapter's norm criterion;
    * ``tolerance_change`` to the smallest positive normal number of the dtype, so that
      only exact ties end a step early: torch's default 1e-9, an absolute bound on changes
      of the objective and of ``x``, ends every step long before a float64 gradient
      reaches 1e-8.

    **Batches.** Under ``torch.func.vmap`` the solver minimises the sum of the independent
    objectives jointly (``batchable = True``): the minimiser of the sum is the tuple of
    minimisers. Element-wise optimizers (SGD, Adam, ...) then take exactly the steps they
    would take on each problem; L-BFGS couples the problems through its line search and
    curvature pairs, which changes its path but not its limit. The stopping rule applies to
    the joint gradient.

    Not unrollable: for ``mode="unrolled"`` use
    :class:`~implicitgrad.solvers.GradientDescent`.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.Adam``
            (the class, not an instance).
        maxiter: largest number of ``optimizer.step`` calls; ``None``: 1000, or 50 for
            L-BFGS (50 steps of up to 20 iterations).
        tol: relative gradient norm at which to stop; ``None``: 1e-8 (float64), 1e-4
            otherwise; ``0``: always ``maxiter`` steps.
        check_every: steps between convergence checks (``None``: 1 on CPU, 10
            elsewhere); each check synchronises with the device.
        **kwargs: passed to ``optimizer_cls(params, **kwargs)`` (``lr``, ``momentum``,
            ``history_size``, ``max_iter``, ...).

    Raises:
        TypeError: ``optimizer_cls`` is not an optimizer class, or ``kwargs`` are not
            accepted by it.
        ValueError: bad ``maxiter``, ``tol``, ``check_every`` or an optimizer argument
            rejected by the optimizer (e.g. a negative ``lr``).

    Example:
        >>> import torch, implicitgrad as ig
        >>> solver = ig.solvers.TorchOptimizer(torch.optim.LBFGS)
        >>> f = lambda x, c: ((x["a"] - c) ** 2).sum() + (x["b"] + c).pow(2).sum()
        >>> x0 = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
        >>> x, stats = solver.run(f, x0, torch.tensor(2.0, dtype=torch.float64))
        >>> x["a"].round(decimals=8).tolist(), x["b"].round(decimals=8).tolist(), stats.converged
        ([2.0, 2.0], [-2.0, -2.0, -2.0], True)
    """

    unrollable = False
    batchable = True

    def __init__(
        self,
        optimizer_cls: Type[torch.optim.Optimizer],
        maxiter: Optional[int] = None,
        tol: Optional[float] = None,
        check_every: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(optimizer_cls, torch.optim.Optimizer):
            raise TypeError(
                "TorchOptimizer: pass the optimizer class and its arguments, not an instance: "
                f"TorchOptimizer(torch.optim.{type(optimizer_cls).__name__}, lr=...)."
            )
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(
                "TorchOptimizer: optimizer_cls must be a torch.optim.Optimizer subclass such as "
                f"torch.optim.Adam, got {optimizer_cls!r}."
            )
        if "params" in kwargs:
            raise TypeError("TorchOptimizer: do not pass params; the solver creates them from x0.")
        if maxiter is not None:
            check_positive("maxiter", "TorchOptimizer", maxiter, integer=True)
        check_tol("TorchOptimizer", tol)
        if check_every is not None:
            check_positive("check_every", "TorchOptimizer", check_every, integer=True)
        self.optimizer_cls = optimizer_cls
        self.closure_based = issubclass(optimizer_cls, torch.optim.LBFGS)
        if maxiter is None:
            maxiter = _DEFAULT_LBFGS_MAXITER if self.closure_based else _DEFAULT_MAXITER
        self.maxiter, self.tol, self.check_every = maxiter, tol, check_every
        self.kwargs = dict(kwargs)
        # Build once on a dummy parameter so that a wrong argument fails here, not mid-solve.
        self._make([torch.zeros(1, requires_grad=True)], 1e-8)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return (f"TorchOptimizer({self.optimizer_cls.__name__}, maxiter={self.maxiter}, "
                f"tol={self.tol}{extra})")

    def _make(self, leaves, tolerance_grad: float) -> torch.optim.Optimizer:
        kwargs = dict(self.kwargs)
        if self.closure_based:
            kwargs.setdefault("line_search_fn", "strong_wolfe")
            kwargs.setdefault("tolerance_grad", tolerance_grad)
            kwargs.setdefault("tolerance_change", torch.finfo(leaves[0].real.dtype).tiny)
        try:
            return self.optimizer_cls(leaves, **kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(
                f"TorchOptimizer: {self.optimizer_cls.__name__}(params, **{self.kwargs!r}) failed: {err}"
            ) from err

    def run(self, fn: Callable, x0: Any, *params: Any) -> Tuple[Any, SolverStats]:
        x, rebuild = flatten_x(x0)
        check_float_leaves("TorchOptimizer", x)
        leaves = [t.detach().clone().requires_grad_(True) for t in x]
        tol = self.tol if self.tol is not None else default_tol(leaves[0].dtype)

        def gradient():
            return objective_grad(fn, leaves, rebuild, params)[1]

        g = gradient()
        g_norm = float(leaves_norm(g))
        threshold = relative_threshold(tol, g_norm)
        size = sum(t.numel() for t in leaves)
        optimizer = self._make(leaves, threshold / math.sqrt(max(size, 1)))
        if self.closure_based:
            iterations, g_norm, message = self._run_closure(optimizer, fn, leaves, rebuild, params, g_norm,
                                                            threshold)
        else:
            iterations, g_norm = self._run_steps(optimizer, gradient, leaves, g, g_norm, tol, threshold)
            message = "" if math.isfinite(g_norm) else "diverged: non-finite gradient; lower the step size"
        converged = None if tol == 0 else g_norm <= threshold
        out = rebuild([t.detach() for t in leaves])
        return out, SolverStats(iterations, g_norm, converged, "" if converged else message)

    def _run_steps(self, optimizer, gradient, leaves, g, g_norm, tol, threshold):
        """First-order optimizers: set ``.grad`` from one evaluation, then ``step()``."""
        every = check_interval(self.check_every, leaves[0].device)
        steps, checked = 0, True
        while steps < self.maxiter and not (tol > 0 and checked and g_norm <= threshold):
            for t, gt in zip(leaves, g):
                t.grad = gt
            optimizer.step()
            steps += 1
            g = gradient()
            checked = tol > 0 and steps % every == 0
            if checked:
                g_norm = float(leaves_norm(g))
                if not math.isfinite(g_norm):
                    break
        if not checked:
            g_norm = float(leaves_norm(g))
        return steps, g_norm

    def _run_closure(self, optimizer, fn, leaves, rebuild, params, g_norm, threshold):
        """L-BFGS: ``step(closure)`` until the threshold, a stall, divergence or ``maxiter``.

        The strong-Wolfe line search compares objective values, so it stops making progress
        once their differences are at rounding level, usually before a tight gradient
        tolerance is met. Close to the minimiser the quasi-Newton model is accurate and unit
        steps are safe, so on such a stall the default line search is switched off and the
        iteration continues. The best point seen (smallest gradient norm) is returned.
        """

        def closure():
            value, grads = objective_grad(fn, leaves, rebuild, params)
            for t, gt in zip(leaves, grads):
                t.grad = gt
            return value

        can_relax = "line_search_fn" not in self.kwargs
        best_norm, best = g_norm, [t.detach().clone() for t in leaves]
        steps, message = 0, ""
        while steps < self.maxiter and not g_norm <= threshold:
            before = [t.detach().clone() for t in leaves]
            optimizer.step(closure)
            steps += 1
            g_norm = float(leaves_norm(objective_grad(fn, leaves, rebuild, params)[1]))
            if not math.isfinite(g_norm):
                message = "diverged: non-finite gradient; the best point seen is returned"
                break
            if g_norm < best_norm:
                best_norm, best = g_norm, [t.detach().clone() for t in leaves]
            if all(torch.equal(a, b) for a, b in zip(before, leaves)):
                if not can_relax:
                    message = "stalled: an L-BFGS step left x unchanged (rounding level reached)"
                    break
                for group in optimizer.param_groups:
                    group["line_search_fn"] = None
                can_relax = False
        with torch.no_grad():
            for t, b in zip(leaves, best):
                t.copy_(b)
        state = optimizer.state_dict()["state"]
        return int(state.get(0, {}).get("n_iter", steps)), best_norm, message
