"""Checks of numeric settings, shared by every solver, the core, the layers and meta-learners.

Each check raises :class:`SettingError` — both a ``ValueError`` and a ``TypeError``, so
either ``except`` catches it — for a value of the wrong kind (a string, a bool, a float
where a count is meant) or out of range, naming the owner, the argument, the value and
what is accepted. Accepted values:

=================  =========================================================
setting            accepted
=================  =========================================================
counts             ``int`` ≥ 1 (``maxiter``, ``restart``, ``check_every``, ...);
                   not ``bool``, ``str`` nor ``float`` (``2.5`` or ``10.0``)
linear ``tol``     a finite number in ``(0, 1)``: the relative residual
                   ``‖Ax − b‖ / ‖b‖`` to reach; ``x = 0`` already has 1
inner ``tol``      a finite number in ``[0, 1)``, relative to
                   ``max(1, ‖condition at x0‖)``; 0 runs ``maxiter`` steps
step sizes         finite and > 0 (``lr``, ``alpha``)
``damping``        finite and ≥ 0 (a shift of the linear system)
``forward_tol``    ``None`` (the dtype's default) or finite and > 0
``on_failure``     ``"warn"``, ``"raise"`` or ``"ignore"``; the core's calls
                   also ``"defer"`` (with ``return_info=True``)
``linear_solver``  ``None`` (the default), a linear solver instance
                   (``ig.CG()``), or a plain callable
                   ``linear_solver(matvec, b) -> x`` or ``-> (x, info)``
=================  =========================================================

Defaults live in :mod:`implicitgrad._defaults`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

__all__ = [
    "ON_FAILURE",
    "SettingError",
    "check_count",
    "check_forward_tol",
    "check_fraction",
    "check_linear_solver",
    "check_nonnegative",
    "check_on_failure",
    "check_positive_number",
    "check_tol",
]

#: What a failed solve does: warn, raise ``ConvergenceError``, or stay silent.
ON_FAILURE = ("warn", "raise", "ignore")


class SettingError(ValueError, TypeError):
    """A solver or layer setting of the wrong kind or out of range."""


def _prefix(owner: Optional[str]) -> str:
    return f"{owner}: " if owner else ""


def _real(name: str, value: Any, owner: Optional[str]) -> float:
    """``value`` as a float if it is a real Python or numpy number (not a bool), else ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingError(
            f"{_prefix(owner)}{name} must be a real number, got {value!r} of type "
            f"{type(value).__name__}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise SettingError(f"{_prefix(owner)}{name} must be finite, got {value!r}.")
    return value


def check_count(name: str, value: Any, owner: Optional[str] = None, minimum: int = 1) -> int:
    """An integer setting ``≥ minimum`` (``maxiter``, ``restart``, ``check_every``...)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingError(
            f"{_prefix(owner)}{name} must be an integer ≥ {minimum}, got {value!r} of type "
            f"{type(value).__name__}. Pass e.g. {name}={max(minimum, 10)}."
        )
    if value < minimum:
        raise SettingError(f"{_prefix(owner)}{name} must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def check_tol(name: str, value: Any, owner: Optional[str] = None, allow_zero: bool = False) -> float:
    """A relative tolerance: finite, below 1, positive (or zero when ``allow_zero``).

    A tolerance of 1 or more is met before the first step (by ``x = 0`` for a linear
    solve, by ``x0`` for an inner solve), so the solver would return without solving.
    """
    tol = _real(name, value, owner)
    low_ok = tol >= 0 if allow_zero else tol > 0
    if not (low_ok and tol < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        kind = "non-negative" if allow_zero else "positive"
        raise SettingError(
            f"{_prefix(owner)}{name} must be a {kind} number below 1, in {interval}, got {value!r}: "
            "it is a relative "
            f"residual, and {name} ≥ 1 is met before the first step. Use e.g. {name}=1e-6, "
            "or None for the dtype's default."
        )
    return tol


def check_positive_number(name: str, value: Any, owner: Optional[str] = None) -> float:
    """A finite number ``> 0`` (step sizes, ``forward_tol``)."""
    number = _real(name, value, owner)
    if not number > 0:
        raise SettingError(f"{_prefix(owner)}{name} must be a positive number, got {value!r}.")
    return number


def check_nonnegative(name: str, value: Any, owner: Optional[str] = None) -> float:
    """A finite number ``≥ 0`` (``damping``)."""
    number = _real(name, value, owner)
    if not number >= 0:
        raise SettingError(f"{_prefix(owner)}{name} must be non-negative, got {value!r}.")
    return number


def check_fraction(name: str, value: Any, owner: Optional[str] = None) -> float:
    """A number in ``(0, 1]`` (a damping factor of an iteration)."""
    number = _real(name, value, owner)
    if not 0 < number <= 1:
        raise SettingError(f"{_prefix(owner)}{name} must be in (0, 1], got {value!r}.")
    return number


def check_on_failure(on_failure: Any, owner: Optional[str] = None, deferrable: bool = False) -> str:
    """One of :data:`ON_FAILURE` (or ``"defer"`` where ``deferrable``: the core's calls)."""
    allowed = ON_FAILURE + ("defer",) if deferrable else ON_FAILURE
    if on_failure not in allowed:
        raise SettingError(f"{_prefix(owner)}on_failure must be one of {allowed}, got {on_failure!r}.")
    return on_failure


def check_forward_tol(value: Any, owner: Optional[str] = None) -> Optional[float]:
    """``None`` (the dtype's default) or a finite number ``> 0``."""
    return None if value is None else check_positive_number("forward_tol", value, owner)


def check_linear_solver(value: Any, owner: Optional[str] = None, example: str = "ig.CG()") -> Any:
    """``None``, an instance of a linear solver, or a plain callable ``linear_solver(matvec, b)``.

    A plain callable receives ``matvec`` and ``b`` as pytrees shaped like ``b`` and returns
    ``x`` or ``(x, info)``. A class (``ig.CG`` instead of ``ig.CG()``) is refused: calling
    it would construct a solver, not solve. ``example`` names the instance suggested in
    the message.
    """
    if value is None:
        return None
    if isinstance(value, type):
        raise SettingError(
            f"{_prefix(owner)}linear_solver must be an instance, got the class {value.__name__}. "
            f"Pass e.g. linear_solver={value.__name__}() or linear_solver={example}."
        )
    if not callable(value):
        raise SettingError(
            f"{_prefix(owner)}linear_solver must be an ig linear solver such as {example}, or a "
            "callable linear_solver(matvec, b) returning x or (x, info), got "
            f"{value!r} of type {type(value).__name__}."
        )
    return value
