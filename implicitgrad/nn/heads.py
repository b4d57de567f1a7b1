"""Few-shot heads: a linear model fitted to a support set inside the forward pass."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import LinearSolver
from ..solvers import TorchOptimizer
from .layer import ImplicitLayer

_FORMS = ("auto", "primal", "dual")


def _check_lam(owner: str, lam: float) -> None:
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"{owner}: lam must be a positive finite number, got {lam!r}.")


def _check_scale(owner: str, scale: float) -> None:
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)):
        raise ValueError(f"{owner}: scale must be a finite number, got {scale!r}.")


def _check_features(owner: str, z_support: Any, z_query: Any) -> None:
    for name, z in (("z_support", z_support), ("z_query", z_query)):
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{owner}: {name} must be a floating (n, d) feature matrix, got {got}.")
    if z_support.shape[1] != z_query.shape[1]:
        raise ValueError(
            f"{owner}: support and query features differ in dimension: z_support "
            f"{tuple(z_support.shape)}, z_query {tuple(z_query.shape)}."
        )


def _check_labels(owner: str, y: Any, n: int, num_classes: Optional[int]) -> int:
    """Validate integer class labels of shape (n,); returns the number of classes."""
    if not isinstance(y, torch.Tensor) or y.shape != (n,) or y.is_floating_point() or y.is_complex():
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{owner}: y_support must hold {n} integer class labels, got {got}.")
    if num_classes is None:
        num_classes = int(y.max()) + 1 if n else 1
    elif n and int(y.max()) >= num_classes:
        raise ValueError(f"{owner}: label {int(y.max())} out of range for num_classes={num_classes}.")
    if n and int(y.min()) < 0:
        raise ValueError(f"{owner}: class labels must be non-negative, got {int(y.min())}.")
    return num_classes


def _hyperparameter(module: nn.Module, name: str, value: float, learn: bool) -> None:
    tensor = torch.tensor(float(value))
    if learn:
        module.register_parameter(name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)


class RidgeHead(ImplicitLayer):
    r"""Ridge regression fitted to the support set, applied to the query set (R2-D2).

    With support features :math:`Z \in \mathbb{R}^{n \times d}`, targets
    :math:`Y \in \mathbb{R}^{n \times k}` (one-hot for class labels) and
    :math:`\lambda = e^{\log\lambda}`, the head solves

    .. math::

        W^\star = \arg\min_W \tfrac12 \|Z W - Y\|_F^2 + \tfrac{\lambda}{2} \|W\|_F^2
                = (Z^\top Z + \lambda I_d)^{-1} Z^\top Y
                = Z^\top (Z Z^\top + \lambda I_n)^{-1} Y

    and returns :math:`\hat Y = \alpha\, Z_q W^\star` for query features :math:`Z_q`
    (logits for classification, values for regression). The last equality (Woodbury)
    gives the *dual* form: the inner variable is :math:`A \in \mathbb{R}^{n \times k}`,

    .. math::

        A^\star = \arg\min_A \tfrac12 \langle A, (Z Z^\top + \lambda I_n) A\rangle - \langle A, Y\rangle,
        \qquad W^\star = Z^\top A^\star ,

    whose linear systems are :math:`n \times n` — the cheap choice in few-shot learning,
    where :math:`n \ll d`. ``form="auto"`` uses the dual when :math:`n < d`. The forward
    pass is the closed form (a Cholesky solve); the backward pass differentiates the
    stationarity condition implicitly (Hessian :math:`Z Z^\top + \lambda I` or
    :math:`Z^\top Z + \lambda I`, symmetric positive definite: CG converges in at most
    :math:`\min(n, d) + 1` iterations in exact arithmetic), so gradients reach
    :math:`\log\lambda`, the scale :math:`\alpha` and, through :math:`Z` and
    :math:`Z_q`, the feature extractor.

    Call as ``head(z_support, y_support, z_query)`` or ``head((z_support, y_support,
    z_query))`` (e.g. after :class:`EncodeEpisode` in ``nn.Sequential``). ``y_support``
    is either integer class labels of shape ``(n,)`` (output: ``(m, num_classes)``
    logits) or float targets of shape ``(n,)`` / ``(n, k)`` (output: ``(m,)`` /
    ``(m, k)``).

    Args:
        lam: initial :math:`\lambda > 0`.
        learn_lam: make :math:`\log\lambda` an ``nn.Parameter`` (else a buffer).
        scale: initial output scale :math:`\alpha`.
        learn_scale: make :math:`\alpha` an ``nn.Parameter`` (R2-D2 learns it to calibrate
            the logits for the cross-entropy).
        form: ``"auto"``, ``"primal"`` or ``"dual"``.
        num_classes: number of classes for integer labels; ``None``: ``max label + 1``.
        solver: ``None`` for the closed form, or any inner solver (e.g. to compare).
        linear_solver, on_failure, forward_tol: see :class:`ImplicitLayer`.

    Raises:
        ValueError: non-positive ``lam``, unknown ``form``, bad ``num_classes``; at call
            time, inputs of wrong shapes or labels out of range.

    Example:
        >>> import torch, implicitgrad as ig
        >>> head = ig.nn.RidgeHead(lam=0.1).double()
        >>> z_s, z_q = torch.randn(10, 32, dtype=torch.float64), torch.randn(6, 32, dtype=torch.float64)
        >>> logits = head(z_s, torch.arange(10) % 5, z_q)
        >>> logits.shape
        torch.Size([6, 5])
        >>> torch.nn.functional.cross_entropy(logits, torch.arange(6) % 5).backward()
        >>> head.log_lam.grad.shape
        torch.Size([])

    References:
        Bertinetto et al., Meta-learning with differentiable closed-form solvers, 2019.
    """

    def __init__(
        self,
        lam: float = 1.0,
        learn_lam: bool = True,
        scale: float = 1.0,
        learn_scale: bool = False,
        form: str = "auto",
        num_classes: Optional[int] = None,
        solver: Optional[Callable] = None,
        linear_solver: Optional[LinearSolver] = None,
        on_failure: str = "warn",
        forward_tol: Optional[float] = None,
    ) -> None:
        super().__init__(solver, linear_solver, on_failure, forward_tol)
        _check_lam("RidgeHead", lam)
        _check_scale("RidgeHead", scale)
        if form not in _FORMS:
            raise ValueError(f"RidgeHead: form must be one of {_FORMS}, got {form!r}.")
        if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"RidgeHead: num_classes must be a positive integer or None, got {num_classes!r}.")
        self.form, self.num_classes = form, num_classes
        _hyperparameter(self, "log_lam", math.log(lam), learn_lam)
        _hyperparameter(self, "scale", scale, learn_scale)

    def extra_repr(self) -> str:
        return f"form={self.form!r}, num_classes={self.num_classes}, {super().extra_repr()}"

    def _value(self, params: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return params[name] if name in params else getattr(self, name)

    def _dual(self, z: torch.Tensor) -> bool:
        return self.form == "dual" or (self.form == "auto" and z.shape[0] < z.shape[1])

    def prepare(self, z_support: torch.Tensor, y_support: torch.Tensor, z_query: torch.Tensor) -> Tuple[Any, ...]:
        """Inputs ``(Z, Y, Z_q, squeeze)``: ``Y`` is ``(n, k)`` float targets."""
        _check_features("RidgeHead", z_support, z_query)
        n = z_support.shape[0]
        if isinstance(y_support, torch.Tensor) and y_support.is_floating_point():
            if y_support.dim() not in (1, 2) or y_support.shape[0] != n:
                raise ValueError(
                    f"RidgeHead: float targets must have shape ({n},) or ({n}, k), got {tuple(y_support.shape)}."
                )
            squeeze = y_support.dim() == 1
            targets = y_support.unsqueeze(1) if squeeze else y_support
            return z_support, targets, z_query, squeeze
        k = _check_labels("RidgeHead", y_support, n, self.num_classes)
        return z_support, F.one_hot(y_support.long(), k).to(z_support.dtype), z_query, False

    def init(self, inputs: Tuple[Any, ...]) -> torch.Tensor:
        z, y = inputs[0], inputs[1]
        rows = z.shape[0] if self._dual(z) else z.shape[1]
        return torch.zeros(rows, y.shape[1], dtype=z.dtype, device=z.device)

    def objective(self, x: torch.Tensor, inputs: Tuple[Any, ...], params: Dict[str, torch.Tensor]) -> torch.Tensor:
        z, y = inputs[0], inputs[1]
        lam = self._value(params, "log_lam").exp()
        if self._dual(z):
            return 0.5 * ((z.T @ x) ** 2).sum() + 0.5 * lam * (x**2).sum() - (x * y).sum()
        return 0.5 * ((z @ x - y) ** 2).sum() + 0.5 * lam * (x**2).sum()

    def closed_form(self, x0: torch.Tensor, inputs: Tuple[Any, ...], params: Dict[str, torch.Tensor]) -> torch.Tensor:
        z, y = inputs[0], inputs[1]
        lam = self._value(params, "log_lam").exp()
        if self._dual(z):
            gram, rhs = z @ z.T, y
        else:
            gram, rhs = z.T @ z, z.T @ y
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram + lam * eye))

    def output(self, x: torch.Tensor, inputs: Tuple[Any, ...], params: Dict[str, torch.Tensor]) -> torch.Tensor:
        z, _, z_query, squeeze = inputs
        weight = z.T @ x if self._dual(z) else x
        out = self._value(params, "scale") * (z_query @ weight)
        return out.squeeze(1) if squeeze else out


class LogisticHead(ImplicitLayer):
    r"""Multinomial logistic regression fitted to the support set, applied to the query set.

    With support features :math:`Z \in \mathbb{R}^{n \times d}`, labels
    :math:`y_i \in \{0, \dots, k-1\}` and :math:`\lambda = e^{\log\lambda}`, the head
    solves the strictly convex problem (no closed form)

    .. math::

        (W^\star, b^\star) = \arg\min_{W, b}\ \frac1n \sum_{i=1}^n
            \operatorname{CE}(z_i^\top W + b,\ y_i) + \frac{\lambda}{2}\big(\|W\|_F^2 + \|b\|^2\big)

    iteratively (default: L-BFGS through :class:`~implicitgrad.solvers.TorchOptimizer`)
    and returns the logits :math:`\alpha (Z_q W^\star + b^\star)`. The bias is
    regularised too: the softmax is invariant to adding a constant to every class's bias,
    which would otherwise make the Hessian singular. The inner variable is the pytree
    ``{"weight": (d, k), "bias": (k,)}``; the backward pass solves
    :math:`\nabla^2 f\, u = v` with CG on Hessian-vector products, so gradients reach
    :math:`\log\lambda`, :math:`\alpha` and, through the features, the feature extractor.

    Call as ``head(z_support, y_support, z_query)`` or with one tuple; ``y_support`` holds
    integer labels of shape ``(n,)``; the output is ``(m, num_classes)`` logits.

    Args:
        num_classes: number of classes; ``None``: ``max label + 1`` of each call.
        lam: initial :math:`\lambda > 0`.
        learn_lam: make :math:`\log\lambda` an ``nn.Parameter`` (else a buffer).
        scale: initial logit scale :math:`\alpha`.
        learn_scale: make :math:`\alpha` an ``nn.Parameter``.
        solver: inner solver; ``None``: ``TorchOptimizer(torch.optim.LBFGS)``.
        linear_solver, on_failure, forward_tol: see :class:`ImplicitLayer`.

    Raises:
        ValueError: non-positive ``lam``, bad ``num_classes``; at call time, inputs of wrong
            shapes or labels out of range.

    Example:
        >>> import torch, implicitgrad as ig
        >>> head = ig.nn.LogisticHead(num_classes=3).double()
        >>> z_s, z_q = torch.randn(9, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
        >>> logits = head(z_s, torch.arange(9) % 3, z_q)
        >>> torch.nn.functional.cross_entropy(logits, torch.arange(5) % 3).backward()
        >>> logits.shape, head.last_info.forward_status
        (torch.Size([5, 3]), 'converged')

    References:
        Lee et al., Meta-Learning with Differentiable Convex Optimization, 2019 (convex
        heads on learned features); Bertinetto et al., Meta-learning with differentiable
        closed-form solvers, 2019.
    """

    def __init__(
        self,
        num_classes: Optional[int] = None,
        lam: float = 1.0,
        learn_lam: bool = True,
        scale: float = 1.0,
        learn_scale: bool = False,
        solver: Optional[Callable] = None,
        linear_solver: Optional[LinearSolver] = None,
        on_failure: str = "warn",
        forward_tol: Optional[float] = None,
    ) -> None:
        super().__init__(solver if solver is not None else TorchOptimizer(torch.optim.LBFGS),
                         linear_solver, on_failure, forward_tol)
        _check_lam("LogisticHead", lam)
        _check_scale("LogisticHead", scale)
        if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"LogisticHead: num_classes must be an integer >= 2 or None, got {num_classes!r}.")
        self.num_classes = num_classes
        _hyperparameter(self, "log_lam", math.log(lam), learn_lam)
        _hyperparameter(self, "scale", scale, learn_scale)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, {super().extra_repr()}"

    def _value(self, params: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return params[name] if name in params else getattr(self, name)

    def prepare(self, z_support: torch.Tensor, y_support: torch.Tensor, z_query: torch.Tensor) -> Tuple[Any, ...]:
        """Inputs ``(Z, y, Z_q, k)`` with ``k`` the number of classes."""
        _check_features("LogisticHead", z_support, z_query)
        k = _check_labels("LogisticHead", y_support, z_support.shape[0], self.num_classes)
        return z_support, y_support.long(), z_query, k

    def init(self, inputs: Tuple[Any, ...]) -> Dict[str, torch.Tensor]:
        z, k = inputs[0], inputs[3]
        return {
            "weight": torch.zeros(z.shape[1], k, dtype=z.dtype, device=z.device),
            "bias": torch.zeros(k, dtype=z.dtype, device=z.device),
        }

    def objective(self, x: Dict[str, torch.Tensor], inputs: Tuple[Any, ...],
                  params: Dict[str, torch.Tensor]) -> torch.Tensor:
        z, y = inputs[0], inputs[1]
        logits = z @ x["weight"] + x["bias"]
        lam = self._value(params, "log_lam").exp()
        penalty = (x["weight"] ** 2).sum() + (x["bias"] ** 2).sum()
        return F.cross_entropy(logits, y) + 0.5 * lam * penalty

    def output(self, x: Dict[str, torch.Tensor], inputs: Tuple[Any, ...],
               params: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self._value(params, "scale") * (inputs[2] @ x["weight"] + x["bias"])
