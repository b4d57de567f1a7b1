"""Warnings, errors and the records that every solve returns.

Every solve in implicitgrad ends with a status. A status other than ``"converged"`` is
turned into an :class:`ImplicitGradWarning` (``on_failure="warn"``), a
:class:`ConvergenceError` (``on_failure="raise"``) or nothing (``on_failure="ignore"``),
always with the measured numbers and the change that would fix it.

``on_failure="defer"`` reads nothing during the call: each check keeps its numbers on the
device, in the call's :class:`SolveInfo`, and :meth:`SolveInfo.verify` reads them all at
once and reports them as ``"warn"`` or ``"raise"`` would have.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ._status import Status, status_message
from ._validation import ON_FAILURE as ON_FAILURE  # imported from here too
from ._validation import check_on_failure as check_on_failure

__all__ = [
    "ConvergenceError",
    "ImplicitGradWarning",
    "LinearSolveInfo",
    "SolveInfo",
]



class ImplicitGradWarning(UserWarning):
    """A result was computed, but something about it deserves attention.

    Issued for unconverged or diverging linear solves, negative curvature in CG, large
    forward residuals, non-finite values, and tensors that would silently receive no
    gradient. The message names the measured numbers and the fix.
    """


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ImplicitGradWarning` when ``on_failure="raise"``."""


@dataclasses.dataclass
class LinearSolveInfo:
    """Outcome of one linear solve ``A u = b``.

    Attributes:
        iterations: matrix-vector products spent (for ``Exact``: the matrix size).
        residual: relative residual ``‖A u − b‖ / ‖b‖`` (the largest over a batch of
            independent systems).
        converged: whether ``residual <= tol`` was reached with finite values.
        status: a :class:`~implicitgrad.linalg.Status` (a ``str``, so
            ``info.status == "converged"`` works); a string given here is converted.
        message: what happened and what to change, empty when converged.
        solver: name of the linear solver.

    A solver of one's own builds its info with :meth:`from_residual`.
    """

    iterations: int
    residual: float
    converged: bool
    status: Status
    message: str = ""
    solver: str = ""
    # A solve whose outcome is still on the device (see :meth:`deferred`): its relative
    # residuals, one flag per status that can end it, those statuses and the tolerance.
    _deferred: Optional[Tuple[torch.Tensor, Tuple[Status, ...], float]] = dataclasses.field(
        default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.status, Status):
            try:
                self.status = Status(self.status)
            except ValueError:
                raise ValueError(
                    f"LinearSolveInfo: unknown status {self.status!r}; use one of "
                    f"{[s.value for s in Status]} (ig.linalg.Status)."
                ) from None

    @classmethod
    def from_residual(
        cls,
        residual: Union[float, torch.Tensor],
        tol: float,
        *,
        iterations: int = 0,
        status: Optional[Union[Status, str]] = None,
        solver: str = "",
    ) -> LinearSolveInfo:
        """The info of a solve that ended at relative residual ``‖Ax − b‖ / ‖b‖``.

        Args:
            residual: the relative residual; a tensor of one per system is reduced to its
                largest value.
            tol: the tolerance it was held to.
            iterations: matrix-vector products spent.
            status: how the solve ended; ``None`` derives it from the residual:
                ``nonfinite`` if it is NaN/Inf, ``converged`` if ``residual <= tol``,
                else ``max_iterations``.
            solver: the solver's name, used in the message.

        Example:
            >>> import implicitgrad as ig
            >>> info = ig.LinearSolveInfo.from_residual(1e-3, 1e-8, iterations=5, solver="mine")
            >>> info.status == "max_iterations", info.converged
            (True, False)
        """
        if isinstance(residual, torch.Tensor):
            residual = float(residual.max()) if residual.numel() else 0.0
        res = float(residual)
        if status is None:
            if not math.isfinite(res):
                status = Status.NONFINITE
            elif res <= tol:
                status = Status.CONVERGED
            else:
                status = Status.MAX_ITERATIONS
        status = Status(status)
        converged = status is Status.CONVERGED
        return cls(
            iterations=iterations,
            residual=res,
            converged=converged,
            status=status,
            message="" if converged else status_message(status, solver, res, tol),
            solver=solver,
        )

    @classmethod
    def deferred(
        cls,
        residual: torch.Tensor,
        tol: float,
        *,
        flags: Sequence[Tuple[Status, torch.Tensor]] = (),
        iterations: int = 0,
        solver: str = "",
    ) -> LinearSolveInfo:
        """The info of a solve whose outcome is not read yet (``on_failure="defer"``).

        Its status is ``"deferred"`` and its residual NaN until :meth:`SolveInfo.verify`
        reads the values and settles them as :meth:`from_residual` would: the first of
        ``flags`` (in order of priority) that holds in any system names the status; when
        none does, the largest relative residual decides.

        Args:
            residual: the relative residual per system (a tensor on the device).
            tol: the tolerance it is held to.
            flags: ``(status, per-system flags)`` pairs, tensors on the device.
            iterations: matrix-vector products spent (known on the host).
            solver: the solver's name.
        """
        worst = residual.max() if residual.numel() else residual.new_zeros(())
        values = torch.stack([worst, *(f.any().to(worst.dtype) for _, f in flags)])
        info = cls(iterations, float("nan"), False, Status.DEFERRED,
                   status_message(Status.DEFERRED, solver, float("nan"), tol), solver)
        info._deferred = (values, tuple(status for status, _ in flags), tol)
        return info

    def deferred_values(self) -> torch.Tensor:
        """The values a :meth:`deferred` info waits for (the largest relative residual, then
        one flag per status), on the device: what :meth:`settle` takes once read."""
        if self._deferred is None:
            raise ValueError("deferred_values: this LinearSolveInfo was not deferred.")
        return self._deferred[0]

    def settle(self, values: Sequence[float]) -> None:
        """Fill the fields of a :meth:`deferred` info from its values, read by the host."""
        if self._deferred is None:
            raise ValueError("settle: this LinearSolveInfo was not deferred.")
        _, statuses, tol = self._deferred
        status = next((s for s, flag in zip(statuses, values[1:]) if flag), None)
        read = LinearSolveInfo.from_residual(values[0], tol, iterations=self.iterations, status=status,
                                             solver=self.solver)
        self.residual, self.converged, self.status, self.message = (read.residual, read.converged,
                                                                    read.status, read.message)

    def __str__(self) -> str:
        head = (
            f"{self.solver or 'linear solve'}: {self.status} after {self.iterations} "
            f"iterations, relative residual {self.residual:.3e}"
        )
        return head if not self.message else f"{head}. {self.message}"


