"""The two autograd Functions behind every implicit solve.

``ImplicitSolve`` returns ``x*(θ)``; its backward and forward-mode rules are written
with ordinary differentiable torch operations plus ``LinearSolve``, and ``LinearSolve``'s
own rules are written the same way, so derivatives of any order, ``torch.func.grad``,
``jvp`` and ``vmap`` compose. Both Functions are defined once, with a ctx-free
``forward`` and a separate ``setup_context`` as ``torch.func`` requires.

Rules, with ``A = ∂ₓF(x*, θ)`` and ``B = ∂_θF(x*, θ)``:

* ``ImplicitSolve`` backward: solve ``Aᵀ u = v``, return ``−Bᵀ u``; forward mode:
  ``ẋ = A⁻¹(−B θ̇)``.
* ``LinearSolve`` (``z = Op(x, θ)⁻¹ b`` with ``Op`` = ``A`` or ``Aᵀ``) backward: solve
  ``Opᵀ w = z̄``, return ``b̄ = w`` and ``−∂_{x,θ}⟨w, Op(x, θ) z⟩``; forward mode:
  ``ż = Op⁻¹(ḃ − Ȯp z)``.
* ``vmap`` of either: one call on the batched problem (block-diagonal systems).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Callable, List, Tuple

import torch

from ._compat import (
    add_legacy_batch_dim,
    is_legacy_batched,
    is_wrapped,
    legacy_vmap_level,
    remove_legacy_batch_dim,
)
from ._diagnostics import report
from ._forward import run_forward
from ._problem import Problem
from .linalg._base import (
    PytreeLayout,
    nonfinite_systems,
    poison,
    product_precision,
    propagate_nonfinite,
    run_linear_solver,
)

__all__ = ["ImplicitSolve", "LinearSolve"]

#: Dtypes whose linear solves run in float32: their reductions lose too much precision.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _wrapped(tensors: Sequence) -> bool:
    return any(is_wrapped(t) for t in tensors)


def host_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read on the host (``bool()``, ``float()``): not a
    batched or otherwise wrapped tensor, not a meta tensor."""
    return not (is_wrapped(t) or is_legacy_batched(t) or t.is_meta)


def _per_slice(rule: Callable) -> Callable:
    """Run an autograd rule once per slice of tensors batched by ``torch.autograd``'s vmap.

    That vmap has no rule for the host reads a linear solve makes (its stopping tests), so
    the batched cotangents or tangents are split into plain tensors, the rule runs on each,
    and the results are batched again.
    """

    @functools.wraps(rule)
    def wrapper(ctx, *args):
        if not any(is_legacy_batched(a) for a in args):
            return rule(ctx, *args)
        level = legacy_vmap_level()
        physical = [remove_legacy_batch_dim(a, level) if is_legacy_batched(a) else a for a in args]
        size = next(t.shape[0] for t, a in zip(physical, args) if is_legacy_batched(a))
        results = [
            rule(ctx, *[t[i] if is_legacy_batched(a) else a for t, a in zip(physical, args)])
            for i in range(size)
        ]
        return tuple(
            None if column[0] is None else add_legacy_batch_dim(torch.stack(column), level)
            for column in zip(*results)
        )

    return wrapper


def _differentiable(*groups) -> bool:
    """Whether a rule's result must itself be differentiable (create_graph or torch.func)."""
    return torch.is_grad_enabled() or any(_wrapped(g) for g in groups)


