"""TorchOpt's functional optimizers (gradient transformations) as an inner solver."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

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

_INSTALL = "ig.solvers.TorchOpt needs the torchopt package: pip install implicitgrad[torchopt]"


def _import_torchopt():
    try:
        import torchopt
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    return torchopt


class TorchOpt(InnerSolver):
    r"""Minimise the inner objective with a TorchOpt gradient transformation.

    A transformation such as ``torchopt.adam(lr)`` or ``torchopt.sgd(lr, momentum)`` is a
    pair of pure functions; the solver runs

    .. math::

        s_0 = \text{init}(x_0), \qquad
        (u_k, s_{k+1}) = \text{update}(\nabla_x f(x_k, \theta), s_k, x_k), \qquad
        x_{k+1} = x_k + u_k

    (``torchopt.apply_updates``) on the tensor leaves of ``x0`` (passed to TorchOpt as a
    tuple, so ``x0`` may be any pytree), until
    :math:`\|\nabla_x f(x_k)\| \le \text{tol} \cdot \max(1, \|\nabla_x f(x_0)\|)` or
    ``maxiter`` updates. Gradients are computed on detached copies under
    ``torch.enable_grad()``; the input ``x0`` is never modified. Under
    ``torch.func.vmap`` the sum of the independent objectives is minimised jointly
    (``batchable = True``; TorchOpt's optimizers act element-wise, so each problem takes
    the steps it would take alone).

    Not unrollable here: TorchOpt's own differentiable optimizers serve that purpose; use
    :class:`~implicitgrad.solvers.GradientDescent` for ``mode="unrolled"``.

    Args:
        transform: a TorchOpt ``GradientTransformation`` (anything with
            ``init(params)`` and ``update(updates, state, params=...)``), e.g.
            ``torchopt.adam(1e-2)`` or ``torchopt.chain(...)``.
        maxiter: largest number of updates.
        tol: relative gradient norm at which to stop; ``None``: 1e-8 (float64), 1e-4
            otherwise; ``0``: always ``maxiter`` updates.
        check_every: updates between convergence checks (``None``: 1 on CPU, 10
            elsewhere).

    Raises:
        ImportError: torchopt is not installed (``pip install implicitgrad[torchopt]``).
        TypeError: ``transform`` is not a gradient transformation.
        ValueError: bad ``maxiter``, ``tol`` or ``check_every``.

    Example:
        >>> import torch, torchopt, implicitgrad as ig  # doctest: +SKIP
        >>> solver = ig.solvers.TorchOpt(torchopt.adam(0.1), maxiter=2000)  # doctest: +SKIP
        >>> f = lambda x, c: ((x - c) ** 2).sum()  # doctest: +SKIP
        >>> c = torch.ones(3, dtype=torch.float64)  # doctest: +SKIP
        >>> x, stats = solver.run(f, torch.zeros_like(c), c)  # doctest: +SKIP
        >>> stats.converged, bool(torch.allclose(x, c))  # doctest: +SKIP
        (True, True)

    References:
        Ren et al., TorchOpt: An Efficient Library for Differentiable Optimization, 2023.
    """

    unrollable = False
    batchable = True

    def __init__(
        self,
        transform: Any,
        maxiter: int = 1000,
        tol: Optional[float] = None,
        check_every: Optional[int] = None,
    ) -> None:
        _import_torchopt()
        if not (callable(getattr(transform, "init", None)) and callable(getattr(transform, "update", None))):
            raise TypeError(
                "TorchOpt: transform must be a TorchOpt gradient transformation with init() and "
                f"update(), e.g. torchopt.adam(1e-2); got {transform!r}. For torch.optim classes "
                "use ig.solvers.TorchOptimizer."
            )
        check_positive("maxiter", "TorchOpt", maxiter, integer=True)
        check_tol("TorchOpt", tol)
        if check_every is not None:
            check_positive("check_every", "TorchOpt", check_every, integer=True)
        self.transform, self.maxiter, self.tol, self.check_every = transform, maxiter, tol, check_every

    def __repr__(self) -> str:
        return f"TorchOpt({self.transform!r}, maxiter={self.maxiter}, tol={self.tol})"

    def run(self, fn: Callable, x0: Any, *params: Any) -> Tuple[Any, SolverStats]:
        torchopt = _import_torchopt()
        x_leaves, rebuild = flatten_x(x0)
        check_float_leaves("TorchOpt", x_leaves)
        x = tuple(t.detach() for t in x_leaves)
        tol = self.tol if self.tol is not None else default_tol(x[0].dtype)
        every = check_interval(self.check_every, x[0].device)

        def gradient(x):
            return tuple(objective_grad(fn, list(x), rebuild, params)[1])

        g = gradient(x)
        g_norm = float(leaves_norm(list(g)))
        threshold = relative_threshold(tol, g_norm)
        state = self.transform.init(x)
        steps, checked = 0, True
        while steps < self.maxiter and not (tol > 0 and checked and g_norm <= threshold):
            # ``g`` is a fresh tensor of this iteration, so the transformation may reuse it.
            updates, state = self.transform.update(g, state, params=x)
            x = tuple(torchopt.apply_updates(x, updates, inplace=False))
            steps += 1
            g = gradient(x)
            checked = tol > 0 and steps % every == 0
            if checked:
                g_norm = float(leaves_norm(list(g)))
                if not math.isfinite(g_norm):
                    break
        if not checked:
            g_norm = float(leaves_norm(list(g)))
        converged = None if tol == 0 else g_norm <= threshold
        message = "" if math.isfinite(g_norm) else "diverged: non-finite gradient; lower the step size"
        return rebuild(list(x)), SolverStats(steps, g_norm, converged, message)
