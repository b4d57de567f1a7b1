"""Public entry points: ``implicit_solve``, ``root_solve``, ``fixed_point_solve``, ``implicit``."""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Literal, Optional, Tuple, TypeVar, Union, cast, overload

import torch

from ._compat import apply_function, host_readable, is_wrapped
from ._compiled import uses_compiled_backward
from ._defaults import default_linear_solver
from ._diagnostics import SolveInfo
from ._forward import Options, call_solver, defer_parameters, measure, settle_parameters, unread_parameters
from ._functions import Carry, ImplicitSolve
from ._problem import BUILDERS, Codec, Condition
from ._tree import is_float_tensor, tree_flatten
from ._validation import SettingError, check_forward_tol, check_linear_solver, check_on_failure
from ._warm import WarmStart
from .linalg._base import LinearSolverLike, entry_sum

__all__ = ["fixed_point_solve", "implicit", "implicit_solve", "root_solve"]

MODES = ("implicit", "unrolled")

X = TypeVar("X")  # the structure of x0, which the solution keeps


@overload
def implicit_solve(
    objective: Callable[..., torch.Tensor], x0: X, *params: Any, solver: Callable[..., Any],
    linear_solver: Optional[LinearSolverLike] = ..., mode: str = ..., on_failure: str = ...,
    return_info: Literal[False] = ..., forward_tol: Optional[float] = ...,
    warm_start: Optional[WarmStart] = ...,
) -> X: ...
@overload
def implicit_solve(
    objective: Callable[..., torch.Tensor], x0: X, *params: Any, solver: Callable[..., Any],
    linear_solver: Optional[LinearSolverLike] = ..., mode: str = ..., on_failure: str = ...,
    return_info: Literal[True], forward_tol: Optional[float] = ...,
    warm_start: Optional[WarmStart] = ...,
) -> Tuple[X, SolveInfo]: ...
@overload
def implicit_solve(
    objective: Callable[..., torch.Tensor], x0: X, *params: Any, solver: Callable[..., Any],
    linear_solver: Optional[LinearSolverLike] = ..., mode: str = ..., on_failure: str = ...,
    return_info: bool = ..., forward_tol: Optional[float] = ...,
    warm_start: Optional[WarmStart] = ...,
) -> Union[X, Tuple[X, SolveInfo]]: ...


