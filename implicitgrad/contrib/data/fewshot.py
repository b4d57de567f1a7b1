"""The labelled image collection returned by the offline few-shot loaders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["FewShotDataset"]

ROTATIONS = (0, 90, 180, 270)


class FewShotDataset(NamedTuple):
    """Images, labels and class-disjoint meta-train / meta-val / meta-test class sets.

    Feed it to :class:`~implicitgrad.data.EpisodeSampler`, one sampler per split.

    Attributes:
        images: Float Tensor of shape ``(N, 1, H, W)`` with values in ``[0, 1]``.
        labels: int64 Tensor of shape ``(N,)``; class ``c`` has name ``class_names[c]``.
        train_classes: Sorted labels of the meta-training classes.
        val_classes: Sorted labels of the meta-validation classes (may be empty).
        test_classes: Sorted labels of the meta-test classes.
        class_names: One readable name per class, e.g. ``"digit3/rot090"``.

    Example:
        >>> import torch
        >>> from implicitgrad.data import EpisodeSampler, FewShotDataset
        >>> ds = FewShotDataset(torch.rand(6, 1, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2]),
        ...                     (0, 1), (), (2,), ("a", "b", "c"))
        >>> sampler = EpisodeSampler(ds.images, ds.labels, n_way=2, k_shot=1, k_query=1,
        ...                          classes=ds.train_classes)
        >>> sampler.sample(1)[0][0].shape
        torch.Size([2, 1, 2, 2])
    """

    images: torch.Tensor
    labels: torch.Tensor
    train_classes: tuple[int, ...]
    val_classes: tuple[int, ...]
    test_classes: tuple[int, ...]
    class_names: tuple[str, ...]


def add_rotations(
    images: torch.Tensor, labels: torch.Tensor, names: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Append the 90°, 180° and 270° rotations of every image as new classes.

    With ``C`` base classes, base class ``c`` rotated by ``90 * r`` degrees (counter-clockwise,
    as :func:`torch.rot90`) gets label ``r * C + c``, so labels ``0..C-1`` are unchanged.
    """
    num_base = len(names)
    rotated = [torch.rot90(images, k, dims=(-2, -1)) for k in range(len(ROTATIONS))]
    all_labels = [labels + k * num_base for k in range(len(ROTATIONS))]
    all_names = tuple(f"{name}/rot{angle:03d}" for angle in ROTATIONS for name in names)
    return torch.cat(rotated), torch.cat(all_labels), all_names


def rotation_classes(
    base_classes: Sequence[int], num_base: int, rotations: bool
) -> tuple[int, ...]:
    """Labels of ``base_classes`` and, with ``rotations``, of their rotated copies."""
    copies = len(ROTATIONS) if rotations else 1
    return tuple(sorted(c + k * num_base for k in range(copies) for c in base_classes))
