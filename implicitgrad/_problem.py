"""The optimality condition ``F(x, θ) = 0``, built once at the API boundary.

Three builders make a :class:`Condition` from what the user wrote; they are the only
place that knows which form it came from:

=========================  ======================  =======================  ===========
builder                    ``F(x, θ)``             ``A = ∂ₓF``              symmetric
=========================  ======================  =======================  ===========
:func:`objective`          ``∇ₓ f(x, θ)``          ``∇²ₓ f``                yes
:func:`residual`           ``F(x, θ)``             Jacobian of ``F``        no
:func:`mapping`            ``x − T(x, θ)``         ``I − ∂ₓT``              no
=========================  ======================  =======================  ===========

A condition acts on flat lists of tensor leaves; its :class:`Codec` turns them back into
the pytrees the user's function takes. Under ``torch.func.vmap`` a condition is
*batched* (:meth:`Condition.batched`): the user's function is vmapped over a leading
dimension of every leaf, ``A`` becomes block diagonal, and ``batch_ndim`` tells the
linear solvers how many leading dimensions index independent systems.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Callable, List, Optional, Set, Tuple

import torch

from ._diagnostics import report
from ._tree import TreeSpec, describe, tree_flatten, tree_unflatten, unflattener

Leaves = List[torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Codec:
    """Where the flat tensor leaves sit in the pytrees of ``x`` and of the params."""

    x_spec: TreeSpec
    x_template: Tuple[Any, ...]  # leaves of x0; tensor positions are filled from flat lists
    params_spec: TreeSpec
    params_template: Tuple[Any, ...]

    @staticmethod
    def _fill(template: Sequence[Any], tensors: Sequence[torch.Tensor]) -> List[Any]:
        leaves, it = list(template), iter(tensors)
        return [next(it) if isinstance(t, torch.Tensor) else t for t in leaves]

    @functools.cached_property
    def _x_direct(self) -> Optional[Callable[[Sequence[torch.Tensor]], Any]]:
        return _direct_unflatten(self.x_spec, self.x_template)

    @functools.cached_property
    def _params_direct(self) -> Optional[Callable[[Sequence[torch.Tensor]], Any]]:
        return _direct_unflatten(self.params_spec, self.params_template)

    def x_tree(self, x: Sequence[torch.Tensor]) -> Any:
        direct = self._x_direct
        return direct(x) if direct is not None else tree_unflatten(self._fill(self.x_template, x), self.x_spec)

    def params_tree(self, p: Sequence[torch.Tensor]) -> tuple:
        direct = self._params_direct
        if direct is not None:
            return direct(p)
        return tree_unflatten(self._fill(self.params_template, p), self.params_spec)

    def x_leaves(self, tree: Any, what: str) -> Leaves:
        """Tensor leaves of a pytree that must have the structure of ``x0``."""
        ref = self.x_template[0]
        if (self.x_spec.is_leaf() and isinstance(tree, torch.Tensor) and tree.shape == ref.shape
                and tree.dtype == ref.dtype):
            return [tree]  # x is one tensor, and so is the output, of x0's shape and dtype
        leaves, spec = tree_flatten(tree)
        if spec != self.x_spec:
            raise ValueError(
                f"{what} has structure {describe(spec, leaves)}, but x0 has "
                f"{describe(self.x_spec, list(self.x_template))}. Return x with the structure of x0."
            )
        out = []
        for i, ref in enumerate(self.x_template):
            if not isinstance(ref, torch.Tensor):
                continue
            t = leaves[i]
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{what}: leaf {i} has shape {got} but x0's has {tuple(ref.shape)}. "
                    "Return x with the shapes of x0."
                )
            out.append(t.to(ref.dtype) if t.dtype != ref.dtype else t)
        return out

    def with_x(self, x: Sequence[torch.Tensor]) -> Codec:
        """The same layout with new tensor leaves of ``x`` (shapes the solution is checked against)."""
        return dataclasses.replace(self, x_template=tuple(self._fill(self.x_template, x)))


@dataclasses.dataclass(frozen=True)
class Condition:
    """``F(x, θ)`` on flat tensor leaves, and what the rules need to know about it.

    Attributes:
        name: the form the user wrote (``"objective"``, ``"residual"``, ``"mapping"``),
            for messages.
        matrix: how ``A = ∂ₓF`` reads in messages.
        symmetric: whether ``A`` is symmetric by construction (a Hessian).
        fn: the user's function on pytrees.
        codec: the pytree layout of ``x`` and the params.
        builder: the builder that made this condition (to rebuild it batched).
        batch_ndim: leading dimensions of every leaf that index independent problems.
        parent: the unbatched condition this one vmaps, ``None`` if not batched.
        output: what messages call the user's result when the condition can fail to depend
            on ``x`` (``None`` for ``x − T(x, θ)``, which always does).
    """

    name: str
    matrix: str
    symmetric: bool
    fn: Callable[..., Any]
    codec: Codec
    builder: Callable[[Callable[..., Any], Codec], Condition]
    graph: Callable[[Leaves, Leaves, bool], Tuple[Leaves, Leaves]]
    func: Callable[[Leaves, Leaves], Leaves]
    combine: Callable[[Any], Any] = lambda out: out  # noqa: E731 - how vmapped outputs combine
    output: Optional[str] = None  # what messages call the function's result, if it may ignore x
    batch_ndim: int = 0
    parent: Optional[Condition] = None

    def call(self, x: Sequence[torch.Tensor], p: Sequence[torch.Tensor]) -> Any:
        """The user's function at flat ``(x, θ)``."""
        return self.fn(self.codec.x_tree(x), *self.codec.params_tree(p))

    def on_graph(self, x: Leaves, p: Leaves, create_graph: bool = True) -> Tuple[Leaves, Leaves]:
        """``F`` built on ``x`` (tensors that require grad), and the outputs of the user's
        function it came from; with ``create_graph`` the graph of ``F`` is kept, so that
        products with its Jacobians can follow."""
        return self.graph(x, p, create_graph)

    def __call__(self, x: Leaves, p: Leaves) -> Leaves:
        """``F`` as a function ``torch.func`` transforms compose with."""
        return self.func(x, p)

    def batched(self, x: Sequence[torch.Tensor]) -> Condition:
        """This condition vmapped over a new leading dimension of every tensor leaf; ``x``
        are the batched leaves of the variable."""
        flat_call, combine = self.call, self.combine

        def fn_batched(x_tree: Any, *params: Any) -> Any:
            return combine(torch.func.vmap(flat_call)(_tensor_leaves(x_tree), _tensor_leaves(params)))

        out = self.builder(fn_batched, self.codec.with_x(x))
        return dataclasses.replace(out, batch_ndim=self.batch_ndim + 1, parent=self)

    # ------------------------------------------------------------------ measurement
    def norms(self, F: Sequence[torch.Tensor]) -> torch.Tensor:
        """``‖F‖`` per problem of the batch (shape: the batch dims; 0-d unbatched).

        Taken in ``F``'s dtype when that is float32 or float64 (the reduction accumulates in
        double on the CPU; a norm with ``dtype=float64`` costs a converted copy, 3× the
        time), in float32 for half precisions, whose largest value (65504) a norm can exceed.
        """
        n = self.batch_ndim
        norms = [torch.linalg.vector_norm(c.detach().reshape(*c.shape[:n], -1), dim=-1,
                                          dtype=None if c.dtype in _NORM_DTYPES else torch.float32) for c in F]
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)

    def evaluate(self, x: Sequence[torch.Tensor], p: Sequence[torch.Tensor]) -> Tuple[Leaves, Leaves, Leaves, Leaves]:
        """``F`` at ``(x, θ)`` without its graph kept: ``(F, the user's outputs, the detached
        x leaves it was built on, the detached θ leaves)``."""
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(t.is_floating_point()) for t in x]
            ps = [t.detach() for t in p]
            F, outputs = self.on_graph(xs, ps, create_graph=False)
        return F, outputs, xs, ps

    def value_norms(self, x: Sequence[torch.Tensor], p: Sequence[torch.Tensor]) -> torch.Tensor:
        """``‖F(x, θ)‖`` per problem, evaluated without a graph kept."""
        return self.norms(self.evaluate(x, p)[0])

    def check_graph(self, roots: Sequence[torch.Tensor], x: Sequence[torch.Tensor],
                    p: Sequence[torch.Tensor], on_failure: str) -> None:
        """One walk of the graph of the user's outputs ``roots`` built on the leaves ``x``
        and ``p``: an error when it never reaches ``x`` (the condition does not depend on
        ``x``), a warning when it reaches tensors that require grad but are not params.

        It runs at every call: a function clean once can capture later (a module unfrozen
        after a warm-up, a global rebound). It reads variables only at the graph's leaves;
        on the whole-call benchmark it costs about 40 µs for logistic regression and 80 µs
        for the iMAML MLP, about 1 % of the call.
        """
        x_ids = {id(t) for t in x}
        own_ids = x_ids.union(id(t) for t in p)
        leaves, complete = graph_leaves(roots)
        reached = any(id(v) in x_ids for v in leaves)
        foreign = [v for v in leaves if id(v) not in own_ids]
        if not reached and complete and self.output is not None:
            _require_dependence(self.name, self.output, [])
        if foreign:
            shapes = ", ".join(str(tuple(v.shape)) for v in foreign[:5])
            report(
                f"The {self.name} function uses {len(foreign)} tensor(s) that require grad "
                f"but are not among params (shapes {shapes}): they are captured from the "
                "enclosing scope and would receive no gradient through the implicit solve. "
                "Pass them as params (for nn.Module parameters use "
                "torch.func.functional_call), or .detach() them if no gradient is wanted.",
                "warn" if on_failure != "ignore" else "ignore",
            )


