"""Pytree helpers: the one module through which the library flattens pytrees.

The flattening is ``torch.func``'s own (reached through :mod:`implicitgrad._compat`), so
a pytree means the same here as under ``torch.func.vmap`` / ``grad``.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch

from ._compat import pytree

TreeSpec = pytree.TreeSpec


def tree_flatten(tree: Any) -> Tuple[List[Any], TreeSpec]:
    return pytree.tree_flatten(tree)


def tree_unflatten(leaves: List[Any], spec: TreeSpec) -> Any:
    return pytree.tree_unflatten(leaves, spec)


def tree_leaf_names(tree: Any, prefix: str = "") -> List[str]:
    """A readable path per leaf, e.g. ``prefix[0]['w']``."""
    with_path, _ = pytree.tree_flatten_with_path(tree)
    return [f"{prefix}{pytree.keystr(path)}" for path, _ in with_path]


def is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def describe(spec: TreeSpec, leaves: List[Any]) -> str:
    """A short readable summary of a pytree's structure and leaf shapes."""
    shapes = [
        tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in leaves
    ]
    return f"{spec} with leaves {shapes}"
