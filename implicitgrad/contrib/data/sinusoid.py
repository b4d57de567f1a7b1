"""The sinusoid regression task family of Finn et al. (2017)."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, cast

import torch

__all__ = ["Sinusoid", "SinusoidFunction"]

Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class SinusoidFunction(NamedTuple):
    """One task's true function ``y = amplitude * sin(x - phase)``.

    Call it on a dense grid to plot the target an adapted model should match.

    Attributes:
        amplitude: The amplitude ``A``.
        phase: The phase ``φ``.

    Example:
        >>> import math, torch
        >>> from implicitgrad.data import SinusoidFunction
        >>> f = SinusoidFunction(amplitude=2.0, phase=0.0)
        >>> f(torch.tensor([math.pi / 2])).tolist()
        [2.0]
    """

    amplitude: float
    phase: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluates ``amplitude * sin(x - phase)`` elementwise, keeping the shape of ``x``."""
        return self.amplitude * torch.sin(x - self.phase)


def _check_range(value: Any, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a pair (low, high) of numbers, got {value!r}.") from error
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{name} must satisfy low <= high with finite ends, got {value!r}.")
    return low, high


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


class Sinusoid:
    r"""Sinusoid regression tasks: few-shot fitting of ``y = A sin(x - φ)``.

    Each task draws an amplitude :math:`A \sim U[0.1, 5]` and a phase
    :math:`\varphi \sim U[0, \pi]`; its points have :math:`x \sim U[-5, 5]` and
    :math:`y = A \sin(x - \varphi)`, without noise. The first ``k_shot`` points of a task form
    the support set, the next ``k_query`` the query set. Draws are made in float64 on the CPU
    and then cast, so a seed gives the same tasks whatever ``dtype`` and ``device``.

    Randomness comes from, in order of precedence: the ``generator`` passed to
    :meth:`sample`, the family's own generator (created when ``seed`` is given), the global
    torch RNG.

    Args:
        k_shot: Support points per task, at least 1.
        k_query: Query points per task, at least 0; default ``k_shot``, as in MAML where
            each task has ``2K`` points split in halves.
        seed: If given, the family owns a :class:`torch.Generator` seeded with it
            (attribute ``generator``; checkpoint it to resume exactly).
        amplitude_range: ``(low, high)`` of the uniform amplitude.
        phase_range: ``(low, high)`` of the uniform phase.
        x_range: ``(low, high)`` of the uniform inputs.

    Raises:
        TypeError: If a count is not an int or a range not a pair of numbers.
        ValueError: If a count is too small or a range has ``low > high``.

    Example:
        >>> import torch
        >>> from implicitgrad.data import Sinusoid
        >>> family = Sinusoid(k_shot=10, seed=0)
        >>> tasks, functions = family.sample(4, return_functions=True)
        >>> x_s, y_s, x_q, y_q = tasks[0]
        >>> x_s.shape, y_q.shape
        (torch.Size([10, 1]), torch.Size([10, 1]))
        >>> torch.allclose(functions[0](x_s), y_s)
        True
        >>> family.sample_batch(8)[0].shape
        torch.Size([8, 10, 1])

    References:
        Finn et al., Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks, 2017.
    """

    def __init__(
        self,
        k_shot: int = 10,
        k_query: int | None = None,
        seed: int | None = None,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        self.k_shot = _check_count(k_shot, "k_shot", 1)
        self.k_query = self.k_shot if k_query is None else _check_count(k_query, "k_query", 0)
        self.amplitude_range = _check_range(amplitude_range, "amplitude_range")
        self.phase_range = _check_range(phase_range, "phase_range")
        self.x_range = _check_range(x_range, "x_range")
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(_check_count(seed, "seed", 0))

    def _uniform(
        self, shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator | None
    ) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    def sample_batch(
        self,
        num_tasks: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        return_functions: bool = False,
    ) -> Task | tuple[Task, list[SinusoidFunction]]:
        """Draws ``num_tasks`` tasks stacked along a leading batch dimension.

        ``sample_batch(B, g)`` and ``sample(B, g)`` consume the generator identically and
        return the same tasks, stacked or not.

        Args:
            num_tasks: Batch size ``B``, at least 1.
            generator: CPU :class:`torch.Generator`; default the family's own, else the
                global torch RNG.
            device: Device of the returned tensors; default CPU.
            dtype: Floating dtype of the returned tensors; default
                :func:`torch.get_default_dtype`.
            return_functions: Also return each task's :class:`SinusoidFunction`.

        Returns:
            ``(x_support, y_support, x_query, y_query)`` of shapes ``(B, k_shot, 1)`` and
            ``(B, k_query, 1)``; with ``return_functions``, the pair ``(batch, functions)``.

        Raises:
            ValueError: If ``num_tasks`` is below 1.
            TypeError: If ``dtype`` is not a floating dtype.
        """
        num_tasks = _check_count(num_tasks, "num_tasks", 1)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
        if generator is None:
            generator = self.generator
        amplitude = self._uniform((num_tasks, 1, 1), self.amplitude_range, generator)
        phase = self._uniform((num_tasks, 1, 1), self.phase_range, generator)
        x = self._uniform((num_tasks, self.k_shot + self.k_query, 1), self.x_range, generator)
        y = amplitude * torch.sin(x - phase)
        x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
        k = self.k_shot
        batch = (x[:, :k], y[:, :k], x[:, k:], y[:, k:])
        if not return_functions:
            return batch
        functions = [
            SinusoidFunction(float(a), float(p))
            for a, p in zip(amplitude.flatten().tolist(), phase.flatten().tolist())
        ]
        return batch, functions

    def sample(
        self,
        num_tasks: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        return_functions: bool = False,
    ) -> list[Task] | tuple[list[Task], list[SinusoidFunction]]:
        """Draws ``num_tasks`` tasks as a list, the form ``meta_step(tasks)`` takes.

        Args:
            num_tasks: Number of tasks, at least 1.
            generator: CPU :class:`torch.Generator`; default the family's own, else the
                global torch RNG.
            device: Device of the returned tensors; default CPU.
            dtype: Floating dtype of the returned tensors; default
                :func:`torch.get_default_dtype`.
            return_functions: Also return each task's :class:`SinusoidFunction`.

        Returns:
            A list of ``(x_support, y_support, x_query, y_query)`` with shapes ``(k_shot, 1)``
            and ``(k_query, 1)``; with ``return_functions``, the pair ``(tasks, functions)``.

        Raises:
            ValueError: If ``num_tasks`` is below 1.
            TypeError: If ``dtype`` is not a floating dtype.
        """
        batch, functions = cast("tuple[Task, list[SinusoidFunction]]", self.sample_batch(
            num_tasks, generator, device, dtype, return_functions=True
        ))
        tasks = [tuple(t.clone() for t in task) for task in zip(*(b.unbind(0) for b in batch))]
        return (tasks, functions) if return_functions else tasks
