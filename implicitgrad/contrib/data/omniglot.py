"""Omniglot read from a local copy in its released folder layout (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .episodes import _check_int, class_split
from .fewshot import FewShotDataset, add_rotations, rotation_classes

__all__ = ["load_omniglot"]

_SPLITS = ("images_background", "images_evaluation")
_LAYOUT = (
    "expected layout:\n"
    "  ROOT/images_background/<Alphabet>/<characterNN>/*.png  (meta-train: 964 characters)\n"
    "  ROOT/images_evaluation/<Alphabet>/<characterNN>/*.png  (meta-test: 659 characters)\n"
    "obtained by unzipping images_background.zip and images_evaluation.zip of the Omniglot "
    "release (github.com/brendenlake/omniglot, folder python/) into ROOT."
)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_characters(root: Path) -> list[list[tuple[str, list[Path]]]]:
    """Per split, the ``(name, png paths)`` of every character, in sorted order."""
    if not root.is_dir():
        raise FileNotFoundError(f"Omniglot folder {str(root)!r} does not exist; {_LAYOUT}")
    splits = []
    for split in _SPLITS:
        folder = root / split
        if not folder.is_dir():
            hint = ""
            if (root / f"{split}.zip").is_file():
                hint = f" Found {split}.zip there: extract it first."
            raise FileNotFoundError(f"missing folder {str(folder)!r}.{hint} {_LAYOUT}")
        characters = []
        for alphabet in _subfolders(folder):
            for character in _subfolders(alphabet):
                pngs = sorted(p for p in character.iterdir() if p.suffix.lower() == ".png")
                if not pngs:
                    raise FileNotFoundError(f"no .png file in {str(character)!r}; {_LAYOUT}")
                characters.append((f"{alphabet.name}/{character.name}", pngs))
        if not characters:
            raise FileNotFoundError(f"no character folder under {str(folder)!r}; {_LAYOUT}")
        splits.append(characters)
    return splits


def _read_images(paths: list[Path], image_size: int | None) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "load_omniglot needs Pillow to read PNG files; install it with "
            "`pip install implicitgrad[examples]` (or `pip install pillow`)."
        ) from error
    lanczos = getattr(Image, "Resampling", Image).LANCZOS
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            gray = image.convert("L")
            if image_size is not None and gray.size != (image_size, image_size):
                gray = gray.resize((image_size, image_size), resample=lanczos)
            arrays.append(np.asarray(gray, dtype=np.float32))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"Omniglot images have different sizes {sorted(shapes)}; pass image_size to "
            f"resize them to one size."
        )
    return np.stack(arrays) / np.float32(255.0)


def load_omniglot(
    root: str | os.PathLike,
    rotations: bool = True,
    image_size: int | None = 28,
    num_val_characters: int = 0,
    seed: int = 0,
    invert: bool = True,
    dtype: torch.dtype = torch.float32,
) -> FewShotDataset:
    """Loads Omniglot from a local folder as a few-shot classification dataset.

    Every character is a class. The characters of ``images_background`` are the meta-train
    classes and those of ``images_evaluation`` the meta-test classes (Lake et al., Human-level
    concept learning through probabilistic program induction, 2015). With ``rotations``, the
    90°, 180° and 270° rotations of each character are further classes of the same split
    (Santoro et al., One-shot Learning with Memory-Augmented Neural Networks, 2016): 6,492
    classes of 20 drawings. Character ``c`` (in sorted order, background first, out of
    ``C``) rotated by ``90 * r`` degrees counter-clockwise has label ``r * C + c``.

    Images are resized with Lanczos filtering and scaled to ``[0, 1]``; with ``invert``
    strokes are 1 and the background 0. Reading the 32,460 PNG files takes some seconds;
    with rotations at 28×28 the float32 images take about 410 MB (``dtype=torch.float16``
    halves it). Nothing is downloaded. Reading PNGs needs Pillow.

    Args:
        root: Folder holding ``images_background/`` and ``images_evaluation/``, each
            ``<Alphabet>/<characterNN>/*.png``.
        rotations: Add the rotated copies as classes.
        image_size: Side of the square output images; ``None`` keeps the original 105.
        num_val_characters: Background characters (with their rotations) moved to the
            meta-validation classes, chosen at random with ``seed``.
        seed: Seed of the validation split.
        invert: Make strokes 1 and background 0 (the released PNGs draw black on white).
        dtype: Floating dtype of the images.

    Returns:
        A :class:`~implicitgrad.data.FewShotDataset` with ``images`` of shape
        ``(N, 1, image_size, image_size)`` and ``class_names`` such as
        ``"Greek/character01/rot090"``.

    Raises:
        FileNotFoundError: If ``root`` or a split folder is missing or empty; the message
            shows the expected layout.
        ImportError: If Pillow is not installed.
        TypeError: If an integer argument is not an int or ``dtype`` is not floating.
        ValueError: If ``image_size`` < 1, ``num_val_characters`` is not below the number
            of background characters, or images differ in size with ``image_size=None``.

    Example:
        >>> from implicitgrad.data import EpisodeSampler, load_omniglot
        >>> ds = load_omniglot("data/omniglot")  # doctest: +SKIP
        >>> len(ds.train_classes), len(ds.test_classes)  # doctest: +SKIP
        (3856, 2636)
        >>> sampler = EpisodeSampler(ds.images, ds.labels, n_way=20, k_shot=1, k_query=5,
        ...                          classes=ds.train_classes)  # doctest: +SKIP
    """
    if image_size is not None:
        image_size = _check_int(image_size, "image_size", 1)
    seed = _check_int(seed, "seed", 0)
    num_val_characters = _check_int(num_val_characters, "num_val_characters", 0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")

    background, evaluation = _find_characters(Path(root))
    if num_val_characters >= len(background):
        raise ValueError(
            f"num_val_characters={num_val_characters} must be below the "
            f"{len(background)} background characters; lower it."
        )
    characters = background + evaluation
    paths = [path for _, pngs in characters for path in pngs]
    labels = torch.cat(
        [torch.full((len(pngs),), c, dtype=torch.int64) for c, (_, pngs) in enumerate(characters)]
    )
    pixels = _read_images(paths, image_size)
    if invert:
        pixels = 1.0 - pixels
    images = torch.from_numpy(pixels).unsqueeze(1).to(dtype)
    names: tuple[str, ...] = tuple(name for name, _ in characters)
    if rotations:
        images, labels, names = add_rotations(images, labels, names)

    num_base = len(characters)
    train, val = class_split(
        len(background), (len(background) - num_val_characters, num_val_characters), seed
    )
    test = range(len(background), num_base)
    return FewShotDataset(
        images,
        labels,
        rotation_classes(train, num_base, rotations),
        rotation_classes(val, num_base, rotations),
        rotation_classes(test, num_base, rotations),
        names,
    )