def implicit_solve(
    objective: Callable[..., torch.Tensor],
    x0: Any,
    *params: Any,
    solver: Callable[..., Any],
    linear_solver: Optional[LinearSolverLike] = None,
    mode: str = "implicit",
    on_failure: str = "warn",
    return_info: bool = False,
    forward_tol: Optional[float] = None,
    warm_start: Optional[WarmStart] = None,
) -> Any:
    r"""Minimise ``objective(x, *params)`` over ``x`` and differentiate the minimiser.

    The solution :math:`x^\star(\theta)` satisfies :math:`\nabla_x f(x^\star, \theta) = 0`.
    By the implicit function theorem, with :math:`H = \nabla^2_{x} f` and
    :math:`B = \partial_\theta \nabla_x f` at :math:`(x^\star, \theta)`,

    .. math::

        \frac{\partial x^\star}{\partial \theta} = -H^{-1} B ,
        \qquad
        \frac{\partial L}{\partial \theta} = -B^\top u, \quad H u = \frac{\partial L}{\partial x^\star},

    so the backward pass is one linear solve with Hessian-vector products (``H`` is
    symmetric: :class:`CG` fits) and one vector-Jacobian product — independent of the path
    the solver took and of its number of iterations. The forward pass measures
    :math:`\nabla_x f` at the solution for its convergence check; when a backward pass can
    follow, it builds that gradient with its graph, which the first backward pass reuses
    (the memory of one evaluation of :math:`\nabla_x f`, held until then). Forward mode
    (``torch.func.jvp``) solves :math:`H \dot x = -B \dot\theta`. The error of the result is linear in
    :math:`\|\nabla_x f(x, \theta)\|` at the returned ``x``, which is measured and reported.

    Args:
        objective: ``objective(x, *params) -> scalar Tensor``, twice differentiable in
            ``x`` near the solution and differentiable in the params.
        x0: initial point, a Tensor or a pytree (nested tuple / list / dict) of floating
            Tensors; the solution has the same structure.
        *params: Tensors or pytrees; every floating Tensor leaf that requires grad —
            hyperparameters and data alike — receives a gradient. Non-tensor leaves are
            passed through unchanged.
        solver: ``solver(objective, x0, *params) -> x``; run under ``torch.no_grad()`` in
            implicit mode, so it need not be differentiable. Any callable: an
            ``ig.solvers`` solver, a closed form, a SciPy wrapper, a user's loop.
        linear_solver: solver for the backward system; default ``CG()``. Any
            :class:`~implicitgrad.LinearSolver`, or a plain callable
            ``linear_solver(matvec, b) -> x`` (or ``-> (x, info)`` with ``info`` built by
            :meth:`LinearSolveInfo.from_residual <implicitgrad.LinearSolveInfo.from_residual>`)
            on pytrees with the structure of ``x``.
        mode: ``"implicit"`` (default) or ``"unrolled"``: differentiate through the
            iterations of a built-in ``ig.solvers`` solver instead (memory grows with the
            number of iterations; for comparisons).
        on_failure: ``"warn"`` (default) issues :class:`ImplicitGradWarning`, ``"raise"``
            raises :class:`ConvergenceError`, ``"ignore"`` stays silent — for an
            unconverged forward or backward solve, negative curvature, non-finite values.
            ``"defer"`` reads no value back to the host during the call (forward and
            backward): every check keeps its numbers on the device, in the returned
            :class:`SolveInfo` (``return_info=True`` is required), and
            :meth:`SolveInfo.verify` reads them all at once and reports them. With a
            solver of fixed work (e.g. ``GradientDescent(tol=0)``) and ``ig.CG``, which then
            runs its ``maxiter`` iterations, the whole hypergradient can be captured in a
            CUDA graph, or checked every N outer steps instead of every step.
        return_info: also return a :class:`SolveInfo` (filled in by backward).
        forward_tol: the forward residual ``‖∇ₓf(x)‖`` is acceptable up to
            ``forward_tol · max(1, ‖∇ₓf(x0)‖)``; default 1e-6 (float64), 1e-3 (float32).
        warm_start: a :class:`~implicitgrad.WarmStart` shared by the calls that solve the
            same problem again (an outer loop): each linear solve starts from the previous
            call's solution instead of 0. Same result, fewer iterations when the problem
            changes slowly.

    Returns:
        ``x`` with the structure of ``x0`` (and ``info`` if ``return_info``).

    Raises:
        TypeError: ``objective`` or ``solver`` not callable, a wrong ``linear_solver``.
        ValueError: non-scalar objective, non-finite params, mixed dtypes or devices,
            solver output of another structure or shape than ``x0``, unknown ``mode``.
        ConvergenceError: a failed solve under ``on_failure="raise"``.

    Example:
        >>> import torch, implicitgrad as ig
        >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> def ridge(w, lam):
        ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> def closed_form(f, w0, lam):
        ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=X.dtype), X.T @ y)
        >>> w = ig.implicit_solve(ridge, torch.zeros(3, dtype=torch.float64), lam, solver=closed_form)
        >>> w.sum().backward()
        >>> A = X.T @ X + lam.detach() * torch.eye(3, dtype=X.dtype)
        >>> torch.allclose(lam.grad, -(torch.linalg.solve(A, w.detach())).sum())
        True

    References:
        Blondel et al., Efficient and Modular Implicit Differentiation, 2022.
    """
    # A solver of a composite problem (ig.solvers.ProximalGradient, ProjectedGradient) states
    # its optimality condition as a fixed point x = T(x, θ), whose matrix is not symmetric.
    optimality_mapping = getattr(solver, "optimality_mapping", None)
    if callable(optimality_mapping):
        return _solve("mapping", optimality_mapping(objective), x0, params, solver,
                      linear_solver, mode, on_failure, return_info, forward_tol, warm_start)
    return _solve("objective", objective, x0, params, solver, linear_solver, mode, on_failure,
                  return_info, forward_tol, warm_start)


