"""The two autograd Functions behind every implicit solve: wiring around :mod:`._rules`.

``ImplicitSolve`` returns ``x*(θ)``; ``LinearSolve`` returns ``z = Op(x, θ)⁻¹ b`` with
``Op = ∂ₓF`` or its transpose. Their backward and forward-mode rules are the pure
functions of :mod:`._rules`, written with differentiable torch operations plus
``LinearSolve`` itself, so derivatives of any order, ``torch.func.grad``, ``jvp`` and
``vmap`` compose. Both Functions have a ctx-free ``forward`` and a separate
``setup_context`` as ``torch.func`` requires; their non-tensor inputs are the
:class:`~._problem.Condition`, the frozen :class:`~._forward.Options` and the
:class:`SolveInfo` the call reports into. ``vmap`` of either is one call on the batched
condition (block-diagonal systems).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Callable, List, Optional, Tuple

import torch

from ._compat import (
    add_legacy_batch_dim,
    apply_function,
    host_readable,
    is_legacy_batched,
    is_wrapped,
    legacy_vmap_level,
    remove_legacy_batch_dim,
)
from ._compiled import compiled_root_vjp, uses_compiled_backward
from ._diagnostics import SolveInfo, report
from ._forward import Options, run_forward
from ._linear import solve_linear
from ._linearize import AutogradLinearization, linearize
from ._problem import Condition
from ._rules import linear_solve_jvp, linear_solve_vjp, root_jvp, root_vjp
from .linalg._base import all_finite, nonfinite_flags, poison

__all__ = ["Carry", "ImplicitSolve", "LinearSolve"]


def _wrapped(tensors: Sequence) -> bool:
    return any(is_wrapped(t) for t in tensors)


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


def _solver(cond: Condition, options: Options, sink: SolveInfo, x, p, differentiable: bool):
    """The ``solve(lin, transpose, b)`` a rule receives: the linear solver run directly on
    ``lin``'s products (first order), or ``LinearSolve`` so that the solution is itself
    differentiable in ``x``, ``θ`` and ``b``."""
    if not differentiable:
        return functools.partial(solve_linear, cond, options, sink)
    nx = len(x)

    def solve(_lin, transpose: bool, b: List[torch.Tensor]) -> List[torch.Tensor]:
        return list(apply_function(LinearSolve, cond, options, sink, transpose, nx, *x, *p, *b))

    return solve


class Carry:
    """What the forward pass of one call hands to its backward pass: the linearisation its
    residual check built at ``x`` (``lin``, when a first-order backward can reuse it) and the
    per-problem flags of a non-finite ``x`` (``bad``, ``None`` when ``x`` is finite). The
    call gives it the parameters a backward pass will differentiate (``p_needs``) and those
    whose finiteness the forward check reads with its residual (``unread``)."""

    def __init__(self, p_needs: Optional[Sequence[bool]] = None, unread: Sequence[torch.Tensor] = ()) -> None:
        self.p_needs = p_needs
        self.unread = unread
        self.lin: Optional[AutogradLinearization] = None
        self.bad: Optional[torch.Tensor] = None


#: What a non-finite incoming gradient is reported with.
NONFINITE_COTANGENT = ("implicit differentiation: the incoming gradient with respect to x* contains "
                       "NaN/Inf; the hypergradient will be non-finite. Check the outer loss.")


def _guard_cotangent(cond: Condition, options: Options, sink: SolveInfo, bad: Optional[torch.Tensor],
                     v) -> List[torch.Tensor]:
    """At a non-finite solution (``bad``) the derivative is undefined: NaN, whatever the
    products give; a non-finite incoming gradient is reported (with ``on_failure="defer"``,
    when :meth:`SolveInfo.verify` reads it)."""
    v = list(v)
    if bad is not None:
        v = poison(v, bad, cond.batch_ndim)
    readable = [t for t in v if host_readable(t)]
    if options.on_failure == "defer" and readable:
        sink.defer(nonfinite_flags([readable], 0).reshape(1).double(),
                   lambda values: NONFINITE_COTANGENT if values[0] else None)
    elif not all_finite(readable):
        report(NONFINITE_COTANGENT, options.on_failure)
    return v


class ImplicitSolve(torch.autograd.Function):
    """``x* = solver(x0, θ)`` with the implicit-function-theorem derivative."""

    @staticmethod
    def forward(cond: Condition, options: Options, sink: SolveInfo, carry: Carry, nx: int, *leaves):
        x, carry.lin, carry.bad = run_forward(cond, options, sink, list(leaves[:nx]), list(leaves[nx:]),
                                              carry.p_needs, carry.unread)
        return _fresh(x, leaves)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.cond, ctx.options, ctx.sink, carry, ctx.nx = inputs[:5]
        # The graph of F at x* built by the forward check serves the first backward pass.
        ctx.lin, ctx.bad = carry.lin, carry.bad
        carry.lin = carry.bad = None
        p = inputs[5 + ctx.nx :]
        ctx.save_for_backward(*output, *p)
        ctx.save_for_forward(*output, *p)

    @staticmethod
    @_per_slice
    def backward(ctx, *v):
        nx, cond, options = ctx.nx, ctx.cond, ctx.options
        x, p = list(ctx.saved_tensors[:nx]), list(ctx.saved_tensors[nx:])
        p_needs = list(ctx.needs_input_grad[5 + nx :])
        grads = [None] * len(p)
        lin, ctx.lin = ctx.lin, None  # released after one use: it holds a graph of F
        if any(p_needs):
            v = _guard_cotangent(cond, options, ctx.sink, ctx.bad, v)
            # First order: one graph of F serves every product and the final VJP.
            differentiable = torch.is_grad_enabled() or _wrapped(x + p + v)
            if not differentiable and uses_compiled_backward(cond, options.linear_solver):
                grads = compiled_root_vjp(cond, options, ctx.sink, x, p, v, p_needs)
            else:
                solve = _solver(cond, options, ctx.sink, x, p, differentiable)
                reuse = lin if lin is not None and not differentiable and lin.serves(p_needs) else None
                grads = root_vjp(cond, x, p, v, p_needs, solve, differentiable, lin=reuse)
                grads = [g if need else None for g, need in zip(grads, p_needs)]
        return (None,) * (5 + nx) + tuple(grads)

    @staticmethod
    @_per_slice
    def jvp(ctx, _cond, _options, _sink, _carry, _nx, *tangents):
        nx, cond = ctx.nx, ctx.cond
        x, p = list(ctx.saved_tensors[:nx]), list(ctx.saved_tensors[nx:])
        p_dot = list(tangents[nx:])
        given = [t for t in p_dot if t is not None]
        if not given:
            return tuple(torch.zeros_like(t) for t in x)
        # Nested forward-mode AD is unsupported, so plain dual tensors take the autograd
        # path; a result that must be differentiable again takes the torch.func path.
        differentiable = _wrapped(x + p + given) or (
            torch.is_grad_enabled() and any(t.requires_grad for t in x + p + given)
        )
        solve = _solver(cond, ctx.options, ctx.sink, x, p, differentiable)
        return tuple(root_jvp(cond, x, p, p_dot, solve, differentiable))

    @staticmethod
    def vmap(info, in_dims, cond, options, sink, carry, nx, *leaves):
        moved = _move_batch(leaves, in_dims[5:], info.batch_size)
        out = apply_function(ImplicitSolve, cond.batched(moved[:nx]), options, sink, carry, nx, *moved)
        return out, (0,) * len(out)


class LinearSolve(torch.autograd.Function):
    """``z = Op(x, θ)⁻¹ b`` with ``Op = ∂ₓF`` or its transpose, differentiable in all."""

    @staticmethod
    def forward(cond: Condition, options: Options, sink: SolveInfo, transpose: bool, nx: int, *leaves):
        x, p, b = _split(leaves, nx)
        lin = linearize(cond, x, p, [False] * len(p), differentiable=False)
        return _fresh(solve_linear(cond, options, sink, lin, transpose, list(b)), leaves)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.cond, ctx.options, ctx.sink, ctx.transpose, ctx.nx = inputs[:5]
        x, p, _ = _split(inputs[5:], ctx.nx)
        ctx.save_for_backward(*x, *p, *output)
        ctx.save_for_forward(*x, *p, *output)

    @staticmethod
    @_per_slice
    def backward(ctx, *z_bar):
        cond, options, sink, transpose, nx = ctx.cond, ctx.options, ctx.sink, ctx.transpose, ctx.nx
        x, p, z = _split(ctx.saved_tensors, nx)
        needs = ctx.needs_input_grad[5:]
        w = list(apply_function(LinearSolve, cond, options, sink, not transpose, nx, *x, *p, *z_bar))
        gx, gp = linear_solve_vjp(cond, x, p, z, w, transpose, needs[:nx], needs[nx : len(needs) - nx])
        return (None,) * 5 + (*gx, *gp, *w)

    @staticmethod
    @_per_slice
    def jvp(ctx, _cond, _options, _sink, _transpose, _nx, *tangents):
        cond, transpose, nx = ctx.cond, ctx.transpose, ctx.nx
        x, p, z = _split(ctx.saved_tensors, nx)
        x_dot, p_dot, b_dot = _split(tangents, nx)
        rhs = linear_solve_jvp(cond, x, p, z, transpose, x_dot, p_dot, b_dot)
        return tuple(apply_function(LinearSolve, cond, ctx.options, ctx.sink, transpose, nx, *x, *p, *rhs))

    @staticmethod
    def vmap(info, in_dims, cond, options, sink, transpose, nx, *leaves):
        moved = _move_batch(leaves, in_dims[5:], info.batch_size)
        out = apply_function(LinearSolve, cond.batched(moved[:nx]), options, sink, transpose, nx, *moved)
        return out, (0,) * len(out)


def _split(leaves, nx):
    leaves = list(leaves)
    return leaves[:nx], leaves[nx : len(leaves) - nx], leaves[len(leaves) - nx :]
