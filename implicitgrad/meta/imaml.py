"""Implicit MAML: the meta-gradient of a proximal inner problem by the implicit function theorem."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .._api import implicit_solve
from .._diagnostics import ImplicitGradWarning, SolveInfo, check_on_failure
from ..linalg import CG, LinearSolver
from ._base import MetaLearner, Params, Tensor

__all__ = ["IMAML"]

_LAM_PREFIX = "log_lam."


class IMAML(MetaLearner):
    r"""Implicit model-agnostic meta-learning (iMAML).

    Each task adapts the meta-parameters :math:`\theta` by solving the proximal problem

    .. math::

        \phi^\star(\theta) = \arg\min_\phi \; G(\phi, \theta) =
        \mathcal{L}_{\text{support}}(\phi) + \frac{\lambda}{2} \|\phi - \theta\|^2 ,

    whose optimality condition :math:`\nabla \mathcal{L}_{\text{support}}(\phi^\star) +
    \lambda(\phi^\star - \theta) = 0` gives, by the implicit function theorem, with
    :math:`H = \nabla^2 \mathcal{L}_{\text{support}}(\phi^\star)`,

    .. math::

        \frac{d \phi^\star}{d \theta} = \Big(I + \frac{H}{\lambda}\Big)^{-1}, \qquad
        \frac{d\, \mathcal{L}_{\text{query}}(\phi^\star)}{d \theta} =
        \Big(I + \frac{H}{\lambda}\Big)^{-1} \nabla \mathcal{L}_{\text{query}}(\phi^\star) .

    The meta-gradient depends on :math:`\phi^\star` only, not on how the inner solver got
    there: memory is constant in the number of inner steps. It is computed by
    :func:`~implicitgrad.implicit_solve` on :math:`G` with :math:`\theta` (and, if learned,
    :math:`\log\lambda`) passed as params: its backward pass solves
    :math:`(H + \lambda I) u = \nabla\mathcal{L}_{\text{query}}` with ``linear_solver``
    (Hessian-vector products only) and returns :math:`\lambda u`. :math:`H + \lambda I`
    must be positive definite for CG: :math:`\lambda` larger than the most negative
    curvature of the support loss near :math:`\phi^\star`.

    With ``learn_lam=True``, :math:`\lambda` is a vector — one positive value per
    parameter entry, :math:`\frac12 \sum_i \lambda_i (\phi_i - \theta_i)^2` — kept as log-λ
    tensors (:attr:`log_lam`) that are meta-parameters too and receive
    :math:`\partial \mathcal{L}_{\text{query}} / \partial \log\lambda` from the same backward
    pass.

    **Convergence reporting.** The inner problem is solved by ``inner_solver``, any
    :mod:`implicitgrad.solvers` solver or callable ``solver(objective, φ0, *params)``,
    started at :math:`\phi_0 = \theta`: either to a tolerance (accurate meta-gradient) or
    for a fixed number of steps, e.g. ``GradientDescent(lr, maxiter=16, tol=0)`` as in the
    paper. A fixed number of steps leaves a residual :math:`\|\nabla_\phi G\|` by design,
    and a truncated CG (``CG(maxiter=5)``) an unconverged backward solve. Both are
    measured on every solve (see :attr:`last_info`); with ``on_failure="warn"`` each *kind*
    of shortfall — forward residual above ``forward_tol``, backward solve not converged,
    non-finite values — is reported once per IMAML object by an
    :class:`~implicitgrad.ImplicitGradWarning` with the numbers and the fix, not on every
    meta-step. Pass ``forward_tol`` (the relative residual
    :math:`\|\nabla_\phi G(\phi)\| / \max(1, \|\nabla_\phi G(\theta)\|)` you accept) to
    acknowledge a fixed-step budget; ``on_failure="raise"`` raises
    :class:`~implicitgrad.ConvergenceError` at the first shortfall; ``"ignore"`` is silent.

    Args:
        model: the ``nn.Module`` whose trainable parameters are :math:`\theta`.
        loss_fn: ``loss_fn(output, target) -> scalar``, mean-reduced.
        lam: :math:`\lambda > 0`, the strength of the proximal term (initial value when
            learned). Larger: adaptation stays closer to :math:`\theta`, the linear system
            is better conditioned.
        inner_solver: solver of the proximal problem; it receives the objective
            ``G(φ, θ, log_lam, x_support, y_support)`` with ``φ`` a dict name → Tensor.
        linear_solver: solver of the backward system; default ``ig.CG()`` to its default
            tolerance. The paper's 5 CG steps: ``ig.CG(maxiter=5)``.
        learn_lam: learn one :math:`\lambda` per parameter entry.
        forward_tol: relative forward residual accepted without a report (default that of
            :func:`~implicitgrad.implicit_solve`: 1e-6 in float64, 1e-3 in float32).
        on_failure: ``"warn"`` (once per kind, see above), ``"raise"`` or ``"ignore"``.
        batched, all_reduce, process_group: see :class:`MetaLearner`.

    Attributes:
        log_lam: dict parameter name → log-λ tensor (same shape as the parameter), only
            with ``learn_lam``; optimise it with the model (:meth:`meta_parameters`).
        last_info: list of :class:`~implicitgrad.SolveInfo` of the latest
            :meth:`meta_step` / :meth:`meta_gradient` / :meth:`adapt` — one per
            ``implicit_solve`` (one for a vmapped meta-batch, one per task otherwise),
            with the forward residual and, after a meta-step, the backward CG outcome.

    Raises:
        TypeError: a wrong ``model``, ``loss_fn``, ``inner_solver`` or ``linear_solver``.
        ValueError: ``lam`` not positive, unknown ``on_failure``.

    Example:
        >>> import torch, implicitgrad as ig
        >>> from implicitgrad import meta
        >>> model = torch.nn.Linear(3, 1).double()
        >>> imaml = meta.IMAML(model, torch.nn.functional.mse_loss, lam=1.0,
        ...                       inner_solver=ig.solvers.GradientDescent(lr=0.1, maxiter=500))
        >>> tasks = [tuple(torch.randn(n, d, dtype=torch.float64) for n, d in
        ...                [(5, 3), (5, 1), (5, 3), (5, 1)]) for _ in range(4)]
        >>> optimizer = torch.optim.SGD(imaml.meta_parameters(), lr=0.1)
        >>> loss = imaml.meta_step(tasks)        # writes model.weight.grad, model.bias.grad
        >>> optimizer.step()
        >>> sorted(imaml.adapt(*tasks[0][:2]))
        ['bias', 'weight']

    References:
        Rajeswaran et al., Meta-Learning with Implicit Gradients, 2019.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        lam: float,
        inner_solver: Callable,
        linear_solver: Optional[LinearSolver] = None,
        *,
        learn_lam: bool = False,
        forward_tol: Optional[float] = None,
        on_failure: str = "warn",
        batched: Optional[bool] = None,
        all_reduce: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(model, loss_fn, batched=batched, all_reduce=all_reduce, process_group=process_group)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"IMAML: lam must be a positive number, got {lam!r}.")
        if inner_solver is None or not callable(inner_solver):
            raise TypeError(
                "IMAML: inner_solver must be a callable solver(objective, phi0, *params), e.g. "
                "ig.solvers.GradientDescent(lr=0.1, maxiter=50)."
            )
        linear_solver = CG() if linear_solver is None else linear_solver
        if not isinstance(linear_solver, LinearSolver):
            raise TypeError(
                f"IMAML: linear_solver must be an ig linear solver such as ig.CG(maxiter=5), got "
                f"{type(linear_solver).__name__}."
            )
        if forward_tol is not None and not forward_tol > 0:
            raise ValueError(f"IMAML: forward_tol must be positive, got {forward_tol!r}.")
        self.on_failure = check_on_failure(on_failure)
        self.lam = float(lam)
        self.inner_solver = inner_solver
        self.linear_solver = linear_solver
        self.forward_tol = forward_tol
        self.learn_lam = bool(learn_lam)
        self.log_lam: Dict[str, Tensor] = {}
        if self.learn_lam:
            self.log_lam = {
                name: torch.full_like(p.detach(), math.log(lam)).requires_grad_(True)
                for name, p in model.named_parameters()
                if p.requires_grad
            }
        self.last_info: List[SolveInfo] = []
        self._infos: List[SolveInfo] = []
        self._reported: set = set()

    def __repr__(self) -> str:
        lam = "learned" if self.learn_lam else self.lam
        return (f"IMAML(lam={lam}, inner_solver={self.inner_solver!r}, "
                f"linear_solver={self.linear_solver!r})")

    # ------------------------------------------------------------------ public
    def meta_gradient(self, tasks) -> Tuple[Params, Tensor]:
        self._infos = []
        out = super().meta_gradient(tasks)
        self._report(backward=True)
        return out

    meta_gradient.__doc__ = MetaLearner.meta_gradient.__doc__

    def adapt(self, x_support: Tensor, y_support: Tensor) -> Params:
        self._infos = []
        out = super().adapt(x_support, y_support)
        self._report(backward=False)
        return out

    adapt.__doc__ = MetaLearner.adapt.__doc__

    def adaptation_loss(self, params: Params, x_support: Tensor, y_support: Tensor) -> Tensor:
        """The proximal objective :math:`G(\\phi, \\theta)` at the model's current θ."""
        meta = dict(self.named_meta_parameters())
        theta = self._trainable(meta)
        phi = {k: params[k] for k in theta}
        return self._objective(self._context())(phi, theta, self._log_lam(meta), x_support, y_support)

    def named_meta_parameters(self):
        """The model's trainable parameters, then ``("log_lam.<name>", log-λ)`` if learned."""
        yield from super().named_meta_parameters()
        for name, t in self.log_lam.items():
            yield _LAM_PREFIX + name, t

    def state_dict(self) -> Dict[str, Any]:
        """``{"log_lam": {name: tensor}}`` with ``learn_lam``, else empty."""
        return {"log_lam": {k: v.detach().clone() for k, v in self.log_lam.items()}} if self.learn_lam else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Copies saved log-λ values in place (optimizers holding the tensors stay valid)."""
        saved = dict(state).get("log_lam", {})
        if set(saved) != set(self.log_lam):
            raise ValueError(
                f"IMAML.load_state_dict: the state holds log_lam for {sorted(saved)} but this IMAML has "
                f"{sorted(self.log_lam)}; build it with the same model and learn_lam."
            )
        with torch.no_grad():
            for k, v in saved.items():
                self.log_lam[k].copy_(v)

    # ------------------------------------------------------------------ internals
    def _log_lam(self, meta: Params) -> Optional[Params]:
        if not self.learn_lam:
            return None
        return {k[len(_LAM_PREFIX):]: v for k, v in meta.items() if k.startswith(_LAM_PREFIX)}

    def _objective(self, context: Params) -> Callable:
        lam = self.lam

        def objective(phi, theta, log_lam, x, y):
            if log_lam is None:
                proximal = 0.5 * lam * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)
            else:
                proximal = 0.5 * sum((log_lam[k].exp() * (phi[k] - theta[k]) ** 2).sum() for k in phi)
            return self._loss(phi, context, x, y) + proximal

        return objective

    def _solve(self, meta: Params, context: Params, x_s: Tensor, y_s: Tensor) -> Params:
        theta = self._trainable(meta)
        phi0 = {k: v.detach() for k, v in theta.items()}
        # Reports go through _report (once per kind); only "raise" is delegated to the core.
        core_on_failure = "raise" if self.on_failure == "raise" else "ignore"
        phi, info = implicit_solve(
            self._objective(context), phi0, theta, self._log_lam(meta), x_s, y_s,
            solver=self.inner_solver, linear_solver=self.linear_solver, on_failure=core_on_failure,
            forward_tol=self.forward_tol, return_info=True,
        )
        self._infos.append(info)
        return phi

    def _adapt(self, meta, context, x_s, y_s) -> Params:
        return self._solve(meta, context, x_s, y_s)

    def _task_terms(self, meta, context, x_s, y_s, x_q, y_q):
        phi = self._solve(meta, context, x_s, y_s)
        loss = self._loss(phi, context, x_q, y_q)
        return loss, loss

    def _report(self, backward: bool) -> None:
        infos, self.last_info = self._infos, self._infos
        self._infos = []
        if self.on_failure != "warn" or not infos:
            return
        n = len(infos)
        nonfinite = [i for i in infos if i.forward_status == "nonfinite"]
        if nonfinite:
            self._warn_once(
                "nonfinite",
                f"IMAML: the inner solver returned NaN/Inf in {len(nonfinite)} of {n} solve(s). Lower the inner "
                "step size, or raise lam to make the proximal problem better conditioned.",
            )
        stalled = [i for i in infos if i.forward_status == "not_converged"]
        if stalled:
            worst = max(i.forward_residual / max(1.0, i.initial_residual) for i in stalled)
            tol = "the default forward_tol" if self.forward_tol is None else f"forward_tol={self.forward_tol:g}"
            self._warn_once(
                "forward",
                f"IMAML: the proximal inner problem is not solved to {tol} in {len(stalled)} of {n} solve(s): "
                f"relative residual ‖∇φ G‖ / max(1, ‖∇φ G(θ)‖) up to {worst:.2e}. The meta-gradient "
                "(I + H/λ)⁻¹∇L_query is exact at the minimiser only; its error grows linearly with this "
                "residual. A fixed number of inner steps leaves such a residual by design: pass "
                f"IMAML(..., forward_tol={_round_up(worst):g}) to accept this accuracy, or run the inner "
                "solver longer or to a tolerance. Reported once per IMAML object; every solve's numbers "
                "are in .last_info.",
            )
        if backward:
            unsolved = [i for i in infos if i.backward is not None and not i.backward.converged]
            if unsolved:
                first = unsolved[0].backward
                statuses = sorted({i.backward.status for i in unsolved})
                hint = (
                    " Negative curvature means H + λI is not positive definite: raise lam, or add "
                    "damping (ig.CG(damping=...))."
                    if "negative_curvature" in statuses
                    else " A truncated CG (e.g. ig.CG(maxiter=5)) gives an approximate meta-gradient by "
                    "design; raise maxiter (or lam, which improves the conditioning) for an accurate one."
                )
                self._warn_once(
                    "backward",
                    f"IMAML: the backward solve (H + λI)u = ∇L_query did not converge in {len(unsolved)} of "
                    f"{n} solve(s) ({', '.join(statuses)}); e.g. {first}.{hint} Reported once per IMAML "
                    "object; see .last_info[i].backward.",
                )

    def _warn_once(self, kind: str, message: str) -> None:
        if kind in self._reported:
            return
        self._reported.add(kind)
        warnings.warn(message, ImplicitGradWarning, stacklevel=4)


def _round_up(x: float) -> float:
    """``x`` rounded up to one significant digit (a forward_tol that accepts it)."""
    if not math.isfinite(x) or x <= 0:
        return x
    exponent = math.floor(math.log10(x))
    return math.ceil(x / 10**exponent) * 10**exponent