def graph_leaves(roots: Sequence[torch.Tensor], limit: int = 100_000) -> Tuple[List[torch.Tensor], bool]:
    """The leaf tensors that the autograd graph of ``roots`` reaches, in one walk of at most
    ``limit`` nodes, and whether the walk saw the whole graph."""
    seen: Set[Any] = set()
    stack, leaves = [r.grad_fn for r in roots if r.grad_fn is not None], []
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        nexts = node.next_functions
        if nexts:
            stack += [n for n, _ in nexts if n is not None and n not in seen]
            continue
        # Only the nodes of leaves (AccumulateGrad) have no inputs, and a variable.
        var = getattr(node, "variable", None)
        if var is not None:
            leaves.append(var)
    return leaves, len(seen) < limit


# ---------------------------------------------------------------------- the three builders
def objective(fn: Callable[..., Any], codec: Codec) -> Condition:
    """``F = ∇ₓ f``: the condition of a minimiser of ``f(x, *params)`` (scalar)."""

    def value(x: Leaves, p: Leaves) -> torch.Tensor:
        out = fn(codec.x_tree(x), *codec.params_tree(p))
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"objective must return a scalar Tensor, got {shape}. Reduce it (e.g. .sum() "
                "or .mean()); for a system of equations use ig.root_solve(residual, ...)."
            )
        if not out.is_floating_point():
            raise ValueError(
                f"The objective does not depend on x: it returned a tensor of dtype {out.dtype}, "
                "which has no gradient in x. Return a floating-point scalar computed "
                "differentiably from the x it receives (no .item(), .detach() or integer casts)."
            )
        return out.reshape(())

    def graph(x: Leaves, p: Leaves, create_graph: bool) -> Tuple[Leaves, Leaves]:
        v = value(x, p)
        _require_dependence("objective", "value", [v])
        grads = torch.autograd.grad(v, x, create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True)
        return list(grads), [v]

    def func(x: Leaves, p: Leaves) -> Leaves:
        return list(torch.func.grad(lambda xx: value(xx, p))(x))

    return Condition("objective", "∇²ₓf", True, fn, codec, objective, graph, func, combine=_sum,
                     output="value")


