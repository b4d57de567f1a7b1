"""The inner problem as the autograd Functions see it: flat tensors in, flat tensors out.

A :class:`Problem` holds the user's function, its kind (objective, residual or
mapping), the pytree structure of ``x`` and of the parameters, the inner and linear
solvers, and the :class:`SolveInfo` to report into. It exposes the optimality condition
``F(x, θ) = 0`` and its linearisation at a point:

=============  ======================  ==========================
kind           ``F(x, θ)``             ``A = ∂ₓF``
=============  ======================  ==========================
objective      ``∇ₓ f(x, θ)``          ``∇²ₓ f`` (symmetric)
residual       ``F(x, θ)``             Jacobian of ``F``
mapping        ``x − T(x, θ)``         ``I − ∂ₓT``
=============  ======================  ==========================

Under ``torch.func.vmap`` a problem is *batched*: its function is vmapped over a
leading dimension of every leaf, the condition becomes block diagonal and the linear
solvers treat that dimension as independent systems (``batch_ndim``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable, List, Optional, Set, cast

import torch

from ._diagnostics import SolveInfo, report
from ._tree import TreeSpec, describe, tree_flatten, tree_unflatten

KINDS = ("objective", "residual", "mapping")


@dataclasses.dataclass
class Problem:
    kind: str
    fn: Callable  # fn(x_pytree, *params) as the user wrote it
    x_spec: TreeSpec
    x_template: List[Any]  # leaves of x0; tensor positions are filled from flat lists
    params_spec: TreeSpec
    params_template: List[Any]
    solver: Any
    linear_solver: Any
    on_failure: str
    info: SolveInfo
    forward_tol: Optional[float]
    batch_ndim: int = 0
    parent: Optional[Problem] = None

    # ------------------------------------------------------------------ structure
    @property
    def x_index(self) -> List[int]:
        return [i for i, t in enumerate(self.x_template) if isinstance(t, torch.Tensor)]

    @property
    def params_index(self) -> List[int]:
        return [i for i, t in enumerate(self.params_template) if isinstance(t, torch.Tensor)]

    def x_tree(self, x: Sequence[torch.Tensor]) -> Any:
        leaves = list(self.x_template)
        for i, t in zip(self.x_index, x):
            leaves[i] = t
        return tree_unflatten(leaves, self.x_spec)

    def params_tree(self, p: Sequence[torch.Tensor]) -> tuple:
        leaves = list(self.params_template)
        for i, t in zip(self.params_index, p):
            leaves[i] = t
        return tree_unflatten(leaves, self.params_spec)

    def x_leaves(self, tree: Any, what: str) -> List[torch.Tensor]:
        """Tensor leaves of a pytree that must have the structure of ``x0``."""
        leaves, spec = tree_flatten(tree)
        if spec != self.x_spec:
            raise ValueError(
                f"{what} has structure {describe(spec, leaves)}, but x0 has "
                f"{describe(self.x_spec, self.x_template)}. Return x with the structure of x0."
            )
        out = []
        for i in self.x_index:
            t, ref = leaves[i], self.x_template[i]
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{what}: leaf {i} has shape {got} but x0's has {tuple(ref.shape)}. "
                    "Return x with the shapes of x0."
                )
            out.append(t.to(ref.dtype) if t.dtype != ref.dtype else t)
        return out

    # ------------------------------------------------------------------ evaluation
    def call(self, x: Sequence[torch.Tensor], p: Sequence[torch.Tensor]) -> Any:
        return self.fn(self.x_tree(x), *self.params_tree(p))

    def condition_from_output(self, out: Any, x: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``F`` for residual and mapping kinds, from the user's output."""
        leaves = self.x_leaves(out, f"the {self.kind} output")
        if self.kind == "mapping":
            return [xi - ti for xi, ti in zip(x, leaves)]
        return leaves

    def objective_value(self, x, p) -> torch.Tensor:
        value = self.call(x, p)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"objective must return a scalar Tensor, got {shape}. Reduce it (e.g. .sum() "
                "or .mean()); for a system of equations use ig.root_solve(residual, ...)."
            )
        if not value.is_floating_point():
            raise ValueError(
                f"The objective does not depend on x: it returned a tensor of dtype {value.dtype}, "
                "which has no gradient in x. Return a floating-point scalar computed "
                "differentiably from the x it receives (no .item(), .detach() or integer casts)."
            )
        return value.reshape(())

    def residual_norm(
        self, x: Sequence[torch.Tensor], p: Sequence[torch.Tensor], check_captured: bool = True
    ) -> float:
        """``‖F(x, θ)‖`` (over the whole batch); optionally warns about captured tensors."""
        return float(self.residual_norms(x, p, check_captured).square().sum().sqrt())

    def residual_norms(
        self, x: Sequence[torch.Tensor], p: Sequence[torch.Tensor], check_captured: bool = True
    ) -> torch.Tensor:
        """``‖F(x, θ)‖`` per problem of the batch (shape: the batch dims; 0-d unbatched), in float64."""
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(t.is_floating_point()) for t in x]
            ps = [t.detach() for t in p]
            if self.kind == "objective":
                value = self.objective_value(xs, ps)
                self._check_depends_on_x([value])
                roots = [value]
                cond = list(torch.autograd.grad(value, xs, allow_unused=True, materialize_grads=True))
            else:
                cond = self.condition_from_output(self.call(xs, ps), xs)
                if self.kind == "residual":
                    self._check_depends_on_x(cond)
                roots = cond
            if check_captured:
                self._check_captured(roots, xs)
        with torch.no_grad():
            n = self.batch_ndim
            squares = sum((c.double() ** 2).reshape(*c.shape[:n], -1).sum(-1) for c in cond)
            return torch.sqrt(cast(torch.Tensor, squares))

    def _check_depends_on_x(self, outputs: Sequence[torch.Tensor]) -> None:
        """The condition must be a differentiable function of x, or ``A`` is zero."""
        if any(o.requires_grad for o in outputs):
            return
        what = "value" if self.kind == "objective" else "output"
        raise ValueError(
            f"The {self.kind} does not depend on x: its {what} has no gradient path to x, so "
            "the optimality condition cannot determine x* and there is nothing to "
            "differentiate (a constant, or x used only through .detach(), .item(), .numpy() "
            "or integer / boolean operations). Write the "
            f"{self.kind} as a differentiable floating-point function of x, computed from the "
            "x it receives."
        )

    def _check_captured(self, roots: Sequence[torch.Tensor], own: Sequence[torch.Tensor]) -> None:
        """Warn when the function reaches tensors that require grad but are not params."""
        own_ids = {id(t) for t in own}
        seen: Set[Any] = set()
        stack, foreign = [r.grad_fn for r in roots if r.grad_fn is not None], []
        while stack and len(seen) < 100_000:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            var = getattr(node, "variable", None)
            if var is not None and id(var) not in own_ids:
                foreign.append(var)
            stack.extend(n for n, _ in node.next_functions if n is not None)
        if foreign:
            shapes = ", ".join(str(tuple(v.shape)) for v in foreign[:5])
            report(
                f"The {self.kind} function uses {len(foreign)} tensor(s) that require grad "
                f"but are not among params (shapes {shapes}): they are captured from the "
                "enclosing scope and would receive no gradient through the implicit solve. "
                "Pass them as params (for nn.Module parameters use "
                "torch.func.functional_call), or .detach() them if no gradient is wanted.",
                "warn" if self.on_failure != "ignore" else "ignore",
            )

    # ------------------------------------------------------------------ linearisation
    def linearize(
        self,
        x: Sequence[torch.Tensor],
        p: Sequence[torch.Tensor],
        p_needs: Sequence[bool],
        differentiable: bool,
    ):
        """The condition's Jacobian products at ``(x, θ)``.

        ``differentiable=False``: plain autograd on detached copies, the graph of ``F``
        built once (first-order backward, the fast path). ``True``: built with
        ``torch.func`` so the products are themselves differentiable in ``x``, ``θ`` and
        every tensor the caller closes over (higher order, ``torch.func`` transforms).
        """
        from ._linearize import AutogradLinearization, FuncLinearization

        cls = FuncLinearization if differentiable else AutogradLinearization
        return cls(self, list(x), list(p), list(p_needs))

    # ------------------------------------------------------------------ batching
    def batched(self, x: Sequence[torch.Tensor]) -> Problem:
        """This problem vmapped over a new leading dimension of every tensor leaf.

        ``x`` are the batched tensor leaves of the variable (they set the shapes the
        batched problem checks solutions against).
        """
        kind, flat_call = self.kind, self.call

        def fn_batched(x_tree, *params):
            out = torch.func.vmap(flat_call)(_tensor_leaves(x_tree), _tensor_leaves(params))
            return out.sum() if kind == "objective" else out

        template = list(self.x_template)
        for i, t in zip(self.x_index, x):
            template[i] = t

        batched = Problem(
            kind=self.kind,
            fn=fn_batched,
            x_spec=self.x_spec,
            x_template=template,
            params_spec=self.params_spec,
            params_template=self.params_template,
            solver=self.solver,
            linear_solver=self.linear_solver,
            on_failure=self.on_failure,
            info=self.info,
            forward_tol=self.forward_tol,
            batch_ndim=self.batch_ndim + 1,
            parent=self,
        )
        return batched

    def record(self, info) -> None:
        self.info.record(info)


def _tensor_leaves(tree: Any) -> List[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