@dataclasses.dataclass
class SolveInfo:
    """Diagnostics of one ``implicit_solve`` / ``root_solve`` / ``fixed_point_solve``.

    Attributes:
        forward_residual: norm of the optimality condition at the returned ``x``
            (``‖∇ₓf‖``, ``‖F‖`` or ``‖x − T(x)‖``). The hypergradient error is linear in
            it (Blondel et al., Efficient and Modular Implicit Differentiation, 2022).
        forward_iterations: iterations the inner solver reports, ``None`` if it does not.
        forward_status: ``"converged"``, ``"not_converged"``, ``"nonfinite"`` or
            ``"unrolled"``; ``"deferred"`` for an ``on_failure="defer"`` call until
            :meth:`verify` reads its checks (``forward_residual`` is NaN until then, and
            the linear solves' infos have status ``"deferred"``).
        forward_message: why the inner solver stopped, where it says (e.g. SciPy's message).
        forward_residuals: for a batch of problems (under ``torch.func.vmap``), the norm
            of the condition at ``x`` per problem, flattened; ``None`` for one problem.
            ``forward_residual`` is the norm over the whole batch. The forward check holds
            each problem to ``forward_tol · max(1, initial_residuals[i])``.
        backward: :class:`LinearSolveInfo` of the most recent backward (or forward-mode)
            linear solve, ``None`` until one ran.
        history: every linear solve of this node, in order (second-order derivatives
            run several).

    :attr:`initial_residual` and :attr:`initial_residuals`, the same norms at ``x0``, are
    measured on first access when the forward check did not need them (a residual at ``x``
    below ``forward_tol`` passes whatever the scale): one evaluation of the condition.
    """

    forward_residual: float = float("nan")
    forward_iterations: Optional[int] = None
    forward_status: str = "unknown"
    forward_message: str = ""
    forward_residuals: Optional[List[float]] = None
    backward: Optional[LinearSolveInfo] = None
    history: List[LinearSolveInfo] = dataclasses.field(default_factory=list)
    # The norms of the condition at x0, per problem: a list, or a function computing it on
    # first access (the forward check needs them only when the residual at x is large).
    _initial: Union[None, List[float], Callable[[], List[float]]] = dataclasses.field(
        default=None, repr=False, compare=False)
    _batched: bool = dataclasses.field(default=False, repr=False, compare=False)
    # The checks of an on_failure="defer" call: values on the device, and what turns them,
    # once read, into this info's fields and a message (None: nothing to report), and whether
    # the eager call only warns about it whatever its on_failure.
    _checks: List[Tuple[torch.Tensor, Callable[[List[float]], Optional[str]], bool]] = dataclasses.field(
        default_factory=list, repr=False, compare=False)

    def defer(self, values: torch.Tensor, settle: Callable[[List[float]], Optional[str]],
              warn_only: bool = False) -> None:
        """Keep a check of an ``on_failure="defer"`` call for :meth:`verify` (``warn_only``:
        a check the eager call warns about even with ``on_failure="raise"``)."""
        self._checks.append((values, settle, warn_only))

    def verify(self, on_failure: str = "warn") -> SolveInfo:
        """Read the checks an ``on_failure="defer"`` call kept on the device, fill this
        info's fields with them, and report what failed.

        One host read for all of them: the forward residual against ``forward_tol``, NaN/Inf
        in the parameters and the solution, and, once the backward pass ran, NaN/Inf in the
        incoming gradient and each linear solve's residual and status. The reports are
        those of an eager call with this ``on_failure`` (``"warn"``, ``"raise"`` or
        ``"ignore"``), except that a parameter with NaN/Inf raises ``ValueError`` as the
        eager call does. A call captured in a CUDA graph keeps writing the same tensors at
        each replay: ``verify`` then reads the latest replay's values each time it is called.
        A call that did not defer has nothing to read: its info is returned unchanged.

        Returns:
            this info, for chaining.
        """
        on_failure = check_on_failure(on_failure, "SolveInfo.verify")
        if not self._checks:
            return self
        flat = torch.cat([v.detach().reshape(-1).to(torch.float64) for v, _, _ in self._checks]).tolist()
        messages, start = [], 0
        for values, settle, warn_only in self._checks:
            message = settle(flat[start : start + values.numel()])
            start += values.numel()
            if message:
                messages.append((message, "warn" if warn_only and on_failure == "raise" else on_failure))
        for message, level in messages:
            report(message, level)
        return self

    def _initial_values(self) -> Optional[List[float]]:
        if callable(self._initial):
            self._initial = self._initial()
        return self._initial

    @property
    def initial_residual(self) -> float:
        """The norm of the condition at ``x0`` (over the whole batch), the scale the forward
        tolerance is relative to; NaN when unknown."""
        values = self._initial_values()
        return float("nan") if values is None else math.sqrt(sum(v * v for v in values))

    @property
    def initial_residuals(self) -> Optional[List[float]]:
        """The norm at ``x0`` per problem of a batch; ``None`` for one problem."""
        return self._initial_values() if self._batched else None

    def record(self, info: LinearSolveInfo) -> None:
        self.backward = info
        self.history.append(info)

    def __str__(self) -> str:
        it = "?" if self.forward_iterations is None else str(self.forward_iterations)
        lines = [
            f"forward: {self.forward_status}, residual {self.forward_residual:.3e} "
            f"(initial {self.initial_residual:.3e}), {it} iterations"
        ]
        lines.append(f"backward: {self.backward}" if self.backward else "backward: not run")
        return "\n".join(lines)


# Frames in these folders are the library's own (this package) or torch's.
_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the user's line.

    For ``warnings.warn(..., stacklevel=user_stacklevel())``: counts the frames from the
    function that calls ``warnings.warn`` up to the first one whose file lies outside the
    implicitgrad package and outside torch. Under ``torch.func.vmap`` / ``grad`` and in a
    backward pass, torch's frames sit between the user's call and implicitgrad's; they are
    skipped alike. When every frame is internal (e.g. a backward pass on an autograd worker
    thread), the outermost frame is named.
    """
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    return level


def report(message: str, on_failure: str) -> None:
    """Warn, raise or stay silent about ``message`` according to ``on_failure``.

    The warning is attributed to the user's line (see :func:`user_stacklevel`).
    """
    if on_failure == "raise":
        raise ConvergenceError(message)
    # A deferred call defers the checks of values; what it reports during the call (a
    # structural problem, found without reading a value) is a warning.
    if on_failure in ("warn", "defer"):
        warnings.warn(message, ImplicitGradWarning, stacklevel=user_stacklevel())
