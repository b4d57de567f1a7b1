"""An offline few-shot dataset built from scikit-learn's bundled 8×8 digits."""

from __future__ import annotations

import torch

from .episodes import _check_int, class_split
from .fewshot import FewShotDataset, add_rotations

__all__ = ["load_digits_fewshot"]


def load_digits_fewshot(
    rotations: bool = True,
    num_test_classes: int | None = None,
    num_val_classes: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> FewShotDataset:
    """Loads the 1,797 8×8 digits of scikit-learn as a small offline few-shot benchmark.

    Pixel intensities ``0..16`` are scaled to ``[0, 1]``. With ``rotations``, the 90°, 180°
    and 270° rotations of every digit are added as new classes, as is customary for Omniglot
    (Santoro et al., One-shot Learning with Memory-Augmented Neural Networks, 2016): 40
    classes of about 180 examples. Digit ``d`` rotated by ``90 * r`` degrees
    counter-clockwise has label ``10 * r + d``. The classes are split at random, by
    :func:`~implicitgrad.data.class_split`, over all the classes: a test class may be a
    rotation of a training digit (and a 6 turned by 180° resembles a 9), so this benchmark
    measures fast adaptation rather than transfer to unseen shapes.

    Needs scikit-learn (the data ship with it; nothing is downloaded).

    Args:
        rotations: Add the rotated copies as classes (40 classes); otherwise 10.
        num_test_classes: Meta-test classes; default 10 with rotations, 5 without.
        num_val_classes: Meta-validation classes, taken out of the training classes.
        seed: Seed of the class split.
        dtype: Floating dtype of the images.

    Returns:
        A :class:`~implicitgrad.data.FewShotDataset` with ``images`` of shape
        ``(N, 1, 8, 8)`` (``N`` = 1,797, times 4 with rotations) and class-disjoint
        ``train_classes`` / ``val_classes`` / ``test_classes``.

    Raises:
        ImportError: If scikit-learn is not installed.
        TypeError: If a class count is not an int or ``dtype`` is not floating.
        ValueError: If the requested test and validation classes leave no training class.

    Example:
        >>> from implicitgrad.data import EpisodeSampler, load_digits_fewshot
        >>> ds = load_digits_fewshot()
        >>> ds.images.shape, len(ds.train_classes), len(ds.test_classes)
        (torch.Size([7188, 1, 8, 8]), 30, 10)
        >>> train = EpisodeSampler(ds.images, ds.labels, n_way=5, k_shot=1, k_query=15,
        ...                        classes=ds.train_classes)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "load_digits_fewshot needs scikit-learn; install it with "
            "`pip install implicitgrad[examples]` (or `pip install scikit-learn`)."
        ) from error
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float64).div(16.0).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    names: tuple[str, ...] = tuple(f"digit{d}" for d in range(10))
    if rotations:
        images, labels, names = add_rotations(images, labels, names)

    num_classes = len(names)
    if num_test_classes is None:
        num_test_classes = num_classes // 4 if rotations else num_classes // 2
    num_test_classes = _check_int(num_test_classes, "num_test_classes", 0)
    num_val_classes = _check_int(num_val_classes, "num_val_classes", 0)
    num_train = num_classes - num_test_classes - num_val_classes
    if num_train < 1:
        raise ValueError(
            f"num_test_classes={num_test_classes} and num_val_classes={num_val_classes} leave "
            f"no training class out of {num_classes}; lower them."
        )
    train, val, test = class_split(
        num_classes, (num_train, num_val_classes, num_test_classes), seed
    )
    return FewShotDataset(images.to(dtype), labels, train, val, test, names)
