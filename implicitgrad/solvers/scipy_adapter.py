"""``scipy.optimize.minimize`` as an inner solver."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

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

_EPS = float(np.finfo(np.float64).eps)
_INSTALL = "ig.solvers.SciPy needs scipy: pip install implicitgrad[scipy]"

#: Supported methods (lower case, as SciPy compares them) and their spelling in messages.
_METHODS = {
    "l-bfgs-b": "L-BFGS-B",
    "bfgs": "BFGS",
    "cg": "CG",
    "newton-cg": "Newton-CG",
    "trust-ncg": "trust-ncg",
    "trust-krylov": "trust-krylov",
}
#: Methods that use Hessian-vector products (computed by double backward).
_HESSP = frozenset({"newton-cg", "trust-ncg", "trust-krylov"})
#: ``minimize`` arguments that are not method options and that the adapter does not take.
_NOT_OPTIONS = frozenset({"bounds", "constraints", "jac", "hess", "hessp", "callback", "args", "x0", "method"})


def _import_minimize():
    try:
        from scipy.optimize import minimize
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    return minimize


class SciPy(InnerSolver):
    r"""Minimise the inner objective with ``scipy.optimize.minimize`` (``jac=True``).

    The tensor leaves of ``x0`` (any pytree) are flattened into one float64 NumPy vector;
    each evaluation rebuilds the tensors on their device and dtype, computes
    :math:`f(x, \theta)` and :math:`\nabla_x f` with autograd and returns them to SciPy.
    Newton-type methods (``Newton-CG``, ``trust-ncg``, ``trust-krylov``) also receive
    Hessian-vector products :math:`\nabla^2_x f\, v` by double backward.

    It stops as soon as an iterate satisfies
    :math:`\|\nabla_x f(x)\| \le \text{tol} \cdot \max(1, \|\nabla_x f(x_0)\|)` (checked
    in a ``callback`` after every iteration), or when the method stops on its own criteria,
    which are set so as not to stop earlier unless given in ``options``:

    ========================  ===============================================================
    method                    default options
    ========================  ===============================================================
    ``L-BFGS-B``              ``gtol`` = threshold / √n (it bounds max\|gᵢ\|), ``ftol`` = 0
    ``BFGS``, ``CG``          ``gtol`` = threshold, ``norm=2``
    ``trust-ncg/krylov``      ``gtol`` = threshold (Euclidean norm)
    ``Newton-CG``             ``xtol`` = 2.2e-16
    ========================  ===============================================================

    SciPy's line searches and trust-region tests compare objective values, so they stop
    once these differ only by rounding: in float64 typically at a gradient norm of 1e-11 to
    1e-8 relative to its initial value (L-BFGS-B reaches furthest; Newton-CG's absolute
    curvature test, :math:`g^\top H g \le 3\varepsilon`, stops it near 1e-8). The default
    ``tol`` of 1e-8 is within reach of ``L-BFGS-B``, ``BFGS`` and ``trust-ncg``; a
    tighter one may end unconverged.

    The gradient norm at the returned point is measured and reported. ``converged`` is true
    when that norm meets the threshold and SciPy did not report a failure; a
    ``success=False`` result (iteration limit, failed line search) is returned as is, with
    SciPy's message in ``SolverStats.message``, and :func:`~implicitgrad.implicit_solve`
    then warns from its own measurement of the residual.

    Under ``torch.func.vmap`` the independent objectives are summed and solved as one
    problem (``batchable = True``; its minimiser is the tuple of minimisers). Constraints
    and bounds are not supported: a constrained minimiser is not a stationary point, so the
    implicit gradient of :math:`\nabla_x f = 0` would not apply.

    Args:
        method: one of ``"L-BFGS-B"`` (default), ``"BFGS"``, ``"CG"``, ``"Newton-CG"``,
            ``"trust-ncg"``, ``"trust-krylov"`` (case-insensitive).
        maxiter: SciPy's ``maxiter`` option.
        tol: relative gradient norm to reach (positive); ``None``: 1e-8 (float64), 1e-4
            otherwise. SciPy always stops on its own criteria, so ``0`` is not accepted.
        **options: further method options for SciPy (``maxcor``, ``gtol``, ...); they take
            precedence over the defaults above.

    Raises:
        ImportError: scipy is not installed (``pip install implicitgrad[scipy]``).
        ValueError: an unsupported or gradient-free method, bad ``maxiter`` / ``tol``, or
            ``bounds`` / ``constraints`` / callables passed as options.
        TypeError: a complex or integer variable (at run time).

    Example:
        >>> import torch, implicitgrad as ig
        >>> solver = ig.solvers.SciPy("L-BFGS-B")
        >>> f = lambda x, c: ((x["a"] - c) ** 2).sum() + torch.cosh(x["b"]).sum()
        >>> x0 = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.ones(1, dtype=torch.float64)}
        >>> x, stats = solver.run(f, x0, torch.tensor(3.0, dtype=torch.float64))
        >>> bool(torch.allclose(x["a"], torch.full((2,), 3.0, dtype=torch.float64))), stats.converged
        (True, True)
    """

    unrollable = False
    batchable = True

    def __init__(
        self,
        method: str = "L-BFGS-B",
        maxiter: int = 1000,
        tol: Optional[float] = None,
        **options: Any,
    ) -> None:
        _import_minimize()
        if not isinstance(method, str) or method.lower() not in _METHODS:
            raise ValueError(
                f"SciPy: method must be one of {sorted(_METHODS.values())}, got {method!r}. "
                "Gradient-free and constrained methods are not supported: the implicit gradient "
                "needs a point where the objective's gradient vanishes."
            )
        check_positive("maxiter", "SciPy", maxiter, integer=True)
        check_tol("SciPy", tol, allow_zero=False)
        bad = sorted(_NOT_OPTIONS.intersection(options))
        if bad:
            raise ValueError(
                f"SciPy: {bad} cannot be passed; the adapter supplies the gradient (and "
                "Hessian-vector products) itself, and bounds or constraints would make the "
                "solution a non-stationary point. Express constraints through the objective or "
                "solve the KKT conditions with ig.root_solve."
            )
        self.method = _METHODS[method.lower()]
        self.maxiter, self.tol, self.options = maxiter, tol, dict(options)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"SciPy({self.method!r}, maxiter={self.maxiter}, tol={self.tol}{extra})"

    def _options(self, threshold: float, size: int) -> Dict[str, Any]:
        method = self.method.lower()
        if method == "l-bfgs-b":
            options = {"gtol": threshold / math.sqrt(max(size, 1)), "ftol": 0.0}
        elif method in ("bfgs", "cg"):
            options = {"gtol": threshold, "norm": 2}
        elif method == "newton-cg":
            options = {"xtol": _EPS}
        else:
            options = {"gtol": threshold}
        options.update(self.options)
        options["maxiter"] = self.maxiter
        return options

    def run(self, fn: Callable, x0: Any, *params: Any) -> Tuple[Any, SolverStats]:
        minimize = _import_minimize()
        leaves, rebuild = flatten_x(x0)
        check_float_leaves("SciPy", leaves, real=True)
        shapes = [t.shape for t in leaves]
        sizes = [t.numel() for t in leaves]
        dtype, device = leaves[0].dtype, leaves[0].device

        def to_leaves(z: np.ndarray) -> List[torch.Tensor]:
            flat = torch.tensor(np.asarray(z, dtype=np.float64), dtype=dtype, device=device)
            return [part.reshape(shape) for part, shape in zip(flat.split(sizes), shapes)]

        def to_numpy(tensors: List[torch.Tensor]) -> np.ndarray:
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            return flat.to(device="cpu", dtype=torch.float64).numpy()

        last: Dict[str, Any] = {}

        def fun(z):
            value, grads = objective_grad(fn, to_leaves(z), rebuild, params)
            g = to_numpy(grads)
            last.update(z=np.array(z, dtype=np.float64), g=g)
            return float(value), g

        def hessp(z, v):
            with torch.enable_grad():
                x = [t.detach().requires_grad_(True) for t in to_leaves(z)]
                value, grads = objective_grad(fn, x, rebuild, params, create_graph=True)
                if not any(g.requires_grad for g in grads):
                    return np.zeros_like(z)
                hv = torch.autograd.grad(grads, x, to_leaves(v), allow_unused=True, materialize_grads=True)
            return to_numpy(list(hv))

        z0 = to_numpy(leaves)
        g0 = fun(z0)[1]
        threshold = relative_threshold(self.tol if self.tol is not None else default_tol(dtype),
                                       float(np.linalg.norm(g0)))
        reached: Dict[str, np.ndarray] = {}
        calls = [0]

        def callback(xk):
            calls[0] += 1
            g = last["g"] if np.array_equal(last["z"], xk) else fun(xk)[1]
            if np.linalg.norm(g) <= threshold:
                reached["x"] = np.array(xk, dtype=np.float64)
                raise StopIteration

        try:
            result = minimize(
                fun, z0, jac=True, method=self.method,
                hessp=hessp if self.method.lower() in _HESSP else None,
                callback=callback, options=self._options(threshold, z0.size),
            )
        except StopIteration:
            # SciPy before 1.11 lets a callback's StopIteration propagate.
            result = None
        stopped = "x" in reached
        x = to_leaves(reached["x"] if stopped else result.x)
        g_norm = float(leaves_norm(objective_grad(fn, x, rebuild, params)[1]))
        if stopped:
            converged = g_norm <= threshold
            message = f"gradient norm {g_norm:.3e} <= {threshold:.3e}"
        else:
            converged = bool(result.success) and g_norm <= threshold
            message = str(result.message)
        iterations = calls[0] if result is None else int(getattr(result, "nit", calls[0]))
        return rebuild(x), SolverStats(iterations, g_norm, converged, message)