@overload
def root_solve(
    residual: Callable[..., Any], x0: X, *params: Any, solver: Callable[..., Any],
    linear_solver: Optional[LinearSolverLike] = ..., mode: str = ..., on_failure: str = ...,
    return_info: Literal[False] = ..., forward_tol: Optional[float] = ...,
    warm_start: Optional[WarmStart] = ...,
) -> X: ...
@overload
def root_solve(
    residual: Callable[..., Any], x0: X, *params: Any, solver: Callable[..., Any],
    linear_solver: Optional[LinearSolverLike] = ..., mode: str = ..., on_failure: str = ...,
    return_info: Literal[True], forward_tol: Optional[float] = ...,
    warm_start: Optional[WarmStart] = ...,
) -> Tuple[X, SolveInfo]: ...
@overload
def root_solve(
    residual: Callable[..., Any], x0: X, *params: Any, solver: Callable[..., Any],
    linear_solver: Optional[LinearSolverLike] = ..., mode: str = ..., on_failure: str = ...,
    return_info: bool = ..., forward_tol: Optional[float] = ...,
    warm_start: Optional[WarmStart] = ...,
) -> Union[X, Tuple[X, SolveInfo]]: ...
def root_solve(
    residual: Callable[..., Any],
    x0: Any,
    *params: Any,
    solver: Callable[..., Any],
    linear_solver: Optional[LinearSolverLike] = None,
    mode: str = "implicit",
    on_failure: str = "warn",
    return_info: bool = False,
    forward_tol: Optional[float] = None,
    warm_start: Optional[WarmStart] = None,
) -> Any:
    r"""Solve ``residual(x, *params) = 0`` and differentiate the root.

    With :math:`A = \partial_x F` and :math:`B = \partial_\theta F` at the root, the
    backward pass solves :math:`A^\top u = \partial L / \partial x^\star` and returns
    :math:`-B^\top u`. ``A`` is in general not symmetric: the default linear solver is
    :class:`GMRES`. Arguments as in :func:`implicit_solve`, with ``residual`` returning a
    pytree of the structure of ``x``.

    Example:
        >>> import torch, implicitgrad as ig
        >>> a = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
        >>> newton = lambda F, x, a: torch.sqrt(a)
        >>> x = ig.root_solve(lambda x, a: x ** 2 - a, torch.tensor(1.0, dtype=torch.float64), a, solver=newton)
        >>> x.backward(); round(a.grad.item(), 6)   # d sqrt(a)/da = 1/(2 sqrt(a))
        0.25
    """
    return _solve("residual", residual, x0, params, solver, linear_solver, mode, on_failure,
                  return_info, forward_tol, warm_start)


