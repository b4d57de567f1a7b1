r"""Check an implicit hypergradient against independent references.

For an inner problem :math:`x^\star(\theta)` (a minimiser, a root or a fixed point) and
an outer loss :math:`L(x^\star(\theta)[, \theta])`, :func:`check_hypergradient`
computes :math:`\mathrm{d}L/\mathrm{d}\theta` the way a user's code does — through
:func:`~implicitgrad.implicit_solve` with the given solver and linear solver — and
compares it with

* ``"exact"``: the same implicit formula with the dense direct solve
  :class:`~implicitgrad.Exact` (isolates the linear solve);
* ``"finite_differences"``: five-point central differences of
  :math:`\theta \mapsto L(\mathrm{solver}(\theta))`, re-solving the inner problem at
  every perturbed parameter (independent of the implicit function theorem: catches a
  solver that does not solve the stated problem, or ignores a parameter);
* ``"unrolled"``: autograd through the solver's iterations (``mode="unrolled"``), when
  the solver declares ``unrollable = True``.

Errors are relative, per parameter leaf ``p`` and for the whole gradient:

.. math::

    e_p = \frac{\|g_p - r_p\|_2}{\max(\|r_p\|_2,\ \text{atol})} ,

with ``g`` the implicit hypergradient and ``r`` the reference. ``atol`` is the
gradient norm below which an error is judged absolutely (``‖g_p − r_p‖ ≤ rtol·atol``),
so a parameter whose true gradient is zero does not demand infinite relative accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .._api import fixed_point_solve, implicit_solve, root_solve
from .._defaults import check_settings, default_linear_solver
from .._problem import BUILDERS, Codec
from .._tree import tree_flatten, tree_leaf_names, tree_unflatten
from ..linalg import Exact
from ..solvers import FixedPointIteration
from ._report import (
    REFERENCES,
    HypergradientCheckError,
    HypergradientReport,
    diagnose,
    passes,
    relative_error,
)

__all__ = [
    "HypergradientCheckError",
    "HypergradientReport",
    "assert_hypergradient",
    "check_hypergradient",
    "outer_takes_params",
]

# Five-point central stencil: f'(θ) ≈ Σ w_k f(θ + o_k h) / h, truncation error O(h⁴).
_STENCIL_OFFSETS = (2.0, 1.0, -1.0, -2.0)
_STENCIL_WEIGHTS = (-1.0 / 12, 8.0 / 12, -8.0 / 12, 1.0 / 12)


@dataclasses.dataclass(frozen=True)
class _Form:
    """How the check solves one form of condition: the core entry point, and the inner
    solver built when ``solver=None`` (``None``: a solver is required)."""

    solve: Callable[..., Any]
    default_solver: Optional[Callable[[], Callable[..., Any]]] = None


_FORMS: Dict[str, _Form] = {
    "objective": _Form(implicit_solve),
    "residual": _Form(root_solve),
    "mapping": _Form(fixed_point_solve, FixedPointIteration),
}


def outer_takes_params(outer: Callable, n_params: int) -> bool:
    """Whether ``outer`` is called as ``outer(x, *params)`` rather than ``outer(x)``.

    Decided by its signature: ``outer(x, *params)`` when it accepts ``*args`` or has
    exactly ``1 + n_params`` required positional parameters; ``outer(x)`` when it has
    one (or when there are no params, or the signature cannot be inspected).

    Raises:
        TypeError: the signature fits neither call.
    """
    if n_params == 0:
        return False
    try:
        signature = inspect.signature(outer)
    except (TypeError, ValueError):
        return False
    kinds = inspect.Parameter
    positional = [p for p in signature.parameters.values()
                  if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is kinds.empty for p in positional)
    if any(p.kind is kinds.VAR_POSITIONAL for p in signature.parameters.values()):
        return True
    if required == 1 + n_params:
        return True
    if required == 1 or (required == 0 and positional):
        return False
    raise TypeError(
        f"outer must be callable as outer(x) or as outer(x, *params) (1 + {n_params} positional "
        f"arguments here); its signature {signature} fits neither."
    )


def check_hypergradient(
    objective: Callable,
    x0: Any,
    *params: Any,
    solver: Optional[Callable],
    outer: Callable,
    linear_solver=None,
    kind: str = "objective",
    eps: Optional[float] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    fd_rtol: Optional[float] = None,
    unrolled_rtol: Optional[float] = None,
    fd_directions: Optional[int] = None,
    references: Sequence[str] = REFERENCES,
    dtype: Optional[torch.dtype] = torch.float64,
    seed: int = 0,
) -> HypergradientReport:
    r"""Compare the implicit hypergradient of ``outer(x*)`` with independent references.

    The hypergradient checked is :math:`\mathrm{d}L/\mathrm{d}\theta` for
    :math:`L = \text{outer}(x^\star(\theta))` or, when ``outer`` takes the params,
    :math:`L = \text{outer}(x^\star(\theta), \theta)` — the total derivative, direct
    term included. It is computed with :func:`~implicitgrad.implicit_solve` (or
    ``root_solve`` / ``fixed_point_solve`` for ``kind="residual"`` / ``"mapping"``) and
    ``linear_solver``, then compared (see the module docstring for the error) with:

    * ``"exact"``: the same formula with :class:`~implicitgrad.Exact`, tolerance ``rtol``;
    * ``"finite_differences"``: the five-point stencil
      :math:`\bigl(-L_{+2} + 8 L_{+1} - 8 L_{-1} + L_{-2}\bigr) / 12h` with
      :math:`L_{k} = L(\theta + k h e_j)` and :math:`h = \text{eps} \cdot \max(1, |\theta_j|)`,
      every :math:`L_k` re-solved by ``solver`` from ``x0``; tolerance ``fd_rtol``. Its
      truncation error is :math:`O(h^4)` and its noise about :math:`1.5\,\delta L / h`,
      :math:`\delta L` the change of ``L`` caused by the solver's own inaccuracy — so a
      fairly large step suits solvers that stop at :math:`\|\nabla f\| \approx 10^{-9}`;
    * ``"unrolled"``: autograd through the solver's iterations when
      ``getattr(solver, "unrollable", False)``; tolerance ``unrolled_rtol``.

    The gradient is taken with respect to every floating tensor leaf of ``params`` that
    requires grad — or every floating leaf, if none does. ``x0`` and those leaves are
    cast to ``dtype`` (float64 by default: finite differences need it). Warnings raised
    on the way (for example :class:`~implicitgrad.ImplicitGradWarning` from a solve that
    does not converge) are captured into the report instead of escaping.

    Args:
        objective: ``objective(x, *params)``: the inner objective (``kind="objective"``),
            residual (``"residual"``) or mapping (``"mapping"``).
        x0: initial point, a Tensor or pytree.
        *params: parameters, Tensors or pytrees (e.g. dicts).
        solver: ``solver(objective, x0, *params) -> x*``; for ``kind="mapping"`` ``None``
            means :class:`~implicitgrad.solvers.FixedPointIteration`.
        outer: the outer loss, ``outer(x) -> scalar`` or ``outer(x, *params) -> scalar``
            (chosen by its signature, see :func:`outer_takes_params`) — a validation loss
            usually needs only ``x``, a loss with a penalty on ``θ`` needs the params.
        linear_solver: the backward linear solver under test; ``None``: the default of
            the ``kind`` (CG for objectives, GMRES otherwise).
        kind: ``"objective"``, ``"residual"`` or ``"mapping"``.
        eps: relative finite-difference step; default 1e-3 (float64), 5e-2 (float32).
        rtol: tolerance against ``"exact"``; default 1e-6 (float64), 1e-3 (float32).
        atol: gradient norm below which errors are judged absolutely; default 1e-5
            (float64), 1e-3 (float32).
        fd_rtol: tolerance against finite differences; default 1e-4 (float64), 5e-2
            (float32). Their accuracy is limited by the step (truncation ~ eps⁴) and by
            how tightly the solver converges (noise ~ solve error / eps).
        unrolled_rtol: tolerance against unrolled differentiation; default 1e-4
            (float64), 1e-2 (float32).
        fd_directions: ``None`` differences every entry (4 solves per entry); an
            integer ``k`` instead compares ``k`` directional derivatives along random
            unit directions per parameter leaf (for leaves with more than ``k`` entries).
        references: which references to compute, a subset of
            ``("exact", "finite_differences", "unrolled")``.
        dtype: floating dtype to run in; ``None`` keeps the inputs' dtype.
        seed: seed of the random directions.

    Returns:
        A :class:`HypergradientReport`; ``str(report)`` explains a failure.

    Raises:
        TypeError: a non-callable ``objective`` / ``solver`` / ``outer``, or an ``outer``
            whose signature fits neither call; no floating tensor among ``params``.
        ValueError: unknown ``kind`` or reference, non-positive ``eps`` or tolerances,
            a non-scalar outer loss.

    Example:
        >>> import torch
        >>> from implicitgrad.testing import check_hypergradient
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> objective = lambda x, b: 0.5 * x @ A @ x - b @ x
        >>> solver = lambda f, x0, b: torch.linalg.solve(A, b)
        >>> b = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> report = check_hypergradient(objective, torch.zeros(2), b, solver=solver,
        ...                              outer=lambda x: (x ** 2).sum())
        >>> report.ok, report.errors["exact"] < 1e-10
        (True, True)

    References:
        Blondel et al., Efficient and Modular Implicit Differentiation, 2022.
    """
    _validate(objective, solver, outer, kind, references, fd_directions)
    run_dtype = dtype if dtype is not None else _first_float_dtype(x0, params)
    defaults = check_settings(run_dtype)
    settings: Dict[str, Any] = {k: v if v is not None else defaults[k] for k, v in
                {"eps": eps, "rtol": rtol, "fd_rtol": fd_rtol, "unrolled_rtol": unrolled_rtol,
                 "atol": atol}.items()}
    for name in ("eps", "rtol", "fd_rtol", "unrolled_rtol", "atol"):
        if not settings[name] > 0:
            raise ValueError(f"{name} must be positive, got {settings[name]!r}.")

    x0 = _cast_tree(x0, dtype)
    flat, spec, names, wrt = _parameter_leaves(params, dtype)
    takes_params = outer_takes_params(outer, len(params))
    if solver is None:
        default_solver = _FORMS[kind].default_solver
        if default_solver is None:  # refused with its message by the settings check above
            raise ValueError(f"kind={kind!r} needs a solver.")
        solver = default_solver()
    linear_described = repr(linear_solver)
    if linear_solver is None:
        linear_solver = _default_linear_solver(kind, objective, x0, params)
        linear_described = f"{linear_solver!r} (default)"
    run = _Runner(objective, x0, flat, spec, wrt, solver, outer, takes_params, kind)
    settings.update(
        kind=kind,
        dtype=str(run_dtype).replace("torch.", ""),
        outer_call="outer(x, *params)" if takes_params else "outer(x)",
        solver=_describe(solver),
        linear_solver=linear_described,
        fd_directions=fd_directions,
    )
    log = _WarningLog()

    with log.stage("implicit"):
        try:
            gradient, info = run.hypergradient(mode="implicit", linear_solver=linear_solver)
        except RuntimeError as error:
            if dtype is None or "dtype" not in str(error).lower():
                raise
            raise RuntimeError(
                f"check_hypergradient runs in {run_dtype} (dtype=...) but the problem failed with a dtype "
                f"mismatch: {error}. The objective, solver or outer probably use tensors of another dtype "
                "captured from the enclosing scope; build them in float64, or pass dtype=None to check in the "
                "inputs' own dtype (with looser tolerances)."
            ) from error
    refs: Dict[str, List[torch.Tensor]] = {}
    skipped: Dict[str, str] = {}
    projections: List[Optional[torch.Tensor]] = [None] * len(wrt)
    moved: List[bool] = [True] * len(wrt)
    exact_info = None
    if "exact" in references:
        size = sum(t.numel() for t in tree_flatten(x0)[0] if isinstance(t, torch.Tensor))
        if size > Exact().max_size:
            skipped["exact"] = f"x has {size} entries, more than Exact's max_size={Exact().max_size}"
        else:
            with log.stage("exact"):
                refs["exact"], exact_info = run.hypergradient(mode="implicit", linear_solver=Exact())
    if "finite_differences" in references:
        with log.stage("finite differences"):
            refs["finite_differences"], projections, moved = run.finite_differences(
                settings["eps"], fd_directions, seed
            )
    if "unrolled" in references:
        if not getattr(solver, "unrollable", False):
            skipped["unrolled"] = f"the solver {settings['solver']} does not declare unrollable = True"
        else:
            try:
                with log.stage("unrolled"):
                    refs["unrolled"], _ = run.hypergradient(mode="unrolled", linear_solver=linear_solver)
            except RuntimeError as error:
                skipped["unrolled"] = f"differentiating through the solver failed: {error}"

    tolerances = {"exact": settings["rtol"], "finite_differences": settings["fd_rtol"],
                  "unrolled": settings["unrolled_rtol"]}
    report = HypergradientReport(
        ok=False,
        gradient=dict(zip(names, gradient)),
        references={},
        errors={},
        parameter_errors={},
        tolerances={r: tolerances[r] for r in refs},
        skipped=skipped,
        forward_residual=info.forward_residual,
        initial_residual=info.initial_residual,
        forward_status=info.forward_status,
        forward_iterations=info.forward_iterations,
        backward=info.backward,
        causes=[],
        warnings=log.messages,
        settings=settings,
    )
    for ref, values in refs.items():
        project = projections if ref == "finite_differences" else [None] * len(wrt)
        mine = [g if p is None else p @ g.reshape(-1) for g, p in zip(gradient, project)]
        values = [v.reshape(m.shape) for v, m in zip(values, mine)]
        report.references[ref] = dict(zip(names, values))
        report.parameter_errors[ref] = {
            n: relative_error([m], [v], settings["atol"]) for n, m, v in zip(names, mine, values)
        }
        report.errors[ref] = relative_error(mine, values, settings["atol"])
    finite = all(bool(torch.isfinite(g).all()) for g in gradient)
    solved = info.forward_status == "converged" and (info.backward is None or info.backward.converged)
    report.ok = finite and solved and bool(refs) and all(passes(report, ref) for ref in refs)
    if not report.ok:
        direct = run.direct_term() if takes_params else [torch.zeros_like(g) for g in gradient]
        report.causes = diagnose(report, names, finite, exact_info, moved, direct, projections)
    return report


def assert_hypergradient(*args: Any, **kwargs: Any) -> HypergradientReport:
    """:func:`check_hypergradient`, raising if the check fails.

    Takes the same arguments and returns the report when it passes.

    Raises:
        HypergradientCheckError: an ``AssertionError`` whose message is the report and
            whose ``.report`` attribute holds it.

    Example:
        >>> import torch
        >>> from implicitgrad.testing import assert_hypergradient
        >>> objective = lambda x, t: ((x - t) ** 2).sum()
        >>> t = torch.ones(3, dtype=torch.float64, requires_grad=True)
        >>> _ = assert_hypergradient(objective, torch.zeros(3), t, solver=lambda f, x0, t: t.clone(),
        ...                          outer=lambda x: (x ** 3).sum())
    """
    report = check_hypergradient(*args, **kwargs)
    if not report.ok:
        raise HypergradientCheckError(report)
    return report


# ----------------------------------------------------------------------------- machinery


class _Runner:
    """The problem with its parameters flattened, and the computations the check needs."""

    def __init__(self, objective, x0, flat, spec, wrt, solver, outer, takes_params, kind):
        self.objective, self.x0, self.flat, self.spec, self.wrt = objective, x0, flat, spec, wrt
        self.solver, self.outer, self.takes_params, self.kind = solver, outer, takes_params, kind

    def params(self, leaves: Sequence[Any]) -> Tuple[Any, ...]:
        return tree_unflatten(list(leaves), self.spec)

    def loss(self, x: Any, params: Tuple[Any, ...]) -> torch.Tensor:
        value = self.outer(x, *params) if self.takes_params else self.outer(x)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"outer must return a scalar Tensor, got {shape}. Reduce it (e.g. .sum()).")
        return value.reshape(())

    def tracked(self) -> Tuple[Tuple[Any, ...], List[torch.Tensor]]:
        """The params with fresh leaves requiring grad where checked, and those leaves."""
        leaves = list(self.flat)
        inputs = []
        for i in self.wrt:
            leaves[i] = leaves[i].detach().clone().requires_grad_(True)
            inputs.append(leaves[i])
        return self.params(leaves), inputs

    def hypergradient(self, mode: str, linear_solver) -> Tuple[List[torch.Tensor], Any]:
        params, inputs = self.tracked()
        x, info = _FORMS[self.kind].solve(
            self.objective, self.x0, *params, solver=self.solver, linear_solver=linear_solver, mode=mode,
            on_failure="warn", return_info=True,
        )
        return _grad(self.loss(x, params), inputs), info

    def direct_term(self) -> List[torch.Tensor]:
        """``∂L/∂θ`` at fixed ``x*``: the part of the gradient that bypasses the solver."""
        x = self.solve(self.flat)
        params, inputs = self.tracked()
        return _grad(self.loss(x, params), inputs)

    def solve(self, leaves: Sequence[Any]) -> Any:
        with torch.no_grad():
            return self.solver(self.objective, self.x0, *self.params(leaves))

    def finite_differences(self, eps: float, directions: Optional[int], seed: int):
        """Five-point differences per leaf, and whether the solver's output moved at all."""
        gen = torch.Generator().manual_seed(seed)
        values, moved = [], []
        projections: List[Optional[torch.Tensor]] = []
        for i in self.wrt:
            base = self.flat[i].detach()
            n = base.numel()
            if directions is None or n <= directions:
                basis = torch.eye(n, dtype=base.dtype, device=base.device)
                steps = eps * base.reshape(-1).abs().clamp_min(1.0)
                projections.append(None)
            else:
                basis = torch.randn(directions, n, generator=gen, dtype=base.dtype).to(base.device)
                basis = basis / basis.norm(dim=1, keepdim=True)
                steps = torch.full((directions,), eps * max(1.0, float(base.abs().max())),
                                   dtype=base.dtype, device=base.device)
                projections.append(basis)
            leaf_values, leaf_moved = [], False
            for direction, h in zip(basis, steps):
                xs, losses = [], []
                for offset in _STENCIL_OFFSETS:
                    leaves = list(self.flat)
                    leaves[i] = base + offset * h * direction.reshape(base.shape)
                    x = self.solve(leaves)
                    with torch.no_grad():
                        losses.append(self.loss(x, self.params(leaves)))
                    xs.append(x)
                leaf_values.append(sum(w * v for w, v in zip(_STENCIL_WEIGHTS, losses)) / h)
                leaf_moved = leaf_moved or any(_differs(xs[0], x) for x in xs[1:])
            values.append(torch.stack(leaf_values) if leaf_values else base.new_zeros(0))
            moved.append(leaf_moved)
        return values, projections, moved


