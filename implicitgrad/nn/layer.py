"""``ImplicitLayer``: an ``nn.Module`` whose output is the solution of an inner problem."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .._api import implicit_solve, root_solve
from .._diagnostics import SolveInfo
from .._tree import tree_flatten, tree_unflatten
from .._validation import check_forward_tol, check_linear_solver, check_on_failure
from .._warm import WarmStart, warm_template
from ..linalg._base import LinearSolverLike

# The override points a subclass may implement, each with the core entry point that solves it.
_FORMS: Tuple[Tuple[str, Callable[..., Any]], ...] = (("objective", implicit_solve), ("residual", root_solve))


class ImplicitLayer(nn.Module):
    r"""Base class of layers defined by an optimality condition.

    The layer's inputs :math:`u` and its own parameters :math:`\theta` (every
    ``nn.Parameter`` of the module and its sub-modules) define an inner problem whose
    solution :math:`x^\star(u, \theta)` satisfies either

    * :math:`\nabla_x f(x^\star, u, \theta) = 0` (implement :meth:`objective`; solved with
      :func:`~implicitgrad.implicit_solve`), or
    * :math:`F(x^\star, u, \theta) = 0` (implement :meth:`residual`; solved with
      :func:`~implicitgrad.root_solve`).

    The layer returns ``output(x*, u, θ)`` (by default ``x*``). Gradients with respect to
    :math:`\theta` and to the inputs come from the implicit function theorem, so they do
    not depend on how ``x*`` was found nor on how many iterations that took, and the layer
    trains inside any model, e.g. after a feature extractor in ``nn.Sequential``.

    Subclasses implement

    * :meth:`init` — the starting point ``x0`` (a Tensor or a pytree of Tensors);
    * exactly one of :meth:`objective` / :meth:`residual`;
    * optionally :meth:`prepare` (validate and convert the inputs once per call),
      :meth:`output`, and :meth:`closed_form` (used when ``solver`` is ``None``).

    In :meth:`objective`, :meth:`residual` and :meth:`output`, read parameters from the
    ``params`` dict (name → tensor, as :meth:`torch.nn.Module.named_parameters`), not from
    ``self``: only tensors reached through the arguments receive implicit gradients (the
    core warns about captured tensors). For a sub-module use :meth:`call_submodule`, which
    runs it through :func:`torch.func.functional_call` with its entries of ``params``.

    A single tuple argument is unpacked, so ``layer((a, b))`` equals ``layer(a, b)``: a
    layer with several inputs can follow a module that returns a tuple in
    ``nn.Sequential``.

    Args:
        solver: inner solver ``solver(fn, x0, inputs, params) -> x`` (e.g. an
            ``ig.solvers`` solver); ``None``: the subclass's :meth:`closed_form`.
        linear_solver: linear solver of the backward pass: an instance such as
            ``ig.Exact()``, or a plain callable ``linear_solver(matvec, b)`` returning ``x``
            or ``(x, info)`` (as :func:`~implicitgrad.implicit_solve` accepts); ``None``:
            ``ig.CG()`` for an objective, ``ig.GMRES()`` for a residual.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` (see
            :func:`~implicitgrad.implicit_solve`).
        forward_tol: accepted relative forward residual (``None``: dtype default).
        warm_start: reuse the previous call's solutions (opt in): the inner solver starts
            from the previous ``x*`` when it has the shapes of :meth:`init`'s ``x0``, and
            the backward linear solve from the previous backward solution (one
            :class:`~implicitgrad.WarmStart` per layer). Useful when consecutive calls solve
            nearby problems (the same inputs while the parameters train); the gradients
            are the same, the iterations fewer. Reset with :meth:`reset_warm_start`.
            ``True`` keeps the previous backward solution only; an
            :class:`~implicitgrad.WarmStart` is the layer's own (e.g.
            ``ig.WarmStart(recycle=k, extrapolate=True)`` also preconditions CG with the
            last ``k`` directions).

    Attributes:
        solver, linear_solver, on_failure, forward_tol: as given; may be reassigned.
        warm: the layer's :class:`~implicitgrad.WarmStart` (``None`` without ``warm_start``).
        last_info: the :class:`~implicitgrad.SolveInfo` of the most recent forward call
            (its ``backward`` field is filled in by the backward pass), ``None`` before.

    Raises:
        TypeError: neither or both of ``objective`` / ``residual`` implemented, no solver
            and no closed form, a solver that is not callable, or a linear solver that is
            neither an instance nor a callable.
        ValueError: unknown ``on_failure`` or non-positive ``forward_tol``.

    Example:
        >>> import torch, implicitgrad as ig
        >>> class Shrink(ig.nn.ImplicitLayer):
        ...     '''x* = argmin ½‖x − u‖² + exp(a) Σ cosh(x): a smooth shrinkage of u.'''
        ...     def __init__(self):
        ...         super().__init__(solver=ig.solvers.TorchOptimizer(torch.optim.LBFGS))
        ...         self.a = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
        ...     def init(self, inputs):
        ...         return torch.zeros_like(inputs[0])
        ...     def objective(self, x, inputs, params):
        ...         return 0.5 * ((x - inputs[0]) ** 2).sum() + params["a"].exp() * torch.cosh(x).sum()
        >>> layer = Shrink()
        >>> x = layer(torch.tensor([2.0, -1.0], dtype=torch.float64))
        >>> x.sum().backward()
        >>> layer.last_info.forward_status, layer.a.grad is not None
        ('converged', True)
    """

    def __init__(
        self,
        solver: Optional[Callable] = None,
        linear_solver: Optional[LinearSolverLike] = None,
        on_failure: str = "warn",
        forward_tol: Optional[float] = None,
        warm_start: Union[bool, WarmStart] = False,
    ) -> None:
        super().__init__()
        cls = type(self)
        implemented = [form for form in _FORMS if getattr(cls, form[0]) is not getattr(ImplicitLayer, form[0])]
        if len(implemented) != 1:
            raise TypeError(
                f"{cls.__name__}: implement exactly one of objective(x, inputs, params) (a "
                "minimisation) or residual(x, inputs, params) (a root), "
                f"got {'both' if implemented else 'neither'}."
            )
        if solver is None and cls.closed_form is ImplicitLayer.closed_form:
            raise TypeError(
                f"{cls.__name__}: give a solver (e.g. ig.solvers.TorchOptimizer(torch.optim.LBFGS)) "
                "or implement closed_form(x0, inputs, params)."
            )
        if solver is not None and not callable(solver):
            raise TypeError(f"{cls.__name__}: solver must be callable as solver(fn, x0, *params), got {solver!r}.")
        check_linear_solver(linear_solver, cls.__name__)
        check_on_failure(on_failure, cls.__name__)
        check_forward_tol(forward_tol, cls.__name__)
        # The method that states the condition, and the core function that solves it.
        self._condition_method, self._core_solve = implemented[0]
        self.solver = solver
        self.linear_solver = linear_solver
        self.on_failure = on_failure
        self.forward_tol = forward_tol
        self.warm: Optional[WarmStart] = warm_template(warm_start, cls.__name__)
        self._last_x: Any = None
        self.last_info: Optional[SolveInfo] = None

    def reset_warm_start(self) -> None:
        """Forget the solutions a ``warm_start`` layer reuses (e.g. when the data change)."""
        self._last_x = None
        if self.warm is not None:
            self.warm.reset()

    # ------------------------------------------------------------------ override points
    def prepare(self, *inputs: Any) -> Tuple[Any, ...]:
        """Validate and convert the forward arguments; returns the ``inputs`` tuple."""
        return inputs

    def init(self, inputs: Tuple[Any, ...]) -> Any:
        """The inner solver's starting point ``x0`` for these inputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement init(inputs).")

    def objective(self, x: Any, inputs: Tuple[Any, ...], params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar inner objective ``f(x, inputs, θ)`` minimised over ``x``."""
        raise NotImplementedError

    def residual(self, x: Any, inputs: Tuple[Any, ...], params: Dict[str, torch.Tensor]) -> Any:
        """The inner residual ``F(x, inputs, θ)`` (structure of ``x``) whose root is ``x*``."""
        raise NotImplementedError

    def output(self, x: Any, inputs: Tuple[Any, ...], params: Dict[str, torch.Tensor]) -> Any:
        """The layer's output from the solution (default: ``x`` itself)."""
        return x

    def closed_form(self, x0: Any, inputs: Tuple[Any, ...], params: Dict[str, torch.Tensor]) -> Any:
        """The exact solution, for layers that have one (used when ``solver`` is ``None``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ machinery
    def call_submodule(self, name: str, params: Dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """Run sub-module ``name`` with its parameters taken from ``params``.

        Uses :func:`torch.func.functional_call`, so the implicit gradient reaches the
        sub-module's parameters through ``params``; buffers stay the module's own.
        """
        module = self.get_submodule(name)
        prefix = name + "."
        own = {key[len(prefix):]: value for key, value in params.items() if key.startswith(prefix)}
        return torch.func.functional_call(module, own, args, kwargs)

    def _closed_form_solver(self, fn: Callable, x0: Any, inputs: Tuple[Any, ...], params: Dict) -> Any:
        return self.closed_form(x0, inputs, params)

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) == 1 and isinstance(inputs[0], tuple):
            inputs = inputs[0]
        inputs = tuple(self.prepare(*inputs))
        params: Dict[str, torch.Tensor] = dict(self.named_parameters())
        x0 = self.init(inputs)
        if self.warm is not None and _same_layout(self._last_x, x0):
            x0 = self._last_x
        solver = self.solver if self.solver is not None else self._closed_form_solver
        x, info = self._core_solve(
            getattr(self, self._condition_method), x0, inputs, params, solver=solver, linear_solver=self.linear_solver,
            on_failure=self.on_failure, return_info=True, forward_tol=self.forward_tol, warm_start=self.warm,
        )
        if self.warm is not None:
            leaves, spec = tree_flatten(x)
            self._last_x = tree_unflatten([t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], spec)
        self.last_info = info
        return self.output(x, inputs, params)

    def extra_repr(self) -> str:
        solver = "closed_form" if self.solver is None else repr(self.solver)
        linear = "default" if self.linear_solver is None else repr(self.linear_solver)
        return f"solver={solver}, linear_solver={linear}, on_failure={self.on_failure!r}"


def _same_layout(a: Any, b: Any) -> bool:
    """Whether two pytrees have one structure and tensor leaves of one shape, dtype and device."""
    if a is None:
        return False
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        and (x.shape, x.dtype, x.device) == (y.shape, y.dtype, y.device)
        for x, y in zip(la, lb) if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor)
    )
