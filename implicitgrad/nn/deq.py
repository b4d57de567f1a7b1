"""``DEQ``: a deep equilibrium layer, ``z* = f(z*, x)`` for every sample of a batch."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call

from .._api import fixed_point_solve
from .._compat import is_wrapped
from .._diagnostics import ON_FAILURE, SolveInfo
from .._validation import check_count, check_fraction, check_linear_solver, check_positive_number
from ..linalg import GMRES
from ..linalg._base import LinearSolverLike
from ..solvers import AndersonAcceleration
from ..solvers._base import SolverStats

__all__ = ["DEQ", "DEQInfo"]

BACKWARDS = ("implicit", "phantom", "jacobian_free")

_CONTRACTION_HINT = (
    "the fixed-point iteration of f may not converge because f is not a contraction in z near the "
    "fixed point: damp the solver (e.g. AndersonAcceleration(damping=0.5)), normalise f's weights "
    "(torch.nn.utils.parametrizations.spectral_norm), regularise training with jacobian_samples=1, "
    "or raise maxiter"
)


@dataclasses.dataclass
class DEQInfo:
    """What one call of :class:`DEQ` reports.

    Attributes:
        solve: the :class:`~implicitgrad.SolveInfo` of the fixed-point solve (per-sample
            ``forward_residuals`` ``‖f(z, x) − z‖`` and ``initial_residuals``;
            ``backward`` is filled in by an implicit backward pass).
        relative_residuals: ``‖f(z*, x) − z*‖ / ‖f(z*, x)‖`` per sample (float64, detached).
        forward_iterations: evaluations of ``f`` by the forward solver (the batch stops
            when its last sample meets its tolerance).
        backward: the backward mode used.
        jacobian_loss: the Hutchinson estimate of the mean over the batch of
            :math:`\\|\\partial f / \\partial z\\|_F^2` at ``z*`` (a differentiable scalar), or
            ``None`` when ``jacobian_samples=0`` or autograd is off.
    """

    solve: SolveInfo
    relative_residuals: torch.Tensor
    forward_iterations: Optional[int]
    backward: str
    jacobian_loss: Optional[torch.Tensor] = None


class _Solved:
    """A solver that hands the core a fixed point found before (and what its solver said)."""

    batchable = True
    per_system = True

    def __init__(self, z: torch.Tensor, stats: SolverStats) -> None:
        self.z, self.stats = z, stats

    def run(self, fn: Callable, x0: Any, *params: Any, batch_ndim: int = 0) -> Tuple[torch.Tensor, SolverStats]:
        return self.z, self.stats

    def __call__(self, fn: Callable, x0: Any, *params: Any) -> torch.Tensor:
        return self.z


class DEQ(nn.Module):
    r"""A deep equilibrium layer: the output is the fixed point :math:`z^\star = f(z^\star, x)`.

    ``f(z, x)`` is an ``nn.Module`` (its parameters are the layer's) that treats the samples
    of a batch independently: sample ``i`` of its output depends on sample ``i`` of ``z`` and
    ``x`` only (no batch normalisation in training mode). Every sample is its own problem:

    * **Forward.** The solver (default :class:`~implicitgrad.solvers.AndersonAcceleration`,
      memory 5, at most 100 evaluations of ``f``) runs on the whole batch with one
      stopping rule per sample, :math:`\|f(z_i) - z_i\| \le \text{tol}\cdot
      \max(1, \|f(z^0_i) - z^0_i\|)`, and ends when every sample meets it; samples that
      have converged stop moving. The forward residual of each sample is then checked
      against ``forward_tol`` (same rule); a sample that fails — typically because ``f`` is
      not a contraction in ``z`` — is reported per ``on_failure``.
    * **Backward** ``"implicit"`` (default): the implicit function theorem,
      :math:`\bar\theta = (\partial_\theta f)^\top u` with
      :math:`(I - \partial_z f)^\top u = \bar z`, one linear system per sample
      (:func:`~implicitgrad.fixed_point_solve` under ``torch.func.vmap``; default
      :class:`~implicitgrad.GMRES`), each to its own tolerance.
    * ``"phantom"`` (Geng et al., 2021): ``phantom_steps`` damped steps
      :math:`z \leftarrow (1-\tau) z + \tau f(z, x)` from :math:`z^\star`, differentiated by
      autograd. The gradient is the implicit one with :math:`(I - J)^{-1}` replaced by
      :math:`\tau\sum_{j<k} ((1-\tau) I + \tau J)^j`, an approximation whose error decays
      like :math:`((1-\tau) + \tau\rho(J))^k`.
    * ``"jacobian_free"`` (Fung et al., 2022): the output is :math:`f(z^\star, x)` with
      :math:`z^\star` detached, i.e. :math:`(I - J)^{-1}` replaced by :math:`I`; cheapest,
      and an approximation whose error grows with :math:`\|J\|`.

    **Forward mode.** ``torch.func.jvp`` through the layer (in ``x`` or, with
    ``torch.func.functional_call``, in the parameters of ``f``) gives, with ``"implicit"``,
    :math:`\dot z = (I - \partial_z f)^{-1} (\partial_x f\, \dot x + \partial_\theta f\,
    \dot\theta)`, one linear solve per sample (the ``linear_solver``); with ``"phantom"`` and
    ``"jacobian_free"`` it is the forward mode of the same approximation as their backward.
    Under a ``torch.func`` transform each sample holds its own copy of the parameters
    (memory: batch × parameters).

    The approximate modes are cheaper per step but not the gradient of the layer: their
    error against the implicit gradient is measured in the how-to guide
    (:doc:`/howto/layers`) and in ``examples/deq_digits.py``.

    **Jacobian regularisation** (Bai et al., 2021): with ``jacobian_samples = K > 0`` each
    call also returns, in :attr:`DEQInfo.jacobian_loss`, the Hutchinson estimate
    :math:`\frac1{BK}\sum_{i,k}\|\epsilon_{ik}^\top \partial_z f(z^\star_i, x_i)\|^2` with
    :math:`\epsilon \sim \mathcal N(0, I)`, an unbiased estimate of the batch mean of
    :math:`\|\partial f/\partial z\|_F^2`, differentiable in the parameters of ``f``; add a
    multiple of it to the loss to keep ``f`` contractive.

    Args:
        f: the cell, ``f(z, x) -> z``, an ``nn.Module``.
        solver: the forward solver; a built-in ``ig.solvers`` solver with per-problem
            stopping (``per_system``: Anderson, fixed-point iteration) or any
            ``solver(fn, z0, x, params) -> z`` (then without per-sample stopping).
        linear_solver: the implicit backward's linear solver (default ``ig.GMRES()``): an
            instance, or a plain callable ``linear_solver(matvec, b)`` returning ``x`` or
            ``(x, info)`` (as :func:`~implicitgrad.fixed_point_solve` accepts).
        backward: ``"implicit"``, ``"phantom"`` or ``"jacobian_free"``.
        phantom_steps: :math:`k`, the steps of the phantom gradient.
        phantom_damping: :math:`\tau \in (0, 1]`.
        jacobian_samples: :math:`K`, probe vectors of the Jacobian regulariser (0: off).
        forward_tol: accepted per-sample forward residual (relative as above); ``None``:
            1e-6 in float64, 1e-3 in float32.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` for an unconverged forward or
            backward solve.

    Attributes:
        last_info: the :class:`DEQInfo` of the latest call.

    Raises:
        TypeError: ``f`` is not an ``nn.Module``; a wrong solver or linear solver.
        ValueError: an unknown ``backward``, an out-of-range setting, ``x`` and ``z0`` with
            different batch sizes.

    Example:
        >>> import torch, implicitgrad as ig
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.W = torch.nn.Linear(4, 4, dtype=torch.float64)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.W(z) + x)
        >>> deq = ig.nn.DEQ(Cell())
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> z, info = deq(x, return_info=True)
        >>> bool(info.relative_residuals.max() < 1e-6), info.solve.forward_status
        (True, 'converged')
        >>> z.sum().backward()                       # implicit gradient into Cell.W

    References:
        Bai, Kolter and Koltun, Deep Equilibrium Models, 2019. Bai, Koltun and Kolter,
        Stabilizing Equilibrium Models by Jacobian Regularization, 2021. Geng et al., On
        Training Implicit Models, 2021. Fung et al., JFB: Jacobian-Free Backpropagation for
        Implicit Networks, 2022.
    """

    def __init__(
        self,
        f: nn.Module,
        solver: Optional[Callable[..., Any]] = None,
        linear_solver: Optional[LinearSolverLike] = None,
        backward: str = "implicit",
        *,
        phantom_steps: int = 5,
        phantom_damping: float = 0.8,
        jacobian_samples: int = 0,
        forward_tol: Optional[float] = None,
        on_failure: str = "warn",
    ) -> None:
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"DEQ: f must be an nn.Module f(z, x) -> z, got {type(f).__name__}; wrap a function "
                            "in a Module that holds its parameters.")
        if solver is not None and not callable(solver):
            raise TypeError("DEQ: solver must be callable, e.g. ig.solvers.AndersonAcceleration().")
        check_linear_solver(linear_solver, "DEQ", example="ig.GMRES()")
        if backward not in BACKWARDS:
            raise ValueError(f"DEQ: backward must be one of {BACKWARDS}, got {backward!r}.")
        if on_failure not in ON_FAILURE:
            raise ValueError(f"DEQ: on_failure must be one of {ON_FAILURE}, got {on_failure!r}.")
        self.f = f
        self.solver = solver if solver is not None else AndersonAcceleration(memory=5, maxiter=100)
        self.linear_solver = linear_solver if linear_solver is not None else GMRES()
        self.backward_mode = backward
        self.phantom_steps = check_count("phantom_steps", phantom_steps, "DEQ")
        self.phantom_damping = check_fraction("phantom_damping", phantom_damping, "DEQ")
        self.jacobian_samples = check_count("jacobian_samples", jacobian_samples, "DEQ", minimum=0)
        self.forward_tol = None if forward_tol is None else check_positive_number("forward_tol", forward_tol, "DEQ")
        self.on_failure = on_failure
        self.last_info: Optional[DEQInfo] = None

    def extra_repr(self) -> str:
        return f"backward={self.backward_mode!r}, solver={self.solver!r}"

    def forward(
        self, x: torch.Tensor, z0: Optional[torch.Tensor] = None, return_info: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, DEQInfo]]:
        """The fixed point ``z*`` of ``f(·, x)`` for the batch ``x`` (leading dimension).

        Args:
            x: the input injected into ``f``, batch first.
            z0: the starting point (default: zeros shaped like ``x``; pass it when the state
                has another shape), batch first.
            return_info: also return the :class:`DEQInfo`.
        """
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            raise TypeError("DEQ: x must be a Tensor with a leading batch dimension.")
        z0 = torch.zeros_like(x) if z0 is None else z0
        if not isinstance(z0, torch.Tensor) or z0.ndim == 0 or z0.shape[0] != x.shape[0]:
            got = tuple(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise ValueError(f"DEQ: z0 must be a Tensor with the batch size of x ({x.shape[0]}), got {got}.")
        params: Dict[str, torch.Tensor] = dict(self.f.named_parameters())
        detached = {k: v.detach() for k, v in params.items()}
        z_star, stats = self._solve(z0.detach(), x.detach(), detached)
        # Inside a torch.func transform (jvp, grad, vmap) the tangents travel with the
        # tensors, whatever the grad mode.
        transformed = any(is_wrapped(t) for t in (x, *params.values()))
        implicit = self.backward_mode == "implicit" and (torch.is_grad_enabled() or transformed)
        z, solve_info = self._attach(z_star, stats, z0.detach(), x if implicit else x.detach(),
                                     params if implicit else detached)
        if torch.is_grad_enabled() and self.backward_mode == "phantom":
            tau = self.phantom_damping
            for _ in range(self.phantom_steps):
                z = (1 - tau) * z + tau * self.f(z, x)
        elif torch.is_grad_enabled() and self.backward_mode == "jacobian_free":
            z = self.f(z, x)
        jacobian_loss = self._jacobian_loss(z_star, x) if self.jacobian_samples and torch.is_grad_enabled() else None
        with torch.no_grad():
            scale = z_star.reshape(z_star.shape[0], -1).double().norm(dim=-1)
            residuals = torch.tensor(solve_info.forward_residuals or [float("nan")] * z.shape[0],
                                     dtype=torch.float64, device=z.device)
            relative = residuals / (scale + residuals).clamp_min(torch.finfo(torch.float64).tiny)
        info = DEQInfo(solve=solve_info, relative_residuals=relative, forward_iterations=stats.iterations,
                       backward=self.backward_mode, jacobian_loss=jacobian_loss)
        self.last_info = info
        return (z, info) if return_info else z

    # -------------------------------------------------------------------------- steps
    def _call(self, z: torch.Tensor, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(self.f, params, (z, x))

    def _solve(self, z0: torch.Tensor, x: torch.Tensor, params: Dict[str, torch.Tensor]):
        """The fixed point of the batch (no autograd), and the solver's report."""
        solver = self.solver
        with torch.no_grad():
            if hasattr(solver, "run") and getattr(solver, "per_system", False):
                z, stats = solver.run(self._call, z0, x, params, batch_ndim=1)
            elif hasattr(solver, "run"):
                z, stats = solver.run(self._call, z0, x, params)
            else:
                z, stats = solver(self._call, z0, x, params), SolverStats(iterations=-1)
        if stats.converged is False:
            stats = dataclasses.replace(stats, message=f"{stats.message}; {_CONTRACTION_HINT}".lstrip("; "))
        return z, stats

    def _attach(self, z_star: torch.Tensor, stats: SolverStats, z0: torch.Tensor, x: torch.Tensor,
                params: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, SolveInfo]:
        """``z*`` joined to autograd by :func:`fixed_point_solve`, one problem per sample.

        The core measures and reports every sample's forward residual; with parameters and
        inputs that require grad it also supplies the implicit backward.
        """
        infos: List[SolveInfo] = []
        solved = _Solved(z_star, stats)
        f = self.f

        def mapping(z: torch.Tensor, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(f, params, (z.unsqueeze(0), x.unsqueeze(0))).squeeze(0)

        def one(z0: torch.Tensor, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
            z, info = fixed_point_solve(mapping, z0, x, params, solver=solved, linear_solver=self.linear_solver,
                                        on_failure=self.on_failure, forward_tol=self.forward_tol,
                                        return_info=True)
            infos.append(info)
            return z

        if any(is_wrapped(t) for t in (x, *params.values())):
            # Under a torch.func transform a parameter shared by the samples would be expanded
            # with stride 0, and the zero tangent forward mode gives it cannot become a dual
            # tensor: every sample gets its own copy (memory: batch × parameters).
            batch = x.shape[0]
            params = {k: v.unsqueeze(0).expand(batch, *v.shape).contiguous() for k, v in params.items()}
            z = torch.func.vmap(one, in_dims=(0, 0, 0))(z0, x, params)
        else:
            z = torch.func.vmap(one, in_dims=(0, 0, None))(z0, x, params)
        return z, infos[0]

    def _jacobian_loss(self, z_star: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z_star.detach().requires_grad_(True)
            fz = self.f(z, x)
            total = z.new_zeros(())
            for _ in range(self.jacobian_samples):
                probe = torch.randn_like(fz)
                (vjp,) = torch.autograd.grad(fz, z, probe, create_graph=True)
                total = total + vjp.square().sum()
        return total / (self.jacobian_samples * z.shape[0])