@overload
def fixed_point_solve(
    mapping: Callable[..., Any], x0: X, *params: Any, solver: Optional[Callable[..., Any]] = ...,
    linear_solver: Optional[LinearSolverLike] = ..., mode: str = ..., on_failure: str = ...,
    return_info: Literal[False] = ..., forward_tol: Optional[float] = ...,
    warm_start: Optional[WarmStart] = ...,
) -> X: ...
@overload
def fixed_point_solve(
    mapping: Callable[..., Any], x0: X, *params: Any, solver: Optional[Callable[..., Any]] = ...,
    linear_solver: Optional[LinearSolverLike] = ..., mode: str = ..., on_failure: str = ...,
    return_info: Literal[True], forward_tol: Optional[float] = ...,
    warm_start: Optional[WarmStart] = ...,
) -> Tuple[X, SolveInfo]: ...
@overload
def fixed_point_solve(
    mapping: Callable[..., Any], x0: X, *params: Any, solver: Optional[Callable[..., Any]] = ...,
    linear_solver: Optional[LinearSolverLike] = ..., mode: str = ..., on_failure: str = ...,
    return_info: bool = ..., forward_tol: Optional[float] = ...,
    warm_start: Optional[WarmStart] = ...,
) -> Union[X, Tuple[X, SolveInfo]]: ...
def fixed_point_solve(
    mapping: Callable[..., Any],
    x0: Any,
    *params: Any,
    solver: Optional[Callable[..., Any]] = None,
    linear_solver: Optional[LinearSolverLike] = None,
    mode: str = "implicit",
    on_failure: str = "warn",
    return_info: bool = False,
    forward_tol: Optional[float] = None,
    warm_start: Optional[WarmStart] = None,
) -> Any:
    r"""Find ``x = mapping(x, *params)`` and differentiate the fixed point.

    The condition is :math:`F(x, \theta) = x - T(x, \theta) = 0`, so ``A = I − ∂ₓT``
    (default linear solver :class:`GMRES`). The default inner solver is
    :class:`~implicitgrad.solvers.AndersonAcceleration` (memory 5): near a fixed point of a
    contraction it needs far fewer evaluations of ``T`` than the plain iteration
    :math:`x \leftarrow T(x)`; for the plain (damped) iteration, whose convergence a
    contraction guarantees from any start, pass ``solver=ig.solvers.FixedPointIteration()``.
    Arguments as in :func:`implicit_solve`.

    Example:
        >>> import torch, implicitgrad as ig
        >>> c = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> x = ig.fixed_point_solve(lambda x, c: 0.5 * x + c, torch.tensor(0.0, dtype=torch.float64), c)
        >>> x.backward(); round(x.item(), 6), round(c.grad.item(), 6)   # x = 2c
        (4.0, 2.0)
    """
    if solver is None:
        from .solvers import AndersonAcceleration

        solver = AndersonAcceleration()
    return _solve("mapping", mapping, x0, params, solver, linear_solver, mode, on_failure,
                  return_info, forward_tol, warm_start)


