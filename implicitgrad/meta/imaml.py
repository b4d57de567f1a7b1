"""Implicit MAML: the meta-gradient of a proximal inner problem by the implicit function theorem."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union, cast

import torch
from torch import nn

from .._api import implicit_solve
from .._compat import is_wrapped
from .._defaults import forward_tol as default_forward_tol
from .._diagnostics import ConvergenceError, ImplicitGradWarning, SolveInfo, check_on_failure, user_stacklevel
from .._identity import ByIdentity
from .._validation import check_linear_solver
from .._warm import WarmStart, settings_of, warm_template
from ..linalg import CG
from ..linalg._base import LinearSolverLike
from ..solvers import LBFGS
from ._base import MetaLearner, Params, Tensor, _check_tasks

__all__ = ["IMAML"]

_LAM_PREFIX = "log_lam."
#: Default proximal strength, inner budget and backward budget (see the class docstring).
DEFAULT_LAM, DEFAULT_INNER_MAXITER, DEFAULT_CG_MAXITER = 2.0, 100, 50


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

    **Defaults and why.** The implicit meta-gradient is exact at the minimiser
    :math:`\phi^\star` only, so the inner problem is solved, not just stepped:
    ``inner_solver="auto"`` is :class:`~implicitgrad.solvers.LBFGS` (a gradient-only line
    search, per task under ``vmap``) for at most ``DEFAULT_INNER_MAXITER`` iterations,
    stopped at half of ``forward_tol``. Meta-training moves θ to where the support loss is
    sharp along a few directions — measured on few-shot digits, curvature up to about
    :math:`10^4` in the last layer against 2–7 on the biases — so the proximal problem's
    condition number reaches :math:`10^3`–:math:`10^4`. A fixed step then diverges, and
    one step size for all parameters, even with Nesterov momentum
    (:class:`~implicitgrad.solvers.AcceleratedGradient`), needed 200–300 steps to reach
    the tolerance where L-BFGS, which learns the curvature per direction, needed 50–80
    gradient evaluations. The backward system
    :math:`(H + \lambda I)u = \nabla\mathcal{L}_{\text{query}}` is positive definite at
    a solved proximal problem, so CG fits (``CG(maxiter=DEFAULT_CG_MAXITER)``);
    :class:`~implicitgrad.MINRES` handles the symmetric indefinite systems of an unsolved
    one. The support loss must be twice differentiable: with ReLU or max-pooling
    networks the proximal problem is only piecewise smooth, its gradient norm plateaus at
    a kink (measured 0.03–0.09 on few-shot digits, for every solver) and the implicit
    function theorem does not apply; use GELU, ELU, Softplus or tanh and average pooling.
    Larger λ conditions the proximal problem better (:math:`\kappa = (\lambda +
    h_{\max}) / (\lambda + h_{\min})`) at the price of a shorter adaptation; as
    :math:`\lambda \to \infty`, :math:`\lambda u \to \nabla\mathcal{L}_{\text{query}}`,
    the first-order meta-gradient. Damping the CG system by :math:`\delta` moves the
    meta-gradient the same way (:math:`\lambda u = \frac{\lambda}{\lambda + \delta}
    (I + H/(\lambda + \delta))^{-1}\nabla\mathcal{L}_{\text{query}}`).

    **Negative curvature: solve further.** A stationary point of the proximal problem is a
    minimiser when :math:`H + \lambda I` is positive definite. The forward tolerance
    accepts points near the minimiser, and some of them lie where the support loss curves
    down more steeply than :math:`\lambda`, so :math:`H + \lambda I` is indefinite there.
    Measured on the sinusoid example's quick run: 4 meta-batches of 300; in the first, one
    task of 10 had smallest eigenvalue :math:`-0.46` at a relative residual of
    :math:`5 \cdot 10^{-4}` and :math:`+1.37` at the minimiser, 0.16 further on. CG detects
    it (``"negative_curvature"``), and its best iterate is no meta-gradient. With
    ``inner_solver="auto"``, :meth:`meta_gradient` then solves the meta-batch's inner
    problems again from :math:`\theta`, the tolerance tightened by each factor of
    ``RESOLVE_TIGHTENING`` in turn (10×, then 100×, with one more
    ``DEFAULT_INNER_MAXITER`` per decade), and recomputes the meta-gradient, before anything
    is reported or all-reduced; ``inner_resolves`` counts these re-solves. On the four
    meta-batches above, 10× sufficed each time. A user's own ``inner_solver`` is not re-run;
    the warning says what to change.

    **Convergence reporting.** Every solve is measured (see :attr:`last_info`; under
    ``vmap`` per task); with ``on_failure="warn"`` each *kind* of shortfall — a task whose
    forward residual is above ``forward_tol``, a backward solve not converged, a backward
    solution worse than :math:`u = 0` (relative residual above 1, reported whatever its
    status), non-finite values — is reported once per IMAML object by an
    :class:`~implicitgrad.ImplicitGradWarning` with the numbers and the fix, not on every
    meta-step. :attr:`inner_converged_fraction` counts the tasks whose inner problem met
    ``forward_tol`` (the relative residual :math:`\|\nabla_\phi G(\phi)\| / \max(1,
    \|\nabla_\phi G(\theta)\|)`). ``check_every=N`` compares, every N meta-steps, the
    implicit meta-gradient of one task with the derivative through the inner solver's
    actual steps (:meth:`check_meta_gradient`; cosines in :attr:`gradient_checks`). A
    fixed number of inner steps, e.g. ``GradientDescent(lr, maxiter=16, tol=0)`` as in
    the paper, leaves a residual by design: pass ``forward_tol`` to acknowledge it;
    ``on_failure="raise"`` raises :class:`~implicitgrad.ConvergenceError` at the first
    shortfall; ``"ignore"`` is silent.

    Args:
        model: the ``nn.Module`` whose trainable parameters are :math:`\theta`.
        loss_fn: ``loss_fn(output, target) -> scalar``, mean-reduced.
        lam: :math:`\lambda > 0`, the strength of the proximal term (initial value when
            learned); default ``DEFAULT_LAM``. Larger: adaptation stays closer to
            :math:`\theta`, the inner problem and the linear system are better conditioned.
        inner_solver: solver of the proximal problem; it receives the objective
            ``G(φ, θ, log_lam, x_support, y_support)`` with ``φ`` a dict name → Tensor.
            ``"auto"``: see above.
        linear_solver: solver of the backward system, an instance or a plain callable
            ``linear_solver(matvec, b)`` returning ``x`` or ``(x, info)`` (as
            :func:`~implicitgrad.implicit_solve` accepts); default
            ``ig.CG(maxiter=DEFAULT_CG_MAXITER)``. The paper's 5 CG steps: ``ig.CG(maxiter=5)``.
        learn_lam: learn one :math:`\lambda` per parameter entry.
        forward_tol: relative forward residual accepted without a report (default that of
            :func:`~implicitgrad.implicit_solve`: 1e-6 in float64, 1e-3 in float32).
        on_failure: ``"warn"`` (once per kind, see above), ``"raise"`` or ``"ignore"``.
        check_every: compare the implicit meta-gradient with the unrolled derivative of
            the adaptation every this many meta-steps (needs an unrollable inner solver);
            ``None``: never.
        batched, all_reduce, process_group: see :class:`MetaLearner`.
        warm_start: start each task's backward solve from that task's previous solution
            (opt in), for a fixed pool of tasks met again over meta-training: a task is
            recognised by its support inputs (the same tensor, not modified in place), a
            vmapped meta-batch by all of them. Same meta-gradient, fewer CG products as the
            meta-parameters move slowly; tasks drawn anew each step gain nothing. The
            solutions of the last :attr:`WARM_TASKS` tasks are kept. ``True`` starts from
            the previous solution only; an :class:`~implicitgrad.WarmStart` gives the
            settings every task's own warm start copies (``ig.WarmStart(recycle=k,
            extrapolate=True)`` also keeps each task's last ``k`` CG directions, ``2k``
            vectors of the model's size per task, and starts from the line through its
            last two solutions).

    Attributes:
        log_lam: dict parameter name → log-λ tensor (same shape as the parameter), only
            with ``learn_lam``; optimise it with the model (:meth:`meta_parameters`).
        last_info: list of :class:`~implicitgrad.SolveInfo` of the latest
            :meth:`meta_step` / :meth:`meta_gradient` / :meth:`adapt` — one per
            ``implicit_solve`` (one for a vmapped meta-batch, one per task otherwise),
            with the forward residual and, after a meta-step, the backward CG outcome.
        gradient_checks: list of ``{"step", "cosine", "relative_difference"}`` from
            :meth:`check_meta_gradient`.
        inner_tasks, inner_converged: tasks solved by :meth:`meta_step` so far, and how
            many of them met ``forward_tol`` (see :attr:`inner_converged_fraction`).
        meta_steps: meta-gradients computed so far.

    Raises:
        TypeError: a wrong ``model``, ``loss_fn``, ``inner_solver`` or ``linear_solver``.
        ValueError: ``lam`` not positive, unknown ``on_failure``.

    Example:
        >>> import torch, implicitgrad as ig
        >>> from implicitgrad import meta
        >>> model = torch.nn.Linear(3, 1).double()
        >>> imaml = meta.IMAML(model, torch.nn.functional.mse_loss, lam=1.0)
        >>> tasks = [tuple(torch.randn(n, d, dtype=torch.float64) for n, d in
        ...                [(5, 3), (5, 1), (5, 3), (5, 1)]) for _ in range(4)]
        >>> optimizer = torch.optim.SGD(imaml.meta_parameters(), lr=0.1)
        >>> loss = imaml.meta_step(tasks)        # writes model.weight.grad, model.bias.grad
        >>> optimizer.step()
        >>> sorted(imaml.adapt(*tasks[0][:2]))
        ['bias', 'weight']
        >>> imaml.inner_converged_fraction
        1.0

    References:
        Rajeswaran et al., Meta-Learning with Implicit Gradients, 2019.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        lam: float = DEFAULT_LAM,
        inner_solver: Union[Callable, str] = "auto",
        linear_solver: Optional[LinearSolverLike] = None,
        *,
        learn_lam: bool = False,
        forward_tol: Optional[float] = None,
        on_failure: str = "warn",
        check_every: Optional[int] = None,
        batched: Optional[bool] = None,
        all_reduce: bool = True,
        process_group: Any = None,
        warm_start: Union[bool, WarmStart] = False,
    ) -> None:
        super().__init__(model, loss_fn, batched=batched, all_reduce=all_reduce, process_group=process_group)
        self._warm_template = warm_template(warm_start, "IMAML")
        self.warm_start = warm_start
        # One WarmStart per task (or per vmapped meta-batch) met again, keyed by the identity
        # and in-place version of its support inputs; the least recently used are dropped.
        self._warm: ByIdentity[WarmStart] = ByIdentity(self.WARM_TASKS)
        self._task_keys: List[Any] = []
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"IMAML: lam must be a positive number, got {lam!r}.")
        if not (inner_solver == "auto" if isinstance(inner_solver, str) else callable(inner_solver)):
            raise TypeError(
                "IMAML: inner_solver must be a callable solver(objective, phi0, *params), e.g. "
                f"ig.solvers.LBFGS(maxiter=100), or 'auto' for the default; got {inner_solver!r}."
            )
        linear_solver = check_linear_solver(linear_solver, "IMAML", example="ig.CG(maxiter=50)")
        linear_solver = CG(maxiter=DEFAULT_CG_MAXITER) if linear_solver is None else linear_solver
        if forward_tol is not None and not (isinstance(forward_tol, (int, float)) and forward_tol > 0):
            raise ValueError(f"IMAML: forward_tol must be a positive number, got {forward_tol!r}.")
        if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                                        or check_every < 1):
            raise ValueError(f"IMAML: check_every must be a positive integer or None, got {check_every!r}.")
        if check_every is not None and inner_solver != "auto" and not getattr(inner_solver, "unrollable", False):
            raise ValueError(
                "IMAML(check_every=...) compares the implicit meta-gradient with the derivative through the "
                f"inner solver's steps, but {type(inner_solver).__name__} cannot be unrolled. Use a built-in "
                "solver (ig.solvers.LBFGS, AcceleratedGradient, GradientDescent) or check_every=None."
            )
        self.on_failure = check_on_failure(on_failure)
        self.lam = float(lam)
        self.inner_solver = inner_solver
        self.linear_solver = linear_solver
        self.forward_tol = forward_tol
        self.check_every = check_every
        self.learn_lam = bool(learn_lam)
        self.log_lam: Dict[str, Tensor] = {}
        if self.learn_lam:
            self.log_lam = {
                name: torch.full_like(p.detach(), math.log(lam)).requires_grad_(True)
                for name, p in model.named_parameters()
                if p.requires_grad
            }
        self.last_info: List[SolveInfo] = []
        self.gradient_checks: List[Dict[str, float]] = []
        self.inner_tasks = 0
        self.inner_converged = 0
        self.meta_steps = 0
        self.inner_resolves = 0
        self._tightening = 1.0
        self._infos: List[SolveInfo] = []
        self._reported: set = set()

    def __repr__(self) -> str:
        lam = "learned" if self.learn_lam else self.lam
        return (f"IMAML(lam={lam}, inner_solver={self.inner_solver!r}, "
                f"linear_solver={self.linear_solver!r})")

    # ------------------------------------------------------------------ public
    def meta_gradient(self, tasks) -> Tuple[Params, Tensor]:
        # With the default inner solver, a backward system that meets negative curvature sends
        # the meta-batch back to its inner problems with a tighter tolerance (see the class
        # docstring); the last attempt is reported as usual.
        tightenings = (1.0, *self.RESOLVE_TIGHTENING) if isinstance(self.inner_solver, str) else (1.0,)
        for attempt, tightening in enumerate(tightenings):
            last = attempt + 1 == len(tightenings)
            try:
                out = self._meta_gradient_once(tasks, tightening)
            except ConvergenceError:
                if last or not self._met_negative_curvature():
                    raise
            else:
                if last or not self._met_negative_curvature():
                    break
            self.inner_resolves += 1
        self._count_inner()
        self._report(backward=True)
        self.meta_steps += 1
        if self.check_every is not None and (self.meta_steps - 1) % self.check_every == 0:
            self.check_meta_gradient(_check_tasks(tasks, "IMAML")[0])
        return out

    meta_gradient.__doc__ = MetaLearner.meta_gradient.__doc__

    def _meta_gradient_once(self, tasks, tightening: float) -> Tuple[Params, Tensor]:
        self._infos, self._tightening = [], tightening
        if self._warm_template is not None:
            self._task_keys = [task[0] for task in _check_tasks(tasks, "IMAML")]
        try:
            return super().meta_gradient(tasks)
        finally:
            self._task_keys, self._tightening = [], 1.0

    def _met_negative_curvature(self) -> bool:
        return any(i.backward is not None and i.backward.status == "negative_curvature" for i in self._infos)

    def adapt(self, x_support: Tensor, y_support: Tensor) -> Params:
        self._infos = []
        out = super().adapt(x_support, y_support)
        self._report(backward=False)
        return out

    adapt.__doc__ = MetaLearner.adapt.__doc__

    @property
    def inner_converged_fraction(self) -> float:
        r"""Fraction of the tasks of every :meth:`meta_step` so far whose inner problem met ``forward_tol``.

        Counted per task (per problem of a vmapped meta-batch), with the relative
        residual :math:`\|\nabla_\phi G(\phi)\| / \max(1, \|\nabla_\phi G(\theta)\|)`;
        ``nan`` before the first meta-step.
        """
        return self.inner_converged / self.inner_tasks if self.inner_tasks else float("nan")

    def check_meta_gradient(self, task) -> Dict[str, float]:
        r"""Compares the implicit meta-gradient of one task with the derivative of its actual adaptation.

        The adaptation :math:`\phi_K(\theta)` the inner solver computes is differentiated
        through its ``K`` steps (``mode="unrolled"``), giving the exact derivative of the
        query loss of the procedure that ran; the implicit meta-gradient is exact for the
        minimiser :math:`\phi^\star` only. Their cosine is near 1 when the inner problem is
        solved and the backward system well posed; a falling cosine means the meta-gradient
        no longer follows what adaptation does (too few inner steps, negative curvature,
        a truncated linear solve). Called every ``check_every`` meta-steps by
        :meth:`meta_step`; the result is appended to :attr:`gradient_checks`.

        Args:
            task: ``(x_support, y_support, x_query, y_query)``.

        Returns:
            ``{"step", "cosine", "relative_difference"}`` with the meta-step count, the
            cosine and :math:`\|g_{\text{implicit}} - g_{\text{unrolled}}\| /
            \|g_{\text{unrolled}}\|` over the model's parameters.
        """
        x_s, y_s, x_q, y_q = task
        meta = dict(self.named_meta_parameters())
        context = self._context()
        theta = self._trainable(meta)
        names = list(theta)
        grads = []
        with torch.enable_grad():
            for mode in ("implicit", "unrolled"):
                phi = self._solve(meta, context, x_s, y_s, mode=mode, record=False)
                loss = self._loss(phi, context, x_q, y_q)
                grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                    loss, [theta[n] for n in names], allow_unused=True, materialize_grads=True)]).double())
        implicit, unrolled = grads
        cosine = float(torch.dot(implicit, unrolled) / (implicit.norm() * unrolled.norm()).clamp_min(1e-300))
        difference = float((implicit - unrolled).norm() / unrolled.norm().clamp_min(1e-300))
        result = {"step": self.meta_steps, "cosine": cosine, "relative_difference": difference}
        self.gradient_checks.append(result)
        return result

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
        """``{"log_lam": {name: tensor}}`` with ``learn_lam``, and the diagnostics' counters and checks."""
        state: Dict[str, Any] = {
            "counters": {"meta_steps": self.meta_steps, "inner_tasks": self.inner_tasks,
                         "inner_converged": self.inner_converged, "inner_resolves": self.inner_resolves},
            "gradient_checks": [dict(c) for c in self.gradient_checks],
        }
        if self.learn_lam:
            state["log_lam"] = {k: v.detach().clone() for k, v in self.log_lam.items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Copies saved log-λ values in place (optimizers holding the tensors stay valid) and the counters."""
        state = dict(state)
        saved = state.get("log_lam", {})
        if set(saved) != set(self.log_lam):
            raise ValueError(
                f"IMAML.load_state_dict: the state holds log_lam for {sorted(saved)} but this IMAML has "
                f"{sorted(self.log_lam)}; build it with the same model and learn_lam."
            )
        with torch.no_grad():
            for k, v in saved.items():
                self.log_lam[k].copy_(v)
        counters = state.get("counters", {})
        self.meta_steps = int(counters.get("meta_steps", self.meta_steps))
        self.inner_tasks = int(counters.get("inner_tasks", self.inner_tasks))
        self.inner_converged = int(counters.get("inner_converged", self.inner_converged))
        self.inner_resolves = int(counters.get("inner_resolves", self.inner_resolves))
        self.gradient_checks = [dict(c) for c in state.get("gradient_checks", self.gradient_checks)]

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

    def _inner_solver(self, dtype: torch.dtype) -> Callable:
        if callable(self.inner_solver):  # else "auto"
            return self.inner_solver
        # Half the forward tolerance: the core's check then passes with a margin. A re-solve
        # (tightening < 1) also gets more iterations: one more DEFAULT_INNER_MAXITER per decade.
        extra = round(math.log10(1.0 / self._tightening))
        return LBFGS(maxiter=DEFAULT_INNER_MAXITER * (1 + extra), tol=0.5 * self._tightening * self._forward_tol(dtype))

    def _forward_tol(self, dtype: torch.dtype) -> float:
        return self.forward_tol if self.forward_tol is not None else default_forward_tol(dtype)

    def _solve(self, meta: Params, context: Params, x_s: Tensor, y_s: Tensor, mode: str = "implicit",
               record: bool = True) -> Params:
        theta = self._trainable(meta)
        phi0 = {k: v.detach() for k, v in theta.items()}
        # Reports go through _report (once per kind); only "raise" is delegated to the core.
        core_on_failure = "raise" if self.on_failure == "raise" else "ignore"
        dtype = next(iter(phi0.values())).dtype
        phi, info = implicit_solve(
            self._objective(context), phi0, theta, self._log_lam(meta), x_s, y_s,
            solver=self._inner_solver(dtype), linear_solver=self.linear_solver, on_failure=core_on_failure,
            forward_tol=self._forward_tol(dtype), return_info=True, mode=mode,
            warm_start=self._warm_for(x_s) if record and mode == "implicit" else None,
        )
        if record:
            self._infos.append(info)
        return phi

    #: The inner tolerances, as fractions of the first one, of the re-solves of a meta-batch
    #: whose backward system met negative curvature (``inner_solver="auto"`` only).
    RESOLVE_TIGHTENING = (0.1, 0.01)

    #: Tasks (or vmapped meta-batches) whose backward solutions ``warm_start`` keeps.
    WARM_TASKS = 1024

    def _warm_for(self, x_s: Tensor) -> Optional[WarmStart]:
        """The WarmStart of the task being solved during a meta-gradient with ``warm_start``:
        the next task of the meta-batch, or the whole batch under vmap."""
        if not self._task_keys:
            return None
        if is_wrapped(x_s):  # the vmapped meta-batch: one solve for all its tasks
            inputs, self._task_keys = list(self._task_keys), []
        else:
            inputs, self._task_keys = [self._task_keys[0]], self._task_keys[1:]
        warm = self._warm.get(inputs)
        if warm is None:
            warm = settings_of(cast(WarmStart, self._warm_template))
            self._warm.put(inputs, warm)
        return warm

    def _adapt(self, meta, context, x_s, y_s) -> Params:
        return self._solve(meta, context, x_s, y_s)

    def _task_terms(self, meta, context, x_s, y_s, x_q, y_q):
        phi = self._solve(meta, context, x_s, y_s)
        loss = self._loss(phi, context, x_q, y_q)
        return loss, loss

    def _count_inner(self) -> None:
        """Counts the tasks of this meta-step whose inner problem met the forward tolerance."""
        tol = self._forward_tol(_dtype_of(self.model))
        for info in self._infos:
            relative = _relative_residuals(info)
            self.inner_tasks += len(relative)
            self.inner_converged += sum(r <= tol for r in relative)

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
            worst = max(max(_relative_residuals(i)) for i in stalled)
            tol = "the default forward_tol" if self.forward_tol is None else f"forward_tol={self.forward_tol:g}"
            said = next((i.forward_message for i in stalled if i.forward_message), "")
            said = f" The inner solver said: {said}." if said else ""
            self._warn_once(
                "forward",
                f"IMAML: the proximal inner problem is not solved to {tol}: relative residual "
                f"‖∇φ G‖ / max(1, ‖∇φ G(θ)‖) up to {worst:.2e}.{said} The meta-gradient "
                "(I + H/λ)⁻¹∇L_query is exact at the minimiser only; its error grows linearly with this "
                "residual. Give the inner solver more steps (e.g. ig.solvers.LBFGS(maxiter=200)), "
                "or raise lam, which makes the proximal problem better conditioned. A fixed number of inner "
                f"steps leaves such a residual by design: pass IMAML(..., forward_tol={_round_up(worst):g}) to "
                "accept it, and IMAML(..., check_every=N) to watch what it does to the meta-gradient. Reported "
                "once per IMAML object; .inner_converged_fraction counts the tasks, .last_info has the numbers.",
            )
        if backward:
            solved = [i.backward for i in infos if i.backward is not None]
            worse = [b for b in solved if b.residual > 1]
            if worse:
                self._warn_once(
                    "backward_worse_than_zero",
                    f"IMAML: the backward solve (H + λI)u = ∇L_query returned a u worse than u = 0 in "
                    f"{len(worse)} of {n} solve(s) (relative residual {max(b.residual for b in worse):.2e} > 1; "
                    f"e.g. {worse[0]}). The meta-gradient of these tasks is meaningless. H + λI is likely "
                    "indefinite (an unsolved inner problem): solve the inner problem further, raise lam, or use "
                    "ig.MINRES, which handles symmetric indefinite systems.",
                )
            unsolved = [b for b in solved if not b.converged and b.residual <= 1]
            if unsolved:
                statuses = sorted({b.status for b in unsolved})
                resolved = (
                    " even after re-solving the inner problems with tolerances "
                    + " and ".join(f"{1 / t:g}×" for t in self.RESOLVE_TIGHTENING) + " tighter"
                    if isinstance(self.inner_solver, str) else ""
                )
                hint = (
                    f" Negative curvature means H + λI is not positive definite{resolved}: solve the inner "
                    "problem further, raise lam, or use ig.MINRES (symmetric indefinite systems)."
                    if "negative_curvature" in statuses
                    else " A truncated CG (e.g. ig.CG(maxiter=5)) gives an approximate meta-gradient by "
                    "design; raise maxiter (or lam, which improves the conditioning) for an accurate one."
                )
                self._warn_once(
                    "backward",
                    f"IMAML: the backward solve (H + λI)u = ∇L_query did not converge in {len(unsolved)} of "
                    f"{n} solve(s) ({', '.join(statuses)}); e.g. {unsolved[0]}.{hint} Reported once per IMAML "
                    "object; see .last_info[i].backward.",
                )

    def _warn_once(self, kind: str, message: str) -> None:
        if kind in self._reported:
            return
        self._reported.add(kind)
        warnings.warn(message, ImplicitGradWarning, stacklevel=user_stacklevel())


def _relative_residuals(info: SolveInfo) -> List[float]:
    """``‖∇φ G(φ)‖ / max(1, ‖∇φ G(θ)‖)`` per task of one solve (one value for an unbatched solve)."""
    residuals = info.forward_residuals or [info.forward_residual]
    initials = info.initial_residuals or [info.initial_residual]
    return [r / max(1.0, r0) for r, r0 in zip(residuals, initials)]


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _round_up(x: float) -> float:
    """``x`` rounded up to one significant digit (a forward_tol that accepts it)."""
    if not math.isfinite(x) or x <= 0:
        return x
    exponent = math.floor(math.log10(x))
    return math.ceil(x / 10**exponent) * 10**exponent

