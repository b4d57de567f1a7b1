"""Pytree helpers on top of ``torch.utils._pytree`` (the library ``torch.func`` uses)."""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch.utils import _pytree as pytree

TreeSpec = pytree.TreeSpec


def tree_flatten(tree: Any) -> Tuple[List[Any], TreeSpec]:
    return pytree.tree_flatten(tree)


def tree_unflatten(leaves: List[Any], spec: TreeSpec) -> Any:
    return pytree.tree_unflatten(leaves, spec)


def is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def describe(spec: TreeSpec, leaves: List[Any]) -> str:
    """A short readable summary of a pytree's structure and leaf shapes."""
    shapes = [
        tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in leaves
    ]
    return f"{spec} with leaves {shapes}"