class _WarningLog:
    """Collects the warnings of each stage of the check, each message once."""

    def __init__(self) -> None:
        self.messages: List[str] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for w in caught:
                    text = f"{w.category.__name__}: {w.message}"
                    if not any(m.endswith(text) for m in self.messages):
                        self.messages.append(f"[{name}] {text}")


def _describe(solver: Callable) -> str:
    """A function by its name, anything else by its repr."""
    if inspect.isfunction(solver) or inspect.ismethod(solver):
        return solver.__qualname__
    return repr(solver)


def _grad(loss: torch.Tensor, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    return [g.detach() for g in grads]


def _differs(a: Any, b: Any) -> bool:
    pairs = zip(tree_flatten(a)[0], tree_flatten(b)[0])
    return any(isinstance(s, torch.Tensor) and not torch.equal(s, t) for s, t in pairs)


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _cast_tree(tree: Any, dtype: Optional[torch.dtype]) -> Any:
    leaves, spec = tree_flatten(tree)
    out = []
    for t in leaves:
        if _is_float(t):
            t = t.detach().to(dtype) if dtype is not None else t.detach()
        out.append(t)
    return tree_unflatten(out, spec)


def _parameter_leaves(params: Tuple[Any, ...], dtype: Optional[torch.dtype]):
    originals, spec = tree_flatten(tuple(params))
    leaf_names = tree_leaf_names(tuple(params), "params")
    floats = [i for i, t in enumerate(originals) if _is_float(t)]
    if not floats:
        raise TypeError(
            "check_hypergradient: params hold no floating-point Tensor to differentiate with respect to. "
            "Pass the hyperparameters as float Tensors."
        )
    wrt = [i for i in floats if originals[i].requires_grad] or floats
    flat = [t.detach().to(dtype) if _is_float(t) and dtype is not None else
            (t.detach() if isinstance(t, torch.Tensor) else t) for t in originals]
    names = [leaf_names[i] for i in wrt]
    return flat, spec, names, wrt


def _first_float_dtype(x0: Any, params: Tuple[Any, ...]) -> torch.dtype:
    for t in tree_flatten((x0, params))[0]:
        if _is_float(t):
            return t.dtype
    return torch.get_default_dtype()


def _default_linear_solver(kind: str, fn: Callable, x0: Any, params: Tuple[Any, ...]) -> Any:
    """The linear solver the core picks when none is given, from the built condition's symmetry."""
    x_leaves, x_spec = tree_flatten(x0)
    p_leaves, p_spec = tree_flatten(tuple(params))
    condition = BUILDERS[kind](fn, Codec(x_spec, tuple(x_leaves), p_spec, tuple(p_leaves)))
    return default_linear_solver(condition.symmetric)


def _validate(objective, solver, outer, kind, references, fd_directions) -> None:
    if kind not in _FORMS:
        raise ValueError(f"kind must be one of {tuple(_FORMS)}, got {kind!r}.")
    if not callable(objective):
        raise TypeError(f"the {kind} function must be callable as {kind}(x, *params).")
    if solver is None and _FORMS[kind].default_solver is None:
        without = [k for k, form in _FORMS.items() if form.default_solver is not None]
        raise TypeError(
            f"solver must be a callable solver(fn, x0, *params) -> x (None only for kind in {without})."
        )
    if solver is not None and not callable(solver):
        raise TypeError(f"solver must be callable as solver(fn, x0, *params), got {type(solver).__name__}.")
    if not callable(outer):
        raise TypeError("outer must be callable as outer(x) or outer(x, *params), returning a scalar Tensor.")
    unknown = [r for r in references if r not in REFERENCES]
    if unknown or isinstance(references, str) or not references:
        raise ValueError(f"references must be a non-empty sequence drawn from {REFERENCES}, got {references!r}.")
    if fd_directions is not None and (not isinstance(fd_directions, int) or fd_directions < 1):
        raise ValueError(f"fd_directions must be None or a positive integer, got {fd_directions!r}.")
