"""Layouts: pytrees of tensor shapes, and the maps between such pytrees and flat vectors.

A tuple of ints is a tensor shape (``()`` a scalar, ``(3,)`` a vector); a ``dict`` maps
names to layouts; a ``list`` holds layouts.
"""

from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple

import torch

from .._tree import tree_flatten, tree_unflatten


def is_shape(layout: Any) -> bool:
    return isinstance(layout, tuple) and all(isinstance(d, int) and d >= 0 for d in layout)


def layout_shapes(layout: Any) -> List[Tuple[int, ...]]:
    if is_shape(layout):
        return [layout]
    if isinstance(layout, dict):
        return [s for v in layout.values() for s in layout_shapes(v)]
    if isinstance(layout, list):
        return [s for v in layout for s in layout_shapes(v)]
    raise TypeError(
        f"a layout is a tuple of ints (a tensor shape), a dict or a list of layouts; got {layout!r}."
    )


def layout_size(layout: Any) -> int:
    return sum(math.prod(s) for s in layout_shapes(layout))


def flatten(layout: Any, tree: Any) -> torch.Tensor:
    """The entries of ``tree`` (structured by ``layout``) as one vector."""
    if is_shape(layout):
        return tree.reshape(-1)
    items = list(layout.items()) if isinstance(layout, dict) else list(enumerate(layout))
    return torch.cat([flatten(sub, tree[key]) for key, sub in items])


def flatten_params(layouts: Sequence[Any], params: Sequence[Any]) -> torch.Tensor:
    return torch.cat([flatten(layout, p) for layout, p in zip(layouts, params)])


def unflatten(layout: Any, vector: torch.Tensor) -> Any:
    """The inverse of :func:`_flatten`."""
    out, offset = build(layout, vector, 0)
    return out


def build(layout: Any, vector: torch.Tensor, offset: int):
    if is_shape(layout):
        size = math.prod(layout)
        return vector[offset : offset + size].reshape(layout), offset + size
    if isinstance(layout, dict):
        out = {}
        for key, sub in layout.items():
            out[key], offset = build(sub, vector, offset)
        return out, offset
    items = []
    for sub in layout:
        item, offset = build(sub, vector, offset)
        items.append(item)
    return items, offset


def split_params(layouts: Sequence[Any], vector: torch.Tensor, requires_grad: bool = True) -> Tuple[Any, ...]:
    """Split a flat vector into one pytree per layout, as fresh leaf tensors."""
    out, offset = [], 0
    for layout in layouts:
        tree, offset = build(layout, vector, offset)
        leaves, spec = tree_flatten(tree)
        out.append(tree_unflatten([t.clone().requires_grad_(requires_grad) for t in leaves], spec))
    return tuple(out)