def implicit(
    objective: Optional[Callable[..., torch.Tensor]] = None,
    *,
    residual: Optional[Callable[..., Any]] = None,
    mapping: Optional[Callable[..., Any]] = None,
    linear_solver: Optional[LinearSolverLike] = None,
    on_failure: str = "warn",
    forward_tol: Optional[float] = None,
    warm_start: Optional[WarmStart] = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make an existing ``fit(x0, *params) -> x*`` differentiable implicitly.

    Exactly one of ``objective``, ``residual``, ``mapping`` states the optimality
    condition the output of ``fit`` satisfies; ``fit`` itself can be any code (it runs
    under ``torch.no_grad()``). The decorated function takes an optional keyword
    ``return_info=True``.

    Example:
        >>> import torch, implicitgrad as ig
        >>> f = lambda x, t: ((x - t) ** 2).sum()
        >>> @ig.implicit(objective=f)
        ... def fit(x0, t):
        ...     return t.clone()            # the minimiser, found any way you like
        >>> t = torch.ones(3, dtype=torch.float64, requires_grad=True)
        >>> fit(torch.zeros(3, dtype=torch.float64), t).sum().backward()
        >>> t.grad
        tensor([1., 1., 1.], dtype=torch.float64)
    """
    given = [(k, v) for k, v in (("objective", objective), ("residual", residual),
                                 ("mapping", mapping)) if v is not None]
    if len(given) != 1:
        raise TypeError(
            "implicit: give exactly one of objective=, residual=, mapping= (the condition "
            f"the decorated function's output satisfies); got {[k for k, _ in given] or 'none'}."
        )
    kind, fn = given[0]

    def decorate(fit: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fit):
            raise TypeError("implicit(...) must decorate a callable fit(x0, *params).")

        def solver(_fn: Any, x0: Any, *params: Any) -> Any:
            return fit(x0, *params)

        @functools.wraps(fit)
        def wrapper(x0: Any, *params: Any, return_info: bool = False) -> Any:
            return _solve(kind, fn, x0, params, solver, linear_solver, "implicit", on_failure,
                          return_info, forward_tol, warm_start)

        return wrapper

    return decorate


def _solve(kind: str, fn: Any, x0: Any, params: Tuple[Any, ...], solver: Any, linear_solver: Any,
           mode: str, on_failure: str, return_info: bool, forward_tol: Optional[float],
           warm_start: Optional[WarmStart] = None) -> Any:
    """Check the arguments, build the condition once (``BUILDERS[kind]``), and solve.

    The default linear solver is CG for a condition that is symmetric by construction (an
    objective's Hessian), GMRES otherwise.
    """
    if not callable(fn):
        raise TypeError(f"The {kind} must be callable as {kind}(x, *params), got {type(fn).__name__}.")
    if solver is None or not callable(solver):
        raise TypeError(
            "solver must be a callable solver(fn, x0, *params) -> x, e.g. "
            "ig.solvers.GradientDescent(lr=0.1, maxiter=500) or a closed form."
        )
    check_linear_solver(linear_solver, example="ig.CG(), ig.GMRES(), ig.Neumann() or ig.Exact()")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    check_on_failure(on_failure, deferrable=True)
    check_forward_tol(forward_tol)
    if warm_start is not None and not isinstance(warm_start, WarmStart):
        raise TypeError(
            f"warm_start must be an ig.WarmStart() (one per problem that repeats) or None, got {warm_start!r}."
        )

    x_leaves, x_spec = tree_flatten(x0)
    p_leaves, p_spec = tree_flatten(tuple(params))
    x_tensors = [t for t in x_leaves if isinstance(t, torch.Tensor)]
    if not x_tensors:
        raise TypeError("x0 must be a Tensor or a pytree with at least one Tensor leaf.")
    for t in x_tensors:
        if not is_float_tensor(t):
            raise TypeError(
                f"x0 has a leaf of dtype {t.dtype}; the variable must be floating point. "
                "Pass integer data through params instead."
            )
    p_tensors = [t for t in p_leaves if isinstance(t, torch.Tensor)]
    _check_complex(x_leaves, p_leaves)
    defer = on_failure == "defer"
    _check_inputs(x_tensors, p_tensors)
    # The parameters' finiteness is read with the forward residual (deferred: at verify()).
    unread = unread_parameters(p_tensors)

    cond = BUILDERS[kind](fn, Codec(x_spec, tuple(x_leaves), p_spec, tuple(p_leaves)))
    if linear_solver is None:
        linear_solver = default_linear_solver(cond.symmetric)
    if defer:
        _check_deferrable(x_tensors + p_tensors, linear_solver, mode, return_info, warm_start)
    options = Options(solver, linear_solver, on_failure, forward_tol, warm_start)
    info = SolveInfo()
    if defer and unread:
        defer_parameters(info, unread)
    if mode == "unrolled":
        if unread:
            settle_parameters(float(cast(torch.Tensor, entry_sum(unread))), unread)
        x = _unrolled(cond, options, info, x_tensors, p_tensors)
    else:
        # The compiled backward linearises by itself: no graph of F is kept for it.
        carry = Carry(None if uses_compiled_backward(cond, linear_solver) else _backward_needs(p_tensors),
                      () if defer else unread)
        x = apply_function(ImplicitSolve, cond, options, info, carry, len(x_tensors), *x_tensors, *p_tensors)
    out = cond.codec.x_tree(list(x))
    return (out, info) if return_info else out


def _backward_needs(p: List[torch.Tensor]) -> Optional[List[bool]]:
    """The parameters a first-order backward pass of this call will differentiate, or
    ``None`` when none can follow (no grad mode, nothing requires grad) or when the call
    runs under a ``torch.func`` transform, whose backward takes the differentiable path."""
    if not torch.is_grad_enabled() or any(is_wrapped(t) for t in p):
        return None
    needs = [t.requires_grad and is_float_tensor(t) for t in p]
    return needs if any(needs) else None


def _unrolled(cond: Condition, options: Options, info: SolveInfo, x0: List[torch.Tensor],
              p: List[torch.Tensor]) -> List[torch.Tensor]:
    solver = options.solver
    if not getattr(solver, "unrollable", False):
        raise ValueError(
            f"mode='unrolled' differentiates through the iterations of a built-in solver "
            f"(ig.solvers.GradientDescent, ig.solvers.FixedPointIteration); "
            f"{type(solver).__name__} cannot be unrolled. Use mode='implicit'."
        )
    with torch.enable_grad():
        x, iterations, message = call_solver(cond, solver, list(x0), list(p))
    info.forward_iterations = iterations
    info.forward_message = message
    info.forward_residual = float(measure(cond, [t.detach() for t in x], p, options.on_failure)[0]
                                  .square().sum().sqrt())
    info.forward_status = "unrolled"
    return x


def _check_inputs(x_tensors: List[torch.Tensor], p_tensors: List[torch.Tensor]) -> None:
    """Check that x0 and the params share one floating dtype and one device, not "meta"."""
    tensors = x_tensors + p_tensors
    dtypes = {t.dtype for t in tensors if is_float_tensor(t)}
    if len(dtypes) > 1:
        raise ValueError(
            f"x0 and params mix floating dtypes {sorted(str(d) for d in dtypes)}; the condition and "
            "its derivatives would be computed in mixed precision. Cast every floating tensor to "
            "one dtype (e.g. .to(torch.float64))."
        )
    # 0-d tensors too: a scalar hyperparameter on another device is as wrong as a vector.
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(
            f"x0 and params live on different devices {sorted(str(d) for d in devices)}. Move them "
            "to one device (e.g. .to('cuda')), 0-d tensors included."
        )
    if tensors and tensors[0].is_meta:
        raise ValueError(
            "x0 and params are meta tensors: they have shapes but no values, so the inner "
            "problem cannot be solved nor its residual measured. Create them on a real device "
            "(e.g. torch.zeros(..., device='cpu'), or module.to_empty(device='cpu') followed "
            "by an initialisation)."
        )


def _check_deferrable(tensors: List[torch.Tensor], linear_solver: Any, mode: str, return_info: bool,
                      warm_start: Optional[WarmStart]) -> None:
    """What ``on_failure="defer"`` needs: somewhere to keep the checks, and nothing in the
    call that must read a value to decide."""
    if not return_info:
        raise SettingError(
            "on_failure='defer' keeps the checks in the SolveInfo for SolveInfo.verify(): pass "
            "return_info=True and call info.verify() after the backward pass (or every N steps)."
        )
    if mode != "implicit":
        raise SettingError("on_failure='defer' applies to mode='implicit'; the unrolled mode reads its residual.")
    if not getattr(linear_solver, "defers", False):
        raise SettingError(
            f"on_failure='defer' needs a linear solver that runs without host reads; "
            f"{type(linear_solver).__name__} reads its residual to decide when to stop. Use "
            "ig.CG(maxiter=K) (eager or compile=...), which then runs its K iterations, or "
            "on_failure='warn'."
        )
    if warm_start is not None:
        raise SettingError("on_failure='defer' does not support warm_start: a WarmStart reads the "
                           "solutions it keeps. Pass warm_start=None, or on_failure='warn'.")
    if not all(host_readable(t) for t in tensors):
        raise SettingError(
            "on_failure='defer' keeps device tensors for a later read, which a torch.func "
            "transform (vmap, grad, jvp) does not allow out of it: use on_failure='warn' or "
            "'ignore' inside transforms."
        )


def _check_complex(x_leaves: List[Any], p_leaves: List[Any]) -> None:
    """Complex variables and parameters are refused up front.

    The rules assume real ``x`` and ``θ`` (a Hessian, ``Aᵀu = v`` with the real transpose);
    for complex tensors the right rules are the Hermitian ones, which are not implemented.
    """
    for what, leaves in (("x0", x_leaves), ("params", p_leaves)):
        for i, t in enumerate(leaves):
            if isinstance(t, torch.Tensor) and t.is_complex():
                raise TypeError(
                    f"{what} has a complex leaf (leaf {i}, dtype {t.dtype}, shape "
                    f"{tuple(t.shape)}); implicit differentiation here is for real tensors. "
                    "Split it into real and imaginary parts (torch.view_as_real(t), and "
                    "torch.view_as_complex inside the function) and pass those instead."
                )
