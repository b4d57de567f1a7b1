"""The fixed-iteration backward that ``CG(compile=...)`` hands to :func:`torch.compile`.

For an objective condition (``A = ∇²ₓf``, symmetric) the hypergradient
``−(∂_θ∇ₓf)ᵀ u`` with ``(A + λI) u = v`` is one function of ``(x, θ, v)``: the products are
``torch.func.vjp`` of ``∇ₓf`` linearised once, then exactly ``maxiter`` conjugate-gradient
iterations without a host read (no early stop: a system that converged, or met a
direction of non-positive curvature, gets step size 0 from then on), then the parameter
VJP. ``torch.compile`` traces it as one graph and fuses the products with the CG updates;
on CUDA, ``mode="reduce-overhead"`` captures it as a CUDA graph. After the call one host
read gives the relative residual of the recursion and whether a non-positive curvature
was met; they become the :class:`~implicitgrad.LinearSolveInfo` and the usual report.

A compiled function is kept per user function and call layout (structure, non-tensor
leaves, batch dims, which parameters need gradients, the solver's settings);
``torch.compile`` itself recompiles for new shapes and dtypes.
"""

from __future__ import annotations

import types
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._diagnostics import LinearSolveInfo, SolveInfo
from ._forward import Options
from ._linear import record_outcome
from ._problem import Condition
from ._status import Status
from .linalg._base import packing

__all__ = ["compiled_root_vjp", "uses_compiled_backward"]

_CACHE: weakref.WeakKeyDictionary[Callable, Dict[Any, Callable]] = weakref.WeakKeyDictionary()


def uses_compiled_backward(cond: Condition, linear_solver: Any) -> bool:
    """Whether a first-order backward of ``cond`` runs the compiled fixed-iteration path."""
    return bool(getattr(linear_solver, "compile", False)) and cond.symmetric


def _root(cond: Condition) -> Condition:
    while cond.parent is not None:
        cond = cond.parent
    return cond


def _layout_key(cond: Condition, p_needs: Sequence[bool], solver: Any) -> Optional[Tuple]:
    """What the traced function depends on besides tensor values; ``None`` if unhashable."""
    codec = cond.codec
    leaves = [None if isinstance(t, torch.Tensor) else t for t in (*codec.x_template, *codec.params_template)]
    key = (codec.x_spec, codec.params_spec, tuple(leaves), cond.batch_ndim, tuple(p_needs),
           solver.maxiter, solver.damping, repr(sorted(solver.compile_options.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _fixed_hypergradient(cond: Condition, maxiter: int, damping: float, p_needs: Sequence[bool]) -> Callable:
    """``(x, θ_needed, θ_rest, v) ↦ ((∂_θF)ᵀu for θ_needed, ‖r‖/‖b‖ per system, curvature met ≤ 0 per system)``."""
    needed = [i for i, need in enumerate(p_needs) if need]
    rest = [i for i, need in enumerate(p_needs) if not need]
    n = cond.batch_ndim

    def run(x: List[torch.Tensor], pn: List[torch.Tensor], pr: List[torch.Tensor], v: List[torch.Tensor]):
        def merge(values: Sequence[torch.Tensor]) -> List[torch.Tensor]:
            p: List[Any] = [None] * (len(needed) + len(rest))
            for i, t in zip(needed, values):
                p[i] = t
            for i, t in zip(rest, pr):
                p[i] = t
            return p

        vjp_fn = torch.func.vjp(lambda xs, ps: cond(list(xs), merge(ps)), list(x), list(pn))[1]
        pack, unpack = packing(v, n)
        b = pack(v)

        def product(q: torch.Tensor) -> torch.Tensor:
            out = pack(list(vjp_fn(unpack(q))[0]))
            return out + damping * q if damping else out

        u = torch.zeros_like(b)
        r, q = b, b
        rr = torch.linalg.vecdot(r, r)
        bb = rr
        stopped = torch.zeros_like(rr, dtype=torch.bool)
        for _ in range(maxiter):
            aq = product(q)
            qaq = torch.linalg.vecdot(q, aq)
            stopped = stopped | ((qaq <= 0) & (rr > 0))
            alpha = torch.where(~stopped & (rr > 0), rr / qaq, 0.0).unsqueeze(-1)
            u = u + alpha * q
            r = r - alpha * aq
            rr_new = torch.linalg.vecdot(r, r)
            q = r + torch.where(rr > 0, rr_new / rr, 0.0).unsqueeze(-1) * q
            rr = rr_new
        grads = vjp_fn(unpack(u))[1]
        relative = torch.where(bb > 0, rr.clamp_min(0).sqrt() / bb.sqrt(), 0.0)
        return list(grads), relative, stopped

    return run


def _function(cond: Condition, p_needs: Sequence[bool], solver: Any) -> Callable:
    """The compiled function for this layout, built on first use."""
    fixed = _fixed_hypergradient(cond, solver.maxiter, solver.damping, p_needs)
    key = _layout_key(cond, p_needs, solver)
    if key is None:  # a layout that cannot be told apart from another: run eagerly
        return fixed
    store = _CACHE.setdefault(_root(cond).fn, {})
    if key not in store:
        store[key] = torch.compile(_own_code(fixed), fullgraph=True, **solver.compile_options)
    return store[key]


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. torch.compile keeps its compiled variants, and
    its limit on their number (``recompile_limit``, 8), per code object; every layout here is
    a closure over the same code, so without a copy the ninth layout of a process would
    fail to compile under ``fullgraph``."""
    assert isinstance(fn, types.FunctionType)
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled_root_vjp(cond: Condition, options: Options, sink: SolveInfo, x: Sequence[torch.Tensor],
                      p: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                      p_needs: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    """``−(∂_θF)ᵀ u`` with ``(A + λI) u = v`` by the compiled fixed-iteration CG; the
    parameters outside ``p_needs`` get ``None``."""
    solver = options.linear_solver
    needs = [need and p[i].is_floating_point() for i, need in enumerate(p_needs)]
    fn = _function(cond, needs, solver)
    pn = [t.detach() for t, need in zip(p, needs) if need]
    pr = [t.detach() for t, need in zip(p, needs) if not need]
    with torch.no_grad():
        grads, relative, stopped = fn([t.detach() for t in x], pn, pr, [t.detach() for t in v])
    nonfinite = ~torch.isfinite(relative)
    info = LinearSolveInfo.deferred(relative, solver._tolerances(list(v))[0], iterations=solver.maxiter,
                                    solver="CG(compile)",
                                    flags=[(Status.NONFINITE, nonfinite), (Status.NEGATIVE_CURVATURE, stopped)])
    if options.on_failure == "defer":
        # Nothing read: a non-finite solve poisons the gradients on the device.
        grads = [torch.where(nonfinite.any(), torch.full_like(g, float("nan")), g) for g in grads]
    else:
        info.settle(info.deferred_values().tolist())  # one read
        if info.status is Status.NONFINITE:
            grads = [torch.full_like(g, float("nan")) for g in grads]
    record_outcome(cond, options, sink, info, transpose=True)
    it = iter(grads)
    return [-next(it) if need else None for need in needs]