def _fresh(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Tuple:
    """Outputs must not alias inputs of the Function."""
    ptrs = {t.data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    return tuple(t.clone() if t.numel() and t.data_ptr() in ptrs else t for t in outputs)


def _move_batch(args: Sequence, in_dims: Sequence, size: int) -> List[torch.Tensor]:
    """Put the vmapped dimension first on every tensor, expanding unbatched ones."""
    out = []
    for a, d in zip(args, in_dims):
        if d is None:
            out.append(a.unsqueeze(0).expand(size, *a.shape))
        else:
            out.append(a.movedim(d, 0))
    return out


def solve_linear(problem: Problem, lin, transpose: bool, b: List[torch.Tensor]):
    """Run the problem's linear solver on ``A`` or ``Aᵀ`` and report its outcome.

    float16 / bfloat16 systems are solved in float32 (the products stay in the problem's
    dtype; the solver's vectors and reductions, whose sums of many rounded terms would
    stall or overflow, do not), for every solver alike. A solve that met non-finite
    values returns NaN for the systems concerned, never a finite guess.
    """
    op = lin.rmatvec if transpose else lin.matvec
    dtype = b[0].dtype
    layout = PytreeLayout(problem.x_spec, problem.x_template, problem.batch_ndim)
    n = problem.batch_ndim
    if dtype in LOW_PRECISION:
        low_op = op

        def op(v):  # noqa: F811 - the same product, computed in the problem's dtype
            return [o.float() for o in low_op([t.to(dtype) for t in v])]

        b = [t.float() for t in b]
    with product_precision(dtype):
        if problem.kind != "objective" and getattr(problem.linear_solver, "symmetric", False):
            _check_symmetric(problem, op, b)
        solution, info = run_linear_solver(problem.linear_solver, op, b, batch_ndim=n, layout=layout)
    solution = [t.to(dtype) for t in propagate_nonfinite(op, b, solution, info, n)]
    problem.record(info)
    worse_than_zero = info.residual > 1
    if not info.converged or worse_than_zero:
        failures = []
        if not info.converged:
            failures.append("did not converge")
        if worse_than_zero:
            # u = 0 has relative residual 1: anything above is worse than no solve at all.
            failures.append(
                f"returned a solution worse than zero (relative residual {info.residual:.3e} "
                "> 1, the residual of u = 0). For a symmetric indefinite matrix use ig.MINRES, "
                "for a non-symmetric one ig.GMRES; or add damping, or solve the inner problem "
                "further"
            )
        report(
            f"implicit differentiation: the linear solve for the "
            f"{'backward' if transpose else 'forward-mode'} pass {' and '.join(failures)}. {info}",
            problem.on_failure,
        )
    return solution


def _check_symmetric(problem: Problem, op: Callable, b: List[torch.Tensor]) -> None:
    """Measures whether ``A`` is symmetric before a solver that assumes it (CG, MINRES) runs.

    With ``u = b`` and a fixed, non-random probe ``w``: ``|⟨Au, w⟩ − ⟨u, Aw⟩| ≤ τ ‖Au‖‖w‖``
    per system, ``τ = 1e3·ε`` of the dtype (products of a symmetric ``A`` agree to rounding).
    Two products; skipped on batched tensors, whose values the host cannot read.
    """
    if not all(host_readable(t) for t in b):
        return
    n = problem.batch_ndim
    w = [torch.sin(1.0 + 0.7548776662 * torch.arange(t.numel(), device=t.device, dtype=t.dtype)).reshape(t.shape)
         for t in b]
    au, aw = op(list(b)), op(w)

    def inner(x, y):
        return sum((xi * yi).reshape(*xi.shape[:n], -1).sum(-1) for xi, yi in zip(x, y))

    gap = (inner(au, w) - inner(b, aw)).abs()
    scale = inner(au, au).sqrt() * inner(w, w).sqrt()
    tau = 1e3 * torch.finfo(b[0].dtype).eps
    asymmetric = gap > tau * scale
    if bool(asymmetric.any()):
        kind = "I − ∂ₓT" if problem.kind == "mapping" else "∂ₓF"
        worst = float((gap / scale.clamp_min(torch.finfo(b[0].dtype).tiny)).max())
        report(
            f"{type(problem.linear_solver).__name__} assumes a symmetric matrix, but the {problem.kind} "
            f"condition's matrix A = {kind} is not symmetric: measured |⟨Au, w⟩ − ⟨u, Aw⟩| / (‖Au‖‖w‖) = "
            f"{worst:.2e}. The backward solve can stop with a wrong gradient. Use linear_solver=ig.GMRES() "
            "(or ig.BiCGStab(), or ig.Exact() for small problems).",
            "ignore" if problem.on_failure == "ignore" else "warn",
        )


def vjp(problem: Problem, x, p, v, p_needs) -> List:
    """``−(∂_θF)ᵀ (∂ₓF)⁻ᵀ v`` for the parameters in ``p_needs``."""
    if not any(p_needs):
        return [None] * len(p)
    # At a non-finite solution the derivative is undefined: NaN, whatever the products give.
    bad_x = nonfinite_systems(None, x, None, problem.batch_ndim)
    v = poison(list(v), bad_x, problem.batch_ndim)
    if not all(bool(torch.isfinite(t).all()) for t in v if host_readable(t)):
        report(
            "implicit differentiation: the incoming gradient with respect to x* contains "
            "NaN/Inf; the hypergradient will be non-finite. Check the outer loss.",
            problem.on_failure,
        )
    if not _differentiable(x, p, v):
        # First order: one graph of F serves every product and the final VJP.
        lin = problem.linearize(x, p, p_needs, differentiable=False)
        u = solve_linear(problem, lin, True, list(v))
    else:
        nx = len(x)
        u = list(LinearSolve.apply(problem, True, nx, *x, *p, *v))
        lin = problem.linearize(x, p, p_needs, differentiable=True)
    grads = lin.vjp_params(u)
    return [None if g is None else -g for g in grads]


class ImplicitSolve(torch.autograd.Function):
    """``x* = solver(x0, θ)`` with the implicit-function-theorem derivative."""

    @staticmethod
    def forward(problem: Problem, nx: int, *leaves):
        x0, p = list(leaves[:nx]), list(leaves[nx:])
        x = run_forward(problem, x0, p)
        return _fresh(x, leaves)

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, nx = inputs[0], inputs[1]
        p = inputs[2 + nx :]
        ctx.problem, ctx.nx = problem, nx
        ctx.save_for_backward(*output, *p)
        ctx.save_for_forward(*output, *p)

    @staticmethod
    @_per_slice
    def backward(ctx, *v):
        nx = ctx.nx
        saved = ctx.saved_tensors
        x, p = list(saved[:nx]), list(saved[nx:])
        p_needs = list(ctx.needs_input_grad[2 + nx :])
        grads = vjp(ctx.problem, x, p, list(v), p_needs)
        return (None, None) + (None,) * nx + tuple(grads)

    @staticmethod
    @_per_slice
    def jvp(ctx, _problem, _nx, *tangents):
        nx, problem = ctx.nx, ctx.problem
        saved = ctx.saved_tensors
        x, p = list(saved[:nx]), list(saved[nx:])
        p_dot = list(tangents[nx:])
        if all(t is None for t in p_dot):
            return tuple(torch.zeros_like(t) for t in x)
        p_needs = [t is not None for t in p_dot]
        given = [t for t in p_dot if t is not None]
        # Nested forward-mode AD is unsupported, so plain dual tensors take the autograd
        # path; a result that must be differentiable again takes the torch.func path.
        differentiable = _wrapped(x + p + given) or (
            torch.is_grad_enabled() and any(t.requires_grad for t in x + p + given)
        )
        lin = problem.linearize(x, p, p_needs, differentiable=differentiable)
        rhs = [-r for r in lin.jvp(None, p_dot)]
        if differentiable:
            return tuple(LinearSolve.apply(problem, False, nx, *x, *p, *rhs))
        return tuple(solve_linear(problem, lin, False, rhs))

    @staticmethod
    def vmap(info, in_dims, problem, nx, *leaves):
        moved = _move_batch(leaves, in_dims[2:], info.batch_size)
        batched = problem.batched(moved[:nx])
        out = ImplicitSolve.apply(batched, nx, *moved)
        return out, (0,) * len(out)


class LinearSolve(torch.autograd.Function):
    """``z = Op(x, θ)⁻¹ b`` with ``Op = ∂ₓF`` or its transpose, differentiable in all."""

    @staticmethod
    def forward(problem: Problem, transpose: bool, nx: int, *leaves):
        x, p, b = _split(leaves, nx)
        lin = problem.linearize(x, p, [False] * len(p), differentiable=False)
        z = solve_linear(problem, lin, transpose, list(b))
        return _fresh(z, leaves)

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, transpose, nx = inputs[:3]
        x, p, _ = _split(inputs[3:], nx)
        ctx.problem, ctx.transpose, ctx.nx = problem, transpose, nx
        ctx.save_for_backward(*x, *p, *output)
        ctx.save_for_forward(*x, *p, *output)

    @staticmethod
    @_per_slice
    def backward(ctx, *z_bar):
        problem, transpose, nx = ctx.problem, ctx.transpose, ctx.nx
        x, p, z = _split(ctx.saved_tensors, nx)
        needs = ctx.needs_input_grad[3:]
        x_needs, p_needs = needs[:nx], needs[nx : len(needs) - nx]
        w = list(LinearSolve.apply(problem, not transpose, nx, *x, *p, *z_bar))
        gx, gp = [None] * nx, [None] * len(p)
        if any(x_needs) or any(p_needs):
            lin = problem.linearize(x, p, p_needs, differentiable=True)
            px, pp = lin.op_partials(w, z, transpose)
            gx = [-g if need else None for g, need in zip(px, x_needs)]
            gp = [None if g is None else -g for g in pp]
        return (None, None, None, *gx, *gp, *w)

    @staticmethod
    @_per_slice
    def jvp(ctx, _problem, _transpose, _nx, *tangents):
        problem, transpose, nx = ctx.problem, ctx.transpose, ctx.nx
        x, p, z = _split(ctx.saved_tensors, nx)
        x_dot, p_dot, b_dot = _split(tangents, nx)
        p_needs = [t is not None for t in p_dot]
        rhs = [torch.zeros_like(t) if d is None else d for t, d in zip(z, b_dot)]
        if any(t is not None for t in x_dot) or any(p_needs):
            lin = problem.linearize(x, p, p_needs, differentiable=True)
            d_op_z = lin.op_jvp(z, transpose, x_dot, p_dot)
            rhs = [r - d for r, d in zip(rhs, d_op_z)]
        return tuple(LinearSolve.apply(problem, transpose, nx, *x, *p, *rhs))

    @staticmethod
    def vmap(info, in_dims, problem, transpose, nx, *leaves):
        moved = _move_batch(leaves, in_dims[3:], info.batch_size)
        batched = problem.batched(moved[:nx])
        out = LinearSolve.apply(batched, transpose, nx, *moved)
        return out, (0,) * len(out)


def _split(leaves, nx):
    leaves = list(leaves)
    return leaves[:nx], leaves[nx : len(leaves) - nx], leaves[len(leaves) - nx :]

