"""N-way K-shot episodes over any labelled dataset, and class-disjoint splits."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Union, cast

import numpy as np
import torch

__all__ = ["EpisodeSampler", "class_split"]

Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[Any]]


def _as_tensor(value: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be a torch.Tensor or a numpy array, got {type(value).__name__}."
        ) from error


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _unique_labels(labels: torch.Tensor, name: str) -> list[int]:
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {labels.dtype}.")
    return [int(c) for c in torch.unique(labels.reshape(-1).cpu())]


class EpisodeSampler:
    """Samples N-way K-shot classification tasks (episodes) from a labelled dataset.

    Each task draws ``n_way`` distinct classes from the allowed ``classes``, assigns them the
    new labels ``0..n_way-1`` in random order, and draws ``k_shot + k_query`` distinct
    examples of each class without replacement: the first ``k_shot`` form the support set,
    the rest the query set (Vinyals et al., Matching Networks for One Shot Learning, 2016).
    Support and query sets are ordered class by class: ``y_support`` is
    ``[0]*k_shot + [1]*k_shot + ...``; the random relabelling is what varies.

    Args:
        images: Tensor or numpy array of shape ``(N, ...)``; kept as given (numpy arrays are
            converted with :func:`torch.as_tensor`).
        labels: Integer Tensor or array of shape ``(N,)``.
        n_way: Number of classes per task, at least 1.
        k_shot: Support examples per class, at least 1.
        k_query: Query examples per class, at least 0.
        classes: The class labels tasks may use, e.g. the meta-train split; default all the
            labels present.

    Raises:
        TypeError: If an argument has the wrong type (e.g. float labels).
        ValueError: If ``images`` and ``labels`` disagree in length, a class in ``classes``
            does not occur in ``labels``, ``n_way`` exceeds the number of classes, or a class
            has fewer than ``k_shot + k_query`` examples.

    Example:
        >>> import torch
        >>> from implicitgrad.data import EpisodeSampler
        >>> images, labels = torch.rand(100, 1, 8, 8), torch.arange(100) % 10
        >>> sampler = EpisodeSampler(images, labels, n_way=5, k_shot=1, k_query=3)
        >>> x_s, y_s, x_q, y_q = sampler.sample(2, generator=torch.Generator().manual_seed(0))[0]
        >>> x_s.shape, y_s.tolist(), x_q.shape
        (torch.Size([5, 1, 8, 8]), [0, 1, 2, 3, 4], torch.Size([15, 1, 8, 8]))
    """

    def __init__(
        self,
        images: ArrayLike,
        labels: ArrayLike,
        n_way: int,
        k_shot: int,
        k_query: int,
        classes: Iterable[int] | None = None,
    ) -> None:
        self.images = _as_tensor(images, "images")
        labels = _as_tensor(labels, "labels")
        if labels.dim() != 1:
            raise ValueError(f"labels must be 1-D of shape (N,), got shape {tuple(labels.shape)}.")
        if self.images.dim() == 0 or self.images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images and labels must have the same length along dim 0, got "
                f"{tuple(self.images.shape)} and {tuple(labels.shape)}."
            )
        present = _unique_labels(labels, "labels")
        self.labels = labels.to(torch.int64)
        self.n_way = _check_int(n_way, "n_way", 1)
        self.k_shot = _check_int(k_shot, "k_shot", 1)
        self.k_query = _check_int(k_query, "k_query", 0)

        if classes is None:
            self.classes = tuple(present)
        else:
            if not isinstance(classes, (torch.Tensor, np.ndarray)):
                classes = list(classes)
            chosen = _unique_labels(_as_tensor(classes, "classes"), "classes")
            missing = sorted(set(chosen) - set(present))
            if missing:
                raise ValueError(
                    f"classes {missing[:10]} do not occur in labels; pass only class labels "
                    f"that are present ({len(present)} distinct labels)."
                )
            self.classes = tuple(chosen)
        if self.n_way > len(self.classes):
            raise ValueError(
                f"n_way={self.n_way} exceeds the {len(self.classes)} available classes; "
                f"lower n_way or allow more classes."
            )

        cpu_labels = self.labels.cpu()
        self._indices = [torch.nonzero(cpu_labels == c).flatten() for c in self.classes]
        needed = self.k_shot + self.k_query
        short = [(c, len(i)) for c, i in zip(self.classes, self._indices) if len(i) < needed]
        if short:
            c, count = min(short, key=lambda item: item[1])
            raise ValueError(
                f"class {c} has {count} examples but k_shot + k_query = {needed} are needed "
                f"({len(short)} classes are short); lower k_shot or k_query, or drop those "
                f"classes from `classes`."
            )

    @property
    def num_classes(self) -> int:
        """Number of classes tasks are drawn from."""
        return len(self.classes)

    def sample_task(
        self, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Task:
        """Draws one task.

        Args:
            generator: CPU :class:`torch.Generator` to draw from; default the global torch RNG.
            device: Device to move the task to; default the device of ``images``.

        Returns:
            ``(x_support, y_support, x_query, y_query)`` with shapes ``(n_way * k_shot, ...)``,
            ``(n_way * k_shot,)``, ``(n_way * k_query, ...)``, ``(n_way * k_query,)``; labels
            are int64.
        """
        order = torch.randperm(self.num_classes, generator=generator)[: self.n_way]
        picks = []
        for position in order.tolist():
            indices = self._indices[position]
            chosen = torch.randperm(len(indices), generator=generator)
            picks.append(indices[chosen[: self.k_shot + self.k_query]])
        support = torch.cat([p[: self.k_shot] for p in picks])
        query = torch.cat([p[self.k_shot :] for p in picks])
        if self.images.device.type != "cpu":
            support, query = support.to(self.images.device), query.to(self.images.device)
        new_labels = torch.arange(self.n_way, device=self.images.device)
        task = (
            self.images[support],
            new_labels.repeat_interleave(self.k_shot),
            self.images[query],
            new_labels.repeat_interleave(self.k_query),
        )
        if device is not None:
            task = cast(Task, tuple(t.to(device) for t in task))
        return task

    def sample(
        self,
        num_tasks: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> list[Task]:
        """Draws ``num_tasks`` independent tasks.

        Args:
            num_tasks: Number of tasks, at least 1.
            generator: CPU :class:`torch.Generator` to draw from; default the global torch RNG
                (so :func:`torch.manual_seed` and checkpointed RNG states govern it).
            device: Device to move the tasks to; default the device of ``images``.

        Returns:
            A list of ``(x_support, y_support, x_query, y_query)`` tuples, as
            :meth:`sample_task`.

        Raises:
            ValueError: If ``num_tasks`` is below 1.
        """
        num_tasks = _check_int(num_tasks, "num_tasks", 1)
        return [self.sample_task(generator, device) for _ in range(num_tasks)]


def _split_counts(sizes: Sequence[float], total: int) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise TypeError(
            "sizes must be a non-empty sequence of ints (counts) or floats (fractions)."
        )
    if any(isinstance(s, bool) or not isinstance(s, numbers.Real) for s in sizes):
        raise TypeError(f"sizes must hold only numbers, got {list(sizes)}.")
    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be non-negative, got {list(sizes)}.")
    if all(isinstance(s, numbers.Integral) for s in sizes):
        counts = [int(s) for s in sizes]
        if sum(counts) != total:
            raise ValueError(
                f"counts {counts} sum to {sum(counts)} but there are {total} classes; "
                f"make them sum to {total}, or pass fractions summing to 1."
            )
        return counts
    if any(isinstance(s, numbers.Integral) for s in sizes):
        raise TypeError(
            f"sizes mixes ints and floats: {list(sizes)}; use all counts or all fractions."
        )
    if not math.isclose(sum(sizes), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions {list(sizes)} sum to {sum(sizes)}; make them sum to 1.")
    # Largest-remainder rounding: the counts sum to `total` and each is within 1 of its share.
    shares = [float(s) * total for s in sizes]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def class_split(
    classes: int | ArrayLike, sizes: Sequence[float], seed: int = 0
) -> tuple[tuple[int, ...], ...]:
    """Randomly partitions classes into disjoint sets, e.g. meta-train / meta-val / meta-test.

    Args:
        classes: Number of classes ``C`` (the classes are ``0..C-1``), or an array of labels
            whose distinct values are the classes.
        sizes: One entry per part: all ints (class counts summing to the number of classes)
            or all floats (fractions summing to 1, rounded by largest remainder).
        seed: Seed of the permutation; the same seed gives the same split.

    Returns:
        One sorted tuple of class labels per entry of ``sizes``; the tuples are disjoint and
        cover all the classes.

    Raises:
        TypeError: If ``sizes`` mixes ints and floats or holds non-numbers.
        ValueError: If counts do not sum to the number of classes, fractions do not sum to 1,
            or an entry is negative.

    Example:
        >>> from implicitgrad.data import class_split
        >>> train, val, test = class_split(40, (0.7, 0.1, 0.2), seed=0)
        >>> len(train), len(val), len(test)
        (28, 4, 8)
        >>> set(train).isdisjoint(test)
        True
    """
    if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
        values = list(range(_check_int(classes, "classes", 0)))
    else:
        values = _unique_labels(_as_tensor(cast(ArrayLike, classes), "classes"), "classes")
    seed = _check_int(seed, "seed", 0)
    counts = _split_counts(sizes, len(values))
    generator = torch.Generator().manual_seed(seed)
    order = [values[i] for i in torch.randperm(len(values), generator=generator).tolist()]
    parts, start = [], 0
    for count in counts:
        parts.append(tuple(sorted(order[start : start + count])))
        start += count
    return tuple(parts)