def residual(fn: Callable[..., Any], codec: Codec) -> Condition:
    """``F`` as the user wrote it: the condition of a root of ``residual(x, *params)``."""

    def func(x: Leaves, p: Leaves) -> Leaves:
        return codec.x_leaves(fn(codec.x_tree(x), *codec.params_tree(p)), "the residual output")

    def graph(x: Leaves, p: Leaves, create_graph: bool) -> Tuple[Leaves, Leaves]:
        out = func(x, p)
        _require_dependence("residual", "output", out)
        return out, out

    return Condition("residual", "∂ₓF", False, fn, codec, residual, graph, func, output="output")


def mapping(fn: Callable[..., Any], codec: Codec) -> Condition:
    """``F = x − T(x, θ)``: the condition of a fixed point of ``mapping(x, *params)``."""

    def func(x: Leaves, p: Leaves) -> Leaves:
        t = codec.x_leaves(fn(codec.x_tree(x), *codec.params_tree(p)), "the mapping output")
        return [xi - ti for xi, ti in zip(x, t)]

    def graph(x: Leaves, p: Leaves, create_graph: bool) -> Tuple[Leaves, Leaves]:
        out = func(x, p)
        return out, out

    return Condition("mapping", "I − ∂ₓT", False, fn, codec, mapping, graph, func)


#: The builders by the keyword that names them in ``@ig.implicit(objective=...)``.
BUILDERS = {"objective": objective, "residual": residual, "mapping": mapping}


def _direct_unflatten(spec: TreeSpec, template: Sequence[Any]) -> Optional[Callable[[Sequence[torch.Tensor]], Any]]:
    """The pytree of a layout whose leaves are all tensors, rebuilt by :func:`unflattener`
    (the spec walked once per call, not once per rebuild); ``None`` for a layout with other
    leaves (ints, strings, None), filled in by :meth:`Codec._fill`."""
    if not all(isinstance(t, torch.Tensor) for t in template):
        return None
    return unflattener(spec)


#: Dtypes whose norms are taken in the dtype itself (see :meth:`Condition.norms`).
_NORM_DTYPES = (torch.float32, torch.float64)


def _sum(out: torch.Tensor) -> torch.Tensor:
    return out.sum()


def _require_dependence(name: str, what: str, outputs: Sequence[torch.Tensor]) -> None:
    """The condition must be a differentiable function of x, or ``A`` is zero."""
    if any(o.requires_grad for o in outputs):
        return
    raise ValueError(
        f"The {name} does not depend on x: its {what} has no gradient path to x, so "
        "the optimality condition cannot determine x* and there is nothing to "
        "differentiate (a constant, or x used only through .detach(), .item(), .numpy() "
        "or integer / boolean operations). Write the "
        f"{name} as a differentiable floating-point function of x, computed from the "
        "x it receives."
    )


def _tensor_leaves(tree: Any) -> List[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
